"""Property-based tests (hypothesis) for the event contract, ``tailstream.contract``.

Covered: ``decode_payload`` on any message value, then ``validate_event`` (every kind in
``EVENT_KINDS``) or ``validate_item`` on each decoded value, as the stream pipeline does
(:func:`outcome`). Generated inputs: random bytes; valid JSON of the wrong shape (scalars,
lists, nested objects); wrong field types and booleans where numbers are expected; missing,
null and extra fields; strings and arrays beyond :class:`Limits`; nesting up to 10,000 deep,
as raw bytes under and over the byte limit and as already-decoded values; ``NaN``,
``Infinity``, ``-Infinity``, ``1e999`` and 400- and 4,301-digit integer literals; negative
and absurd prices, quantities and timestamps (far past, far future, milliseconds); Unicode
edge cases (lone surrogates as ``\\ud800`` escapes and as raw bytes, emoji, RTL marks, NUL,
combining marks, BOMs, UTF-16/32 text); truncated and corrupted bytes; unknown item ids;
batched envelopes (empty, nested, mixing valid and invalid events); custom, tight limits.

Properties:

* every message is either accepted, giving events/items whose fields satisfy the contract
  (and that survive ``to_dict``/``encode`` again), or rejected with a reason code from the
  documented set (the reason table of docs/events.md); nothing else is ever raised
  (``test_every_message_is_accepted_valid_or_rejected_with_a_reason``);
* input over ``Limits.max_event_bytes`` is refused as ``oversize`` before json is called
  (``json`` is replaced in the contract module by a spy that fails the test if called);
* valid events and items round-trip through ``to_dict``, ``encode``, ``json.loads`` and
  the validators, also in the forms producers may send (integer ids, ``"v": 1``, nulls);
  one mutation of such a record (a field dropped, nulled, of the wrong type, blank, too
  long, with a lone surrogate, out of range, NaN; or the whole value not an object) gets
  exactly the reason the documentation gives, alone and as the middle element of an
  envelope between two valid records (``test_valid_records_round_trip_and_one_mutation...``).

CI runs 2,000 generated cases per decoder: each of the 2,000 hostile messages goes through
``decode_payload`` and then every validator (``validate_event`` for each kind in
``EVENT_KINDS``, and ``validate_item``), and the round-trip/mutation property runs 2,000
cases for each group (interaction kinds, search, item); the oversize property 2,000 more.
``derandomize=True``: every run sees the same cases. Takes about 35 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailstream import contract
from tailstream.contract import (
    EVENT_KINDS,
    INTERACTION_KINDS,
    Event,
    InvalidEvent,
    Item,
    Limits,
    Rejection,
    decode_payload,
    encode,
    size_limit,
    validate_event,
    validate_item,
)

NOW = 1_700_000_000.0
LIMITS = Limits()
TIGHT = Limits(max_event_bytes=700, max_string_chars=6, max_list_items=3,
               max_future_skew_s=0.0, max_price=100.0, max_quantity=3)
BIG = Limits(max_event_bytes=1 << 20)  # default rules, room for 10,000-deep nesting
PRESETS = (LIMITS, TIGHT)

EXAMPLES = 2_000
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example, HealthCheck.filter_too_much],
)

GROUPS: dict[str, tuple[str, ...]] = {
    "interaction": tuple(sorted(INTERACTION_KINDS)),
    "search": ("search",),
    "item": ("item",),
}
ALL_KINDS = (*sorted(EVENT_KINDS), "item")

DOCS = Path(__file__).parents[2] / "docs" / "events.md"


# ---------------------------------------------------------------------------
# Reason codes: the documented set
# ---------------------------------------------------------------------------
def _documented_reasons() -> frozenset[str]:
    """The codes in the reason table of docs/events.md ("| Reason | Meaning |")."""
    table = DOCS.read_text("utf-8").split("| Reason | Meaning |", 1)[1].split("\n\n", 1)[0]
    return frozenset(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE))


DOCUMENTED_REASONS = _documented_reasons()
# processing_error (a valid event the worker then failed on) and undecodable_batch (a Kafka
# record batch it cannot decode) are the worker's, never the contract's.
REASONS = DOCUMENTED_REASONS - {"processing_error", "undecodable_batch"}
DECODE_REASONS = frozenset({"empty", "oversize", "not_json"})
VALUE_REASONS = frozenset({"not_object", "unknown_version", "missing_field", "wrong_type",
                           "bad_value", "oversize"})


def test_reason_codes_are_the_documented_ones() -> None:
    assert DECODE_REASONS | VALUE_REASONS | {"unknown_kind"} == REASONS
    source = Path(contract.__file__).read_text("utf-8")
    used = set(re.findall(r"(?:Rejection|InvalidEvent)\(\s*\"([a-z_]+)\"", source))
    assert used == REASONS


# ---------------------------------------------------------------------------
# The pipeline, and what an outcome must satisfy
# ---------------------------------------------------------------------------
Result = Event | Item | Rejection


def outcome(kind: str, raw: bytes | None, limits: Limits = LIMITS) -> Rejection | list[Result]:
    """What the stream does with one message of ``kind`` ("item" for the items topic):
    a whole-message rejection, or one accepted value or rejection per decoded value."""
    decoded = decode_payload(raw, limits)
    if isinstance(decoded, Rejection):
        return decoded
    return [validate(kind, value, limits) for value in decoded]


def validate(kind: str, value: Any, limits: Limits = LIMITS) -> Result:
    try:
        if kind == "item":
            return validate_item(value, limits)
        return validate_event(kind, value, limits, now=NOW)
    except InvalidEvent as exc:
        return Rejection(exc.reason, exc.detail)


def check_text(value: object, limits: Limits) -> None:
    assert type(value) is str
    assert value.strip(), "empty or blank"
    assert len(value) <= limits.max_string_chars
    value.encode("utf-8")  # no lone surrogates


def check_price(price: object, limits: Limits) -> None:
    if price is not None:
        assert type(price) is float and math.isfinite(price)
        assert 0 <= price <= limits.max_price


def check_event(kind: str, ev: Event, limits: Limits) -> None:
    assert type(ev) is Event and ev.kind == kind
    check_text(ev.event_id, limits)
    check_text(ev.user_id, limits)
    assert type(ev.ts) is float and math.isfinite(ev.ts)
    assert limits.min_ts <= ev.ts <= NOW + limits.max_future_skew_s
    for optional in (ev.category, ev.source, ev.clicked_item_id):
        if optional is not None:
            check_text(optional, limits)
    if kind == "search":
        check_text(ev.query, limits)
        assert (ev.item_id, ev.price, ev.quantity) == (None, None, None)
        assert type(ev.result_item_ids) is tuple
        assert len(ev.result_item_ids) <= limits.max_list_items
        for result in ev.result_item_ids:
            check_text(result, limits)
    else:
        check_text(ev.item_id, limits)
        assert (ev.query, ev.result_item_ids, ev.clicked_item_id) == (None, (), None)
        check_price(ev.price, limits)
        if ev.quantity is not None:
            assert type(ev.quantity) is int
            assert 1 <= ev.quantity <= limits.max_quantity
    # What was accepted can be written and read again.
    assert validate(kind, json.loads(encode(ev.to_dict())), limits) == ev


def check_item(it: Item, limits: Limits) -> None:
    assert type(it) is Item
    for text in (it.item_id, it.title, it.category):
        check_text(text, limits)
    if it.brand != "":
        check_text(it.brand, limits)
    check_price(it.price, limits)
    assert validate("item", json.loads(encode(it.to_dict())), limits) == it


def check_rejection(rejection: Rejection, allowed: frozenset[str]) -> None:
    assert type(rejection) is Rejection
    assert rejection.reason in allowed, rejection
    assert type(rejection.detail) is str


def check_result(kind: str, result: Result, limits: Limits) -> None:
    if isinstance(result, Rejection):
        check_rejection(result, VALUE_REASONS)
    elif kind == "item":
        assert isinstance(result, Item), result
        check_item(result, limits)
    else:
        assert isinstance(result, Event), result
        check_event(kind, result, limits)


def check_decoded(raw: bytes | None, decoded: Rejection | list[Any], limits: Limits) -> None:
    """Whole-message rules: a documented rejection, or a non-empty list of values."""
    if isinstance(decoded, Rejection):
        check_rejection(decoded, DECODE_REASONS)
        if not raw:
            assert decoded.reason == "empty"
        elif len(raw) > size_limit(raw, limits):
            assert decoded.reason == "oversize"
        return
    assert raw is not None and 0 < len(raw) <= size_limit(raw, limits)
    assert len(decoded) <= limits.max_envelope_events
    assert len(raw) <= limits.max_event_bytes * len(decoded)
    raw.decode("utf-8")  # documented: anything that is not UTF-8 is not_json
    assert type(decoded) is list and decoded


def _walk(value: Any) -> Iterator[Any]:
    """Every value inside a decoded JSON value, without recursion."""
    stack = [value]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            stack.extend(node.values())


def check_outcome(kind: str, raw: bytes | None, limits: Limits) -> Rejection | list[Result]:
    """The central property; returns the outcome for further checks."""
    result = outcome(kind, raw, limits)
    check_decoded(raw, result, limits)
    if isinstance(result, list):
        for one in result:
            check_result(kind, one, limits)
    return result


# ---------------------------------------------------------------------------
# Building message bytes
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Raw:
    """A JSON token written as-is: NaN, a 400-digit integer, a malformed number..."""

    text: str


def dump(value: Any, ensure_ascii: bool = True) -> str:
    """JSON text of ``value``, with :class:`Raw` tokens written verbatim."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(
            json.dumps(str(k), ensure_ascii=ensure_ascii) + ":" + dump(v, ensure_ascii)
            for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump(v, ensure_ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def nested(depth: int, style: str, leaf: bytes = b"1") -> bytes:
    """``depth`` nested arrays, objects or both, as raw JSON bytes (no recursion)."""
    openers = {"array": (b"[",), "object": (b'{"a":',), "mixed": (b"[", b'{"k":')}[style]
    opened = [openers[n % len(openers)] for n in range(depth)]
    closers = [b"]" if o == b"[" else b"}" for o in reversed(opened)]
    return b"".join(opened) + leaf + b"".join(closers)


def nested_value(depth: int, style: str) -> Any:
    """The same as a Python value (what json.loads would give with no recursion limit)."""
    value: Any = 1
    for n in range(depth):
        value = [value] if style == "array" or (style == "mixed" and n % 2) else {"a": value}
    return value


EVENT_FIELDS = ("v", "event_id", "user_id", "ts", "item_id", "category", "price", "quantity",
                "source", "query", "result_item_ids", "clicked_item_id")
ITEM_FIELDS = ("item_id", "title", "category", "brand", "price")
EXTRA_FIELDS = ("session", "pad", "extra", "", "\ud800", "\u202eevent_id", "event_id\x00",
                "Event_ID", "ts ")

EDGE_CHARS = ("\x00", "\x1f", "\x7f", "\u0301", "\u0308", "\u200b", "\u200d", "\u200e",
              "\u200f", "\u202e", "\u2028", "\u3000", "\xa0", "\ufeff", "\uffff",
              "\U0001f600", "\U0001f469\u200d\U0001f4bb", "\U0001f1fa\U0001f1f8", "\ud800",
              "\udfff", "\udbff", "\udc00", "é", "e\u0301", "日本", "\u05e9\u05dc\u05d5\u05dd",
              " ", "\t", "\n", '"', "\\")
BLANK_CHARS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u3000"
UNKNOWN_IDS = ("i-does-not-exist", "sku-404", "0", "-1", "00000000000000000000", "null",
               "None", "undefined", "'; DROP TABLE items; --", "../../etc/passwd")

MIN_TS = LIMITS.min_ts
MAX_TS = NOW + LIMITS.max_future_skew_s
RAW_CONSTANTS = (Raw("NaN"), Raw("Infinity"), Raw("-Infinity"))
RAW_NUMBERS = RAW_CONSTANTS + tuple(Raw(t) for t in (
    "-NaN", "9" * 400, "-" + "9" * 400, "9" * 4_301,
    "1e999", "-1e999", "1e-999", "1E400", "-0", "-0.0", "2.0", "1e2", "0.1e1", "01", "+1",
    ".5", "5.", "0x10", "1_000", "1e", "--1", "Infinity1", "nan", "true1"))


def _repeat(unit: str, n: int) -> str:
    return (unit * n)[:n]


@cache
def texts(limits: Limits) -> st.SearchStrategy[str]:
    m = limits.max_string_chars
    lengths = st.sampled_from((m - 1, m, m + 1, 2 * m, 5_000)) | st.integers(0, m + 2)
    return st.one_of(
        st.text(max_size=12),
        st.lists(st.sampled_from(EDGE_CHARS) | st.characters(), max_size=8).map("".join),
        st.sampled_from(UNKNOWN_IDS),
        st.text(alphabet=BLANK_CHARS, max_size=4),
        st.builds(_repeat, st.sampled_from(("x", "é", "\U0001f600", " ", "\ud800", "ab", "7")),
                  lengths),
    )


@cache
def numbers(raw: bool = True) -> st.SearchStrategy[Any]:
    """Numbers of every sort; with ``raw``, also literal tokens only bytes can carry."""
    far = (0, -1, -0.0, 1, MIN_TS, MIN_TS - 1e-6, math.nextafter(MIN_TS, 0), MAX_TS,
           math.nextafter(MAX_TS, math.inf), NOW * 1_000, NOW * 1e6, 253_402_300_800.0,
           -62_135_596_800.0, 1e308, -1e308, 5e-324, 2**53 + 1, 2**63, -(2**63), 10**30,
           10**400, -(10**400), LIMITS.max_price, math.nextafter(LIMITS.max_price, math.inf),
           -0.01, LIMITS.max_quantity, LIMITS.max_quantity + 1, 2.0, 1.5, 7.0)
    return st.one_of(
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(MIN_TS - 1e6, MAX_TS + 1e6),
        st.sampled_from(far),
        *([st.sampled_from(RAW_CONSTANTS), st.sampled_from(RAW_NUMBERS)] if raw else []),
    )


@cache
def scalars(limits: Limits, raw: bool = True) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), numbers(raw), texts(limits))


@cache
def json_values(limits: Limits, raw: bool = True) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(EVENT_FIELDS + ITEM_FIELDS + EXTRA_FIELDS) | st.text(max_size=4)
    return st.recursive(
        scalars(limits, raw),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=8,
    )


@cache
def big_lists(limits: Limits) -> st.SearchStrategy[list[Any]]:
    n = limits.max_list_items
    return st.builds(
        lambda unit, size: (unit * size)[:size],
        st.lists(st.sampled_from(("i-1", 7, "", True, None, "x" * 600, "\ud800")) | texts(limits),
                 min_size=1, max_size=3),
        st.sampled_from((n, n + 1, 1_000)) | st.integers(0, n + 2),
    )


@cache
def field_values(limits: Limits, raw: bool = True) -> st.SearchStrategy[Any]:
    return st.one_of(json_values(limits, raw), numbers(raw), texts(limits), big_lists(limits),
                     st.booleans())


# --- valid wire values ------------------------------------------------------
valid_strings = st.one_of(
    st.text(min_size=1, max_size=16).filter(str.strip),
    st.lists(st.sampled_from([c for c in EDGE_CHARS if not 0xD800 <= ord(c[0]) <= 0xDFFF]),
             min_size=1, max_size=6).map(lambda cs: "x" + "".join(cs)),
    st.sampled_from(UNKNOWN_IDS),
    st.integers(-(10**20), 10**20).map(str),
    st.builds(_repeat, st.sampled_from(("x", "é", "\U0001f600", "e\u0301")),
              st.sampled_from((LIMITS.max_string_chars - 1, LIMITS.max_string_chars))),
)
wire_ids = valid_strings | st.integers(-(10**20), 10**20)
valid_ts = st.floats(MIN_TS, MAX_TS) | st.sampled_from((MIN_TS, MAX_TS, NOW))
wire_ts = valid_ts | st.integers(int(MIN_TS), int(NOW))
valid_prices = st.floats(0.0, LIMITS.max_price) | st.sampled_from((0.0, LIMITS.max_price))
wire_prices = valid_prices | st.integers(0, int(LIMITS.max_price))
valid_quantities = st.integers(1, LIMITS.max_quantity)


@cache
def valid_wire(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    """A valid message value of ``kind`` (under the default limits), as a dict."""
    optional_ids = st.none() | wire_ids
    if kind == "item":
        return st.fixed_dictionaries(
            {"item_id": wire_ids, "title": wire_ids, "category": wire_ids},
            optional={"brand": optional_ids, "price": st.none() | wire_prices})
    required = {"event_id": wire_ids, "user_id": wire_ids, "ts": wire_ts}
    optional = {"v": st.sampled_from((1, 1.0)), "category": optional_ids,
                "price": st.none() | wire_prices,
                "quantity": st.none() | valid_quantities, "source": optional_ids}
    if kind == "search":
        required["query"] = wire_ids
        optional["result_item_ids"] = st.none() | st.lists(wire_ids, max_size=5)
        optional["clicked_item_id"] = optional_ids
    else:
        required["item_id"] = wire_ids
    return st.fixed_dictionaries(required, optional=optional)


# --- hostile message bytes ----------------------------------------------------
@st.composite
def hostile_value(draw: st.DrawFn, kind: str, limits: Limits) -> Any:
    """A value for one event: a valid one with up to 3 fields dropped, changed or added,
    or any JSON value at all (wrong shape)."""
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values(limits))
    value = draw(valid_wire(kind))
    names = (ITEM_FIELDS if kind == "item" else EVENT_FIELDS) + EXTRA_FIELDS
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(names))
        if draw(st.booleans()):
            value.pop(name, None)
        else:
            value[name] = draw(field_values(limits))
    return value


@cache
def message_values(kind: str, limits: Limits) -> st.SearchStrategy[Any]:
    one = hostile_value(kind, limits)
    return st.one_of(
        one,
        st.lists(one, max_size=5),                   # envelopes, [] included
        st.lists(valid_wire(kind), min_size=1, max_size=4),
        st.lists(st.lists(one, max_size=2), max_size=2),  # envelopes do not nest
    )


ENCODINGS = ("utf-8",) * 8 + ("utf-8-sig", "utf-16", "utf-16-be", "utf-32")


@st.composite
def serialised(draw: st.DrawFn, kind: str, limits: Limits) -> bytes:
    value = draw(message_values(kind, limits))
    text = dump(value, ensure_ascii=draw(st.booleans()))
    # surrogatepass: lone surrogates become (invalid) UTF-8 bytes instead of an error here
    raw = text.encode(draw(st.sampled_from(ENCODINGS)), "surrogatepass")
    damage = draw(st.sampled_from(("none",) * 6 + ("truncate", "flip", "insert", "pad")))
    if damage == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif damage == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    elif damage == "insert":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    elif damage == "pad":
        raw = draw(st.sampled_from((b"", b" ", b"\n\t"))) + raw + b" " * draw(st.integers(0, 3))
    return raw


@st.composite
def at_the_size_limit(draw: st.DrawFn, kind: str, limits: Limits) -> bytes:
    """A valid event padded with JSON whitespace to just under, at or over the limit."""
    raw = dump(draw(valid_wire(kind)), ensure_ascii=draw(st.booleans())).encode()
    target = limits.max_event_bytes + draw(st.integers(-2, 2) | st.integers(3, 5_000))
    return raw + b" " * max(0, target - len(raw))


@st.composite
def deeply_nested(draw: st.DrawFn, kind: str) -> tuple[Limits, bytes]:
    """Up to 10,000 nested arrays/objects, alone or as a field, under or over the limit."""
    depth = draw(st.sampled_from((900, 990, 1_000, 5_000, 8_000, 10_000))
                 | st.integers(1, 10_000))
    inner = nested(depth, draw(st.sampled_from(("array", "object", "mixed"))))
    field = draw(st.sampled_from((None, "v", "event_id", "ts", "item_id", "query", "price",
                                  "result_item_ids", "title", "extra")))
    if field is not None:
        head = (b'{"event_id":"e","user_id":"u","ts":1699999999,"item_id":"i","query":"q",'
                b'"title":"t","category":"c","')
        inner = head + field.encode() + b'":' + inner + b"}"
    return draw(st.sampled_from((LIMITS, BIG))), inner


def messages(kind: str) -> st.SearchStrategy[tuple[Limits, bytes | None]]:
    """(limits, message value) pairs: every kind of hostile input for one topic."""
    per_limits = [
        st.tuples(st.just(limits), st.one_of(
            serialised(kind, limits),
            serialised(kind, limits),
            st.binary(max_size=64),
            st.none(),
            at_the_size_limit(kind, limits),
        ))
        for limits in PRESETS
    ]
    return st.one_of(*per_limits, deeply_nested(kind),
                     st.tuples(st.just(LIMITS), st.binary(min_size=65)))


MESSAGES = {kind: messages(kind) for kind in ALL_KINDS}


# ---------------------------------------------------------------------------
# Properties: accepted and valid, or rejected with a documented reason
# ---------------------------------------------------------------------------
@PROPERTY
@given(data=st.data())
def test_every_message_is_accepted_valid_or_rejected_with_a_reason(data: Any) -> None:
    """A message aimed at one topic (interaction, search or items, evenly), then
    decode_payload and every validator (all kinds, item included) on it: each of them sees
    all the generated messages."""
    kind = data.draw(st.sampled_from(sorted(GROUPS)).flatmap(
        lambda group: st.sampled_from(GROUPS[group])))
    limits, raw = data.draw(MESSAGES[kind])
    decoded = decode_payload(raw, limits)
    check_decoded(raw, decoded, limits)
    if isinstance(decoded, list):
        for value in _walk(decoded):
            assert not (isinstance(value, float) and math.isnan(value))  # NaN is not JSON
    for any_kind in ALL_KINDS:
        check_outcome(any_kind, raw, limits)


# ---------------------------------------------------------------------------
# Size limits are enforced before parsing
# ---------------------------------------------------------------------------
class JsonSpy:
    """Stands in for the ``json`` module inside ``tailstream.contract``."""

    dumps = staticmethod(json.dumps)

    def __init__(self, forbid: bool) -> None:
        self.forbid = forbid
        self.calls = 0

    def loads(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.forbid:
            pytest.fail("json.loads was called on a message over the size limit")
        return json.loads(*args, **kwargs)


@PROPERTY
@given(
    limits=st.sampled_from(PRESETS) | st.builds(Limits, max_event_bytes=st.integers(1, 20_000)),
    seed=st.binary(min_size=1, max_size=32) | st.sampled_from((b"[", b'{"a":', b"9", b" ")),
    delta=st.integers(-3, 3) | st.integers(4, 100_000) | st.integers(-20_000, 0),
)
def test_oversize_is_rejected_before_parsing(limits: Limits, seed: bytes, delta: int) -> None:
    size = max(1, limits.max_event_bytes + delta)
    raw = (seed * (size // len(seed) + 1))[:size]
    bound = size_limit(raw, limits)
    over = size > bound
    spy = JsonSpy(forbid=over)
    with mock.patch.object(contract, "json", spy):
        result = decode_payload(raw, limits)
    if over:
        assert result == Rejection("oversize", f"{size} bytes > {bound}")
        assert spy.calls == 0
    else:
        check_decoded(raw, result, limits)
        assert not (isinstance(result, Rejection) and result.reason == "oversize")
        if _is_utf8(raw):  # parsed: so the spy above is where json would be called
            assert spy.calls == 1


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("style", ["array", "object", "mixed"])
@pytest.mark.parametrize("limits", [LIMITS, BIG], ids=["default-limit", "1MiB-limit"])
def test_ten_thousand_nested_values(style: str, limits: Limits) -> None:
    raw = nested(10_000, style)
    result = check_outcome("click", raw, limits)
    over = len(raw) > size_limit(raw, limits)
    assert isinstance(result, Rejection)
    assert result.reason == ("oversize" if over else "not_json")
    # Already decoded (e.g. by a json with no recursion limit), the validators cope too.
    for kind in ALL_KINDS:
        for field in ("v", "event_id", "ts", "price", "result_item_ids", "brand"):
            value = {"event_id": "e", "user_id": "u", "ts": NOW, "item_id": "i", "query": "q",
                     "title": "t", "category": "c", field: nested_value(10_000, style)}
            check_result(kind, validate(kind, value), LIMITS)
        check_result(kind, validate(kind, nested_value(10_000, style)), LIMITS)


# ---------------------------------------------------------------------------
# Valid records, and one mutation of them
# ---------------------------------------------------------------------------
def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


@cache
def valid_events(kind: str) -> st.SearchStrategy[Event]:
    if kind == "search":
        specific: dict[str, st.SearchStrategy[Any]] = {
            "query": valid_strings,
            "result_item_ids": st.lists(valid_strings, max_size=5).map(tuple) | st.builds(
                lambda ids, n: (ids * n)[:n], st.lists(valid_strings, min_size=1, max_size=3)
                .map(tuple), st.sampled_from((LIMITS.max_list_items - 1, LIMITS.max_list_items))),
            "clicked_item_id": _optional(valid_strings),
        }
    else:
        specific = {"item_id": valid_strings, "price": _optional(valid_prices),
                    "quantity": _optional(valid_quantities)}
    return st.builds(Event, kind=st.just(kind), event_id=valid_strings, user_id=valid_strings,
                     ts=valid_ts, category=_optional(valid_strings),
                     source=_optional(valid_strings), **specific)


valid_items = st.builds(Item, item_id=valid_strings, title=valid_strings,
                        category=valid_strings, brand=st.just("") | valid_strings,
                        price=_optional(valid_prices))


@cache
def valid_records(group: str) -> st.SearchStrategy[Event | Item]:
    if group == "item":
        return valid_items
    return st.one_of(*[valid_events(kind) for kind in GROUPS[group]])



def _as_int(text: str) -> int | str:
    """An id as the integer literal it is the decimal string of, if any."""
    return int(text) if re.fullmatch(r"-?(0|[1-9][0-9]*)", text) and text != "-0" else text


@st.composite
def wire_forms(draw: st.DrawFn, record: Event | Item) -> dict[str, Any]:
    """``record.to_dict()``, or an equivalent form a producer may send: integer ids, an
    integral ``ts`` as an integer, ``"v": 1``, explicit nulls for unset optional fields."""
    out = record.to_dict()
    if draw(st.booleans()):
        out = {k: _as_int(v) if isinstance(v, str) else v for k, v in out.items()}
        if "result_item_ids" in out:
            out["result_item_ids"] = [_as_int(v) for v in out["result_item_ids"]]
    if isinstance(record, Event):
        if record.ts.is_integer() and draw(st.booleans()):
            out["ts"] = int(record.ts)
        if draw(st.booleans()):
            out["v"] = draw(st.sampled_from((1, 1.0)))
        optional = ["category", "source", "price", "quantity", "clicked_item_id"]
    else:
        optional = ["brand", "price"]
    for name in draw(st.lists(st.sampled_from(optional), max_size=2)):
        out.setdefault(name, None)
    if isinstance(record, Event) and record.kind == "search" and draw(st.booleans()):
        out.setdefault("result_item_ids", None)
    return out


DROP = object()

REQUIRED_TEXT = {"item": ("item_id", "title", "category"),
                 "search": ("event_id", "user_id", "query"),
                 "interaction": ("event_id", "user_id", "item_id")}
OPTIONAL_TEXT = {"item": ("brand",), "search": ("category", "source", "clicked_item_id"),
                 "interaction": ("category", "source")}
IGNORED = {"item": ("v", "ts", "quantity", "user_id", "event_id", "query"),
           "search": ("item_id",),
           "interaction": ("query", "result_item_ids", "clicked_item_id")}


@cache
def deep_values() -> st.SearchStrategy[Any]:
    return st.builds(nested_value, st.sampled_from((100, 990, 1_000, 10_000)),
                     st.sampled_from(("array", "object", "mixed")))


not_text = st.one_of(st.booleans(), st.floats(), st.sampled_from((7.0, -0.0, 1.5)),
                     st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                     st.integers(), max_size=2), deep_values())
not_number = st.one_of(st.booleans(), st.text(max_size=8), st.sampled_from(("9.99", "NaN")),
                       st.lists(st.floats(), max_size=2), st.just({}), deep_values())
blank = st.text(alphabet=BLANK_CHARS, max_size=600)
too_long = (st.builds(_repeat, st.sampled_from(("x", "é", "\U0001f600", " x")),
                      st.integers(LIMITS.max_string_chars + 1, 3_000))
            | st.builds(lambda sign, n: sign * 10**n, st.sampled_from((1, -1)),
                        st.integers(LIMITS.max_string_chars - 1, 2_000))
            .filter(lambda n: len(str(n)) > LIMITS.max_string_chars))
with_surrogate = st.builds(lambda a, s, b: a + s + b, st.text(max_size=4),
                           st.sampled_from(("\ud800", "\udfff", "\udc00", "\udbff")),
                           st.text(max_size=4))
bad_ts = st.one_of(st.floats(max_value=math.nextafter(MIN_TS, 0)),
                   st.floats(min_value=math.nextafter(MAX_TS, math.inf)),
                   st.integers(max_value=int(MIN_TS) - 1), st.integers(min_value=int(MAX_TS) + 1),
                   st.sampled_from((NOW * 1000, 0, -0.0, 10**400, math.inf, -math.inf, math.nan)))
bad_price = st.one_of(st.floats(max_value=-1e-300), st.floats(min_value=1e7 + 1e-6),
                      st.integers(max_value=-1), st.integers(min_value=10**7 + 1),
                      st.sampled_from((-0.01, 10**400, -(10**400), math.inf, math.nan)))
bad_quantity = st.integers(max_value=0) | st.integers(min_value=LIMITS.max_quantity + 1)
not_integer = st.one_of(not_number, st.floats(), st.sampled_from((2.0, 1.0, 1e4)))
bad_version = st.one_of(st.none(), st.booleans(), st.integers().filter(lambda v: v != 1),
                        st.floats().filter(lambda v: v != 1), st.text(max_size=3),
                        st.just([1]), st.just({"v": 1}), deep_values())
too_many = st.builds(lambda n: ["i-1"] * n, st.integers(LIMITS.max_list_items + 1, 500))
not_list = st.one_of(st.just({}), st.just(""), st.just(0), st.just(False), st.just(0.0),
                     st.booleans(), st.text(max_size=4), st.integers(), st.floats(),
                     st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))

not_object = (json_values(LIMITS, raw=False) | deep_values()).filter(
    lambda v: not isinstance(v, dict))
anything_or_drop = field_values(LIMITS, raw=False) | st.just(DROP)


def _pick(draw: st.DrawFn, rules: list[tuple[st.SearchStrategy[Any], Any]]) -> tuple[Any, Any]:
    """One (value, expected) from a list of (strategy, expected) rules."""
    strategy, expected = draw(st.sampled_from(rules))
    return draw(strategy), expected


@st.composite
def mutations(draw: st.DrawFn, group: str
              ) -> tuple[Event | Item, str, dict[str, Any], Any, Any]:
    """(valid record, its kind, a wire form of it, the wire form with one mutation, what is
    expected of that: a reason code, or an equivalent valid value whose result the mutated
    one must equal). The rule is drawn first, then the field, so every rule gets its share."""
    record = draw(valid_records(group))
    kind = "item" if isinstance(record, Item) else record.kind
    base = draw(wire_forms(record))
    roles = ["required", "optional", "number", "ignored", "not_object"]
    if kind != "item":
        roles.append("version")
    if kind == "search":
        roles.append("results")
    role = draw(st.sampled_from(roles))
    field = {
        "required": st.sampled_from(REQUIRED_TEXT[group]),
        "optional": st.sampled_from(OPTIONAL_TEXT[group]),
        "number": st.sampled_from(("price",) if kind == "item" else ("ts", "price", "quantity")),
        "ignored": st.sampled_from(IGNORED[group] + EXTRA_FIELDS),
        "not_object": st.just(""),
        "version": st.just("v"),
        "results": st.just("result_item_ids"),
    }[role]
    name = draw(field)

    def mutated(new: Any) -> dict[str, Any]:
        out = {k: v for k, v in base.items() if k != name}
        if new is not DROP:
            out[name] = new
        return out

    text_rules: list[tuple[st.SearchStrategy[Any], Any]] = [
        (not_text, "wrong_type"), (blank, "bad_value"), (too_long, "oversize"),
        (with_surrogate, "bad_value")]
    if role == "not_object":
        return record, kind, base, draw(not_object), "not_object"
    if role == "ignored":
        return record, kind, base, mutated(draw(anything_or_drop)), base
    if role == "version":
        return record, kind, base, mutated(draw(bad_version)), "unknown_version"
    if role == "required":
        new, expected = _pick(draw, [*text_rules, (st.sampled_from((None, DROP)),
                                                   "missing_field")])
    elif role == "optional":  # null means unset, like absent
        new, expected = _pick(draw, [*text_rules, (st.none(), mutated(DROP))])
    elif role == "results":
        bad, reason = _pick(draw, [*text_rules, (st.none(), "wrong_type")])
        good = draw(st.lists(wire_ids, max_size=3))
        at = draw(st.integers(0, len(good)))
        new, expected = _pick(draw, [
            (not_list, "wrong_type"), (too_many, "oversize"), (st.none(), mutated(DROP)),
            (st.just([*good[:at], bad, *good[at:]]), reason)])
    elif name == "ts":
        new, expected = _pick(draw, [(not_number, "wrong_type"), (bad_ts, "bad_value"),
                                     (st.sampled_from((None, DROP)), "missing_field")])
    elif name == "price":
        new, expected = _pick(draw, [(not_number, "wrong_type"), (bad_price, "bad_value"),
                                     (st.none(), mutated(DROP))])
    else:
        new, expected = _pick(draw, [(not_integer, "wrong_type"), (bad_quantity, "bad_value"),
                                     (st.none(), mutated(DROP))])
    return record, kind, base, mutated(new), expected


def _wire_bytes(value: Any) -> bytes | None:
    """``value`` as message bytes (NaN and infinities written as Python's json writes them:
    ``NaN``, ``Infinity``), unless nested deep enough to meet the parser's recursion limit
    or over the size limit of ``BIG``."""
    if _depth(value) > 100:
        return None
    raw = json.dumps(value).encode()
    return raw if len(raw) <= BIG.max_event_bytes else None


def _finite(value: Any) -> bool:
    return not any(isinstance(v, float) and not math.isfinite(v) for v in _walk(value))


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


@pytest.mark.parametrize("group", sorted(GROUPS))
@PROPERTY
@given(data=st.data())
def test_valid_records_round_trip_and_one_mutation_gets_its_reason(
        group: str, data: Any) -> None:
    """A valid record survives the wire; changed in one field (or replaced by a non-object)
    it gets exactly the documented reason, alone and inside an envelope."""
    record, kind, base, value, expected = data.draw(mutations(group))
    # Round trip: to_dict -> encode -> json -> validator gives the record back.
    wire = encode(record.to_dict())
    assert validate(kind, json.loads(wire)) == record
    check_result(kind, record, LIMITS)
    if len(wire) <= LIMITS.max_event_bytes:
        assert outcome(kind, wire) == [record]
    assert validate(kind, base) == record  # the producer-side variants mean the same
    # One mutation.
    result = validate(kind, value)
    check_result(kind, result, LIMITS)
    if isinstance(expected, str):
        assert isinstance(result, Rejection) and result.reason == expected, (value, result)
    else:
        assert result == validate(kind, expected)
    # The same through the wire, alone and in an envelope between two valid records: each
    # element of an envelope is validated on its own.
    raw = _wire_bytes([base, value, base])
    if raw is not None and not _finite(value):  # NaN, Infinity: not JSON, whole message
        for message in (raw, _wire_bytes(value)):
            rejected = outcome(kind, message, BIG)
            assert isinstance(rejected, Rejection) and rejected.reason == "not_json"
    elif raw is not None:
        assert outcome(kind, raw, BIG) == [record, result, record]
        alone = outcome(kind, _wire_bytes(value), BIG)
        if isinstance(value, list):  # an envelope of its own
            assert alone == ([validate(kind, v) for v in value] if value
                             else Rejection("empty", "batched envelope has no events"))
        else:
            assert alone == [result]
