"""The event contract: ``tailstream.contract`` and ``docs/schemas/*.json`` must agree.

Every example below is checked twice: by the Python validator (accepted, or rejected
with the expected reason code) and by the JSON Schema for its kind (valid exactly when
the validator accepts it). The few rules JSON Schema cannot express are marked
``schema_can_tell=False``; for those the schema must be *looser* (accept), never stricter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

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
    validate_event,
    validate_item,
)
from tailstream.settings import Settings

SCHEMA_DIR = Path(__file__).parents[2] / "docs" / "schemas"
SCHEMA_NAMES = ("click", "cart", "fav", "purchase", "search", "item", "recommendation",
                "impression")

NOW = 1_700_000_000.0
LIMITS = Limits()
SKEW = LIMITS.max_future_skew_s
MAX_CHARS = LIMITS.max_string_chars
DROP = object()
"""Override value meaning: leave this field out."""


@cache
def schema(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMA_DIR / f"{name}.json").read_text("utf-8")))


def event(kind: str, **fields: Any) -> dict[str, Any]:
    """A valid minimal event of ``kind`` with ``fields`` overridden (``DROP`` removes)."""
    out: dict[str, Any] = {"event_id": "e-1", "user_id": "u-1", "ts": NOW - 60.0}
    if kind == "search":
        out["query"] = "red shoes"
    else:
        out["item_id"] = "i-1"
    out.update(fields)
    return {k: v for k, v in out.items() if v is not DROP}


def item(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"item_id": "i-1", "title": "Red shoe", "category": "shoes"}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not DROP}


def case(
    name: str, kind: str, value: Any, reason: str | None, *, schema_can_tell: bool = True
) -> Any:
    return pytest.param(kind, value, reason, schema_can_tell, id=f"{kind}-{name}")


# ---------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------
def common_cases(kind: str) -> Iterator[Any]:
    """Rules shared by all event kinds (click, cart, fav, purchase, search)."""
    c = kind
    # --- valid ----------------------------------------------------------
    yield case("minimal", c, event(c), None)
    yield case("v1", c, event(c, v=1), None)
    yield case("v1-float", c, event(c, v=1.0), None)
    yield case("int-ids", c, event(c, event_id=17, user_id=42), None)
    yield case("negative-int-id", c, event(c, user_id=-5), None)
    yield case("zero-int-id", c, event(c, user_id=0), None)
    yield case("int-ts", c, event(c, ts=int(NOW)), None)
    yield case("ts-min", c, event(c, ts=LIMITS.min_ts), None)
    yield case("ts-max-skew", c, event(c, ts=NOW + SKEW), None)
    yield case("max-chars", c, event(c, user_id="u" * MAX_CHARS), None)
    yield case("unicode", c, event(c, user_id="üser-ñ-日本", category="Schuhe/Größe"), None)
    yield case("price-0", c, event(c, price=0), None)
    yield case("price-max", c, event(c, price=LIMITS.max_price), None)
    yield case("price-float", c, event(c, price=19.99), None)
    yield case("quantity-1", c, event(c, quantity=1), None)
    yield case("quantity-max", c, event(c, quantity=LIMITS.max_quantity), None)
    yield case("nulls-unset", c, event(c, price=None, quantity=None, category=None,
                                       source=None), None)
    yield case("int-category", c, event(c, category=1234), None)
    yield case("full", c, event(c, v=1, category="shoes", price=49.5, quantity=2,
                                source="web"), None)
    yield case("unknown-fields", c, event(c, session="s-9", extra={"a": [1, 2]}), None)
    # --- not an object --------------------------------------------------
    for name, value in [("string", "click"), ("number", 42), ("null", None),
                        ("list", [event(c)]), ("bool", True)]:
        yield case(f"not-object-{name}", c, value, "not_object")
    # --- version --------------------------------------------------------
    for name, v in [("2", 2), ("0", 0), ("str", "1"), ("true", True), ("null", None),
                    ("1.5", 1.5)]:
        yield case(f"v-{name}", c, event(c, v=v), "unknown_version")
    # --- required fields ------------------------------------------------
    for field in ("event_id", "user_id", "ts"):
        yield case(f"missing-{field}", c, event(c, **{field: DROP}), "missing_field")
        yield case(f"null-{field}", c, event(c, **{field: None}), "missing_field")
    # --- ids / strings --------------------------------------------------
    for field in ("event_id", "user_id"):
        yield case(f"{field}-empty", c, event(c, **{field: ""}), "bad_value")
        yield case(f"{field}-blank", c, event(c, **{field: " \t\n"}), "bad_value")
        yield case(f"{field}-too-long", c, event(c, **{field: "x" * (MAX_CHARS + 1)}),
                   "oversize")
        yield case(f"{field}-bool", c, event(c, **{field: True}), "wrong_type")
        yield case(f"{field}-float", c, event(c, **{field: 1.5}), "wrong_type")
        yield case(f"{field}-list", c, event(c, **{field: ["u"]}), "wrong_type")
        yield case(f"{field}-object", c, event(c, **{field: {"id": 1}}), "wrong_type")
        # 7.0 is a float in JSON text; JSON Schema's data model cannot tell it from 7.
        yield case(f"{field}-integral-float", c, event(c, **{field: 7.0}), "wrong_type",
                   schema_can_tell=False)
    yield case("int-id-too-long", c, event(c, user_id=10**MAX_CHARS), "oversize",
               schema_can_tell=False)
    for field in ("category", "source"):
        yield case(f"{field}-empty", c, event(c, **{field: ""}), "bad_value")
        yield case(f"{field}-blank", c, event(c, **{field: "  "}), "bad_value")
        yield case(f"{field}-too-long", c, event(c, **{field: "x" * (MAX_CHARS + 1)}),
                   "oversize")
        yield case(f"{field}-bool", c, event(c, **{field: False}), "wrong_type")
        yield case(f"{field}-object", c, event(c, **{field: {}}), "wrong_type")
    # --- ts -------------------------------------------------------------
    yield case("ts-string", c, event(c, ts=str(NOW)), "wrong_type")
    yield case("ts-bool", c, event(c, ts=True), "wrong_type")
    yield case("ts-list", c, event(c, ts=[NOW]), "wrong_type")
    yield case("ts-before-2000", c, event(c, ts=LIMITS.min_ts - 0.5), "bad_value")
    yield case("ts-zero", c, event(c, ts=0), "bad_value")
    yield case("ts-negative", c, event(c, ts=-1), "bad_value")
    # The future bound depends on the clock: JSON Schema cannot express it.
    yield case("ts-far-future", c, event(c, ts=NOW + SKEW + 1), "bad_value",
               schema_can_tell=False)
    yield case("ts-milliseconds", c, event(c, ts=NOW * 1000), "bad_value",
               schema_can_tell=False)
    # --- price ----------------------------------------------------------
    yield case("price-negative", c, event(c, price=-0.01), "bad_value")
    yield case("price-too-high", c, event(c, price=LIMITS.max_price + 1), "bad_value")
    yield case("price-huge", c, event(c, price=1e300), "bad_value")
    yield case("price-bool", c, event(c, price=True), "wrong_type")
    yield case("price-string", c, event(c, price="9.99"), "wrong_type")
    # --- quantity -------------------------------------------------------
    yield case("quantity-0", c, event(c, quantity=0), "bad_value")
    yield case("quantity-negative", c, event(c, quantity=-3), "bad_value")
    yield case("quantity-too-high", c, event(c, quantity=LIMITS.max_quantity + 1), "bad_value")
    yield case("quantity-huge", c, event(c, quantity=10**30), "bad_value")
    yield case("quantity-bool", c, event(c, quantity=True), "wrong_type")
    yield case("quantity-fraction", c, event(c, quantity=1.5), "wrong_type")
    yield case("quantity-string", c, event(c, quantity="2"), "wrong_type")
    yield case("quantity-integral-float", c, event(c, quantity=2.0), "wrong_type",
               schema_can_tell=False)


def interaction_cases() -> Iterator[Any]:
    for kind in sorted(INTERACTION_KINDS):
        yield from common_cases(kind)
        yield case("int-item-id", kind, event(kind, item_id=123456789), None)
        yield case("missing-item_id", kind, event(kind, item_id=DROP), "missing_field")
        yield case("null-item_id", kind, event(kind, item_id=None), "missing_field")
        yield case("item_id-empty", kind, event(kind, item_id=""), "bad_value")
        yield case("item_id-bool", kind, event(kind, item_id=False), "wrong_type")
        yield case("item_id-too-long", kind, event(kind, item_id="i" * (MAX_CHARS + 1)),
                   "oversize")
        # Search-only fields mean nothing on an interaction and are not checked there.
        yield case("search-fields-ignored", kind, event(kind, query="", result_item_ids=7),
                   None)


def search_cases() -> Iterator[Any]:
    c = "search"
    yield from common_cases(c)
    ids = [f"i-{n}" for n in range(LIMITS.max_list_items)]
    yield case("results", c, event(c, result_item_ids=ids[:5], clicked_item_id="i-2"), None)
    yield case("results-max", c, event(c, result_item_ids=ids), None)
    yield case("results-empty", c, event(c, result_item_ids=[]), None)
    yield case("results-int-ids", c, event(c, result_item_ids=[1, 2, 3], clicked_item_id=2),
               None)
    yield case("clicked-null", c, event(c, clicked_item_id=None), None)
    yield case("query-max-chars", c, event(c, query="q" * MAX_CHARS), None)
    yield case("int-query", c, event(c, query=404), None)
    yield case("item_id-ignored", c, event(c, item_id=True), None)
    yield case("missing-query", c, event(c, query=DROP), "missing_field")
    yield case("null-query", c, event(c, query=None), "missing_field")
    yield case("query-empty", c, event(c, query=""), "bad_value")
    yield case("query-blank", c, event(c, query="   "), "bad_value")
    yield case("query-too-long", c, event(c, query="q" * (MAX_CHARS + 1)), "oversize")
    yield case("query-bool", c, event(c, query=True), "wrong_type")
    yield case("results-too-many", c, event(c, result_item_ids=[*ids, "i-x"]), "oversize")
    yield case("results-string", c, event(c, result_item_ids="i-1"), "wrong_type")
    yield case("results-object", c, event(c, result_item_ids={"i-1": 1}), "wrong_type")
    # Unlike the other optional fields, null is not "unset" here.
    yield case("results-null", c, event(c, result_item_ids=None), None)
    yield case("results-null-element", c, event(c, result_item_ids=["i-1", None]),
               "wrong_type")
    yield case("results-bool-element", c, event(c, result_item_ids=[True]), "wrong_type")
    yield case("results-empty-element", c, event(c, result_item_ids=["i-1", ""]), "bad_value")
    yield case("results-long-element", c, event(c, result_item_ids=["i" * (MAX_CHARS + 1)]),
               "oversize")
    yield case("clicked-empty", c, event(c, clicked_item_id=""), "bad_value")
    yield case("clicked-bool", c, event(c, clicked_item_id=True), "wrong_type")


def item_cases() -> Iterator[Any]:
    c = "item"
    yield case("minimal", c, item(), None)
    yield case("full", c, item(brand="Acme", price=59.0), None)
    yield case("int-id", c, item(item_id=987654321), None)
    yield case("nulls-unset", c, item(brand=None, price=None), None)
    yield case("price-0", c, item(price=0), None)
    yield case("price-max", c, item(price=LIMITS.max_price), None)
    yield case("unknown-fields", c, item(image_url="https://example.com/1.jpg", tags=["a"]),
               None)
    yield case("not-object", c, ["i-1", "Red shoe"], "not_object")
    for field in ("item_id", "title", "category"):
        yield case(f"missing-{field}", c, item(**{field: DROP}), "missing_field")
        yield case(f"null-{field}", c, item(**{field: None}), "missing_field")
        yield case(f"{field}-empty", c, item(**{field: ""}), "bad_value")
        yield case(f"{field}-bool", c, item(**{field: True}), "wrong_type")
        yield case(f"{field}-too-long", c, item(**{field: "x" * (MAX_CHARS + 1)}), "oversize")
    yield case("brand-empty", c, item(brand=""), "bad_value")
    yield case("brand-list", c, item(brand=["Acme"]), "wrong_type")
    yield case("price-negative", c, item(price=-1), "bad_value")
    yield case("price-too-high", c, item(price=2e7), "bad_value")
    yield case("price-bool", c, item(price=False), "wrong_type")
    yield case("price-string", c, item(price="59"), "wrong_type")


ALL_CASES = [*interaction_cases(), *search_cases(), *item_cases()]


def check(kind: str, value: Any) -> Event | Item:
    if kind == "item":
        return validate_item(value, LIMITS)
    return validate_event(kind, value, LIMITS, now=NOW)


# ---------------------------------------------------------------------------
# Validator and schema agree
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "value", "reason", "schema_can_tell"), ALL_CASES)
def test_example(kind: str, value: Any, reason: str | None, schema_can_tell: bool) -> None:
    if reason is None:
        check(kind, value)
    else:
        with pytest.raises(InvalidEvent) as info:
            check(kind, value)
        assert info.value.reason == reason, info.value.detail

    errors = [e.message for e in schema(kind).iter_errors(value)]
    if schema_can_tell:
        assert (not errors) == (reason is None), errors or "schema accepts it"
    else:
        # A rule the schema cannot express: it must then be looser, never stricter.
        assert not errors, errors


@pytest.mark.parametrize(
    ("kind", "value"),
    [pytest.param(k, v, id=p.id) for p in ALL_CASES for (k, v, r, _) in [p.values] if r is None],
)
def test_valid_example_survives_the_wire(kind: str, value: Any) -> None:
    """encode → decode_payload → validate gives the same record; to_dict is schema-valid."""
    direct = check(kind, value)
    decoded = decode_payload(encode(value), LIMITS)
    assert isinstance(decoded, list) and len(decoded) == 1
    assert check(kind, decoded[0]) == direct
    if isinstance(direct, Item) and not direct.brand:
        return  # Item.to_dict() writes brand "" (see test_brandless_item_to_dict_round_trips)
    wire = direct.to_dict()
    assert not list(schema(kind).iter_errors(wire))
    assert check(kind, wire) == direct


def test_integer_ids_are_normalised_to_strings() -> None:
    ev = validate_event("search", event("search", event_id=1, user_id=-2, query=3,
                                        result_item_ids=[4, "5"], clicked_item_id=6,
                                        category=7, source=8), LIMITS, now=NOW)
    assert (ev.event_id, ev.user_id, ev.query, ev.clicked_item_id) == ("1", "-2", "3", "6")
    assert ev.result_item_ids == ("4", "5")
    assert (ev.category, ev.source) == ("7", "8")
    click = validate_event("click", event("click", item_id=123456789012345678901234567890),
                           LIMITS, now=NOW)
    assert click.item_id == "123456789012345678901234567890"
    it = validate_item(item(item_id=99, brand=5), LIMITS)
    assert (it.item_id, it.brand) == ("99", "5")


def test_unset_optional_fields() -> None:
    ev = validate_event("purchase", event("purchase", price=None, quantity=None), LIMITS,
                        now=NOW)
    assert (ev.price, ev.quantity, ev.category, ev.source) == (None, None, None, None)
    assert ev.to_dict() == {"event_id": "e-1", "user_id": "u-1", "ts": NOW - 60.0,
                            "item_id": "i-1"}
    assert validate_item(item(brand=None), LIMITS).brand == ""


def test_unknown_kind() -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_event("view", event("click"), LIMITS, now=NOW)
    assert info.value.reason == "unknown_kind"


# ---------------------------------------------------------------------------
# Decoding raw message bytes
# ---------------------------------------------------------------------------
def raw_event(kind: str = "click", **fields: Any) -> bytes:
    return encode(event(kind, **fields))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(None, "empty", id="no-value"),
        pytest.param(b"", "empty", id="empty-bytes"),
        pytest.param(b"   ", "not_json", id="whitespace"),
        pytest.param(b"not json", "not_json", id="text"),
        pytest.param(raw_event()[:-1], "not_json", id="truncated"),
        pytest.param(b"\xff\xfe{\x00", "not_json", id="not-utf8"),
        pytest.param(b'{"ts": NaN}', "not_json", id="nan"),
        pytest.param(b'{"ts": Infinity}', "not_json", id="infinity"),
        pytest.param(b'{"ts": -Infinity}', "not_json", id="minus-infinity"),
        pytest.param(b'[{"event_id": "e", "price": NaN}]', "not_json", id="nan-in-batch"),
        pytest.param(b"{'event_id': 'e'}", "not_json", id="single-quotes"),
        pytest.param(b'{"a": 1,}', "not_json", id="trailing-comma"),
        pytest.param(b"[" * 600_000 + b"]" * 600_000, "oversize", id="deep-nesting-oversize"),
        pytest.param(b"[" * 10_000 + b"]" * 10_000, "not_json", id="deep-nesting-envelope"),
        pytest.param(b"[" * 8_000 + b"]" * 8_000, "not_json", id="deep-nesting"),
        pytest.param(b'{"n": ' + b"9" * 5_000 + b"}", "not_json", id="5000-digit-int"),
        pytest.param(
            encode(event("click", pad="x" * LIMITS.max_event_bytes)), "oversize", id="oversize"
        ),
    ],
)
def test_decode_rejects(raw: bytes | None, reason: str) -> None:
    result = decode_payload(raw, LIMITS)
    assert isinstance(result, Rejection), result
    assert result.reason == reason


def test_size_limit_is_inclusive_and_checked_before_parsing() -> None:
    base = raw_event()
    pad = LIMITS.max_event_bytes - len(base) - len(b',"pad":""')
    at_limit = raw_event(pad="x" * pad)
    assert len(at_limit) == LIMITS.max_event_bytes
    decoded = decode_payload(at_limit, LIMITS)
    assert isinstance(decoded, list)
    validate_event("click", decoded[0], LIMITS, now=NOW)
    over = raw_event(pad="x" * (pad + 1))
    assert decode_payload(over, LIMITS) == Rejection(
        "oversize", f"{len(over)} bytes > {LIMITS.max_event_bytes}")
    # Counted in bytes, not characters.
    multibyte = raw_event(pad="é" * (pad // 2 + 1))
    assert len(multibyte.decode()) < LIMITS.max_event_bytes < len(multibyte)
    assert isinstance(decode_payload(multibyte, LIMITS), Rejection)
    # A smaller configured limit applies.
    assert decode_payload(base, Limits(max_event_bytes=10)) == Rejection(
        "oversize", f"{len(base)} bytes > 10")


def test_overflowing_float_literal_is_not_finite() -> None:
    # Python parses 1e999 as inf; the validator must not let it through.
    decoded = decode_payload(b'{"event_id":"e","user_id":"u","ts":1e999,"item_id":"i"}', LIMITS)
    assert isinstance(decoded, list)
    with pytest.raises(InvalidEvent) as info:
        validate_event("click", decoded[0], LIMITS, now=NOW)
    assert info.value.reason == "bad_value"


def test_single_object_decodes_to_one_value() -> None:
    assert decode_payload(raw_event(), LIMITS) == [event("click")]


def test_batched_envelope_validates_each_element_separately() -> None:
    good = [event("click", event_id=f"e-{n}", item_id=f"i-{n}") for n in range(3)]
    bad = event("click", event_id="e-bad", price=-1)
    raw = json.dumps([good[0], bad, good[1], "junk", good[2]]).encode()
    values = decode_payload(raw, LIMITS)
    assert isinstance(values, list) and len(values) == 5

    accepted: list[Event] = []
    reasons: list[str] = []
    for value in values:
        try:
            accepted.append(validate_event("click", value, LIMITS, now=NOW))
        except InvalidEvent as exc:
            reasons.append(exc.reason)
    assert [e.event_id for e in accepted] == ["e-0", "e-1", "e-2"]
    assert reasons == ["bad_value", "not_object"]
    # Each element is what the per-kind schema describes.
    assert [schema("click").is_valid(v) for v in values] == [True, False, True, False, True]


def test_batched_envelope_edge_cases() -> None:
    # An empty batch is refused: a producer sending nothing has a bug worth seeing.
    empty = decode_payload(b"[]", LIMITS)
    assert isinstance(empty, Rejection) and empty.reason == "empty"
    # Envelopes do not nest: an inner list is one element that is not an object.
    values = decode_payload(encode([[event("click")]]), LIMITS)  # type: ignore[list-item]
    assert isinstance(values, list) and len(values) == 1
    with pytest.raises(InvalidEvent) as info:
        validate_event("click", values[0], LIMITS, now=NOW)
    assert info.value.reason == "not_object"
    # An envelope may exceed one event's bound, up to its own bounds.
    many = encode([event("click", event_id=f"e-{n}") for n in range(500)])
    assert LIMITS.max_event_bytes < len(many) <= LIMITS.max_envelope_bytes
    ok = decode_payload(many, LIMITS)
    assert isinstance(ok, list) and len(ok) == 500
    too_many = encode([event("click", event_id=f"e-{n}") for n in range(1001)])
    result = decode_payload(too_many, LIMITS)
    assert isinstance(result, Rejection) and result.reason == "oversize"
    # Bigger than an envelope may be: refused before parsing.
    huge = b"[" + b" " * LIMITS.max_envelope_bytes + b"]"
    result = decode_payload(huge, LIMITS)
    assert isinstance(result, Rejection) and result.reason == "oversize"
    # One fat event wrapped in an array gains nothing: the average bound still holds.
    fat = encode([event("click", pad="x" * (LIMITS.max_event_bytes + 10))])
    result = decode_payload(fat, LIMITS)
    assert isinstance(result, Rejection) and result.reason == "oversize"


# ---------------------------------------------------------------------------
# Regressions: cases that once crashed or were wrongly accepted.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["ts", "price"])
def test_huge_integer_number_is_rejected_not_a_crash(field: str) -> None:
    huge = b"9" * 400  # a legal JSON integer, well under the size limit
    ts = huge if field == "ts" else b"1699999000"
    price = huge if field == "price" else b"1"
    raw = b'{"event_id":"e","user_id":"u","item_id":"i","ts":%s,"price":%s}' % (ts, price)
    decoded = decode_payload(raw, LIMITS)
    assert isinstance(decoded, list)
    with pytest.raises(InvalidEvent) as info:
        validate_event("click", decoded[0], LIMITS, now=NOW)
    assert info.value.reason == "bad_value"


def test_brandless_item_to_dict_round_trips() -> None:
    it = validate_item(item(), LIMITS)
    assert validate_item(it.to_dict(), LIMITS) == it


def test_lone_surrogate_is_rejected() -> None:
    raw = b'{"event_id":"e","user_id":"\\ud800","ts":1699999000,"item_id":"i"}'
    decoded = decode_payload(raw, LIMITS)
    if isinstance(decoded, Rejection):
        return
    try:
        ev = validate_event("click", decoded[0], LIMITS, now=NOW)
    except InvalidEvent:
        return
    encode(ev.to_dict())  # raises UnicodeEncodeError today
    pytest.fail("accepted a string that is not valid Unicode")


# ---------------------------------------------------------------------------
# The schema files themselves
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_valid_draft_2020_12_and_open(name: str) -> None:
    doc = json.loads((SCHEMA_DIR / f"{name}.json").read_text("utf-8"))
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(doc)
    assert doc["type"] == "object"
    # Forward compatibility: unknown fields are allowed.
    assert doc.get("additionalProperties", True) is True
    assert schema(name).is_valid({**_valid_example(name), "some_future_field": {"x": 1}})


def _valid_example(name: str) -> dict[str, Any]:
    if name == "item":
        return item()
    if name == "recommendation":
        return recommendation()
    if name == "impression":
        return impression()
    return event(name)


def test_schema_bounds_match_limits() -> None:
    """The numbers in the schema files are the defaults of Limits and Settings."""
    s = Settings()
    assert (LIMITS.max_event_bytes, LIMITS.max_string_chars, LIMITS.max_future_skew_s) == (
        s.max_event_bytes, s.max_string_chars, s.max_future_skew_s)
    for kind in (*sorted(EVENT_KINDS), "item"):
        doc = json.loads((SCHEMA_DIR / f"{kind}.json").read_text("utf-8"))
        text = doc["$defs"]["text"]["anyOf"][0]
        assert text["maxLength"] == LIMITS.max_string_chars
        props = doc["properties"]
        assert props["price"]["minimum"] == 0
        assert props["price"]["maximum"] == LIMITS.max_price
        if kind == "item":
            continue
        assert props["v"]["const"] == contract.SCHEMA_VERSION
        assert props["ts"]["minimum"] == LIMITS.min_ts
        assert props["quantity"]["maximum"] == LIMITS.max_quantity
    search = json.loads((SCHEMA_DIR / "search.json").read_text("utf-8"))
    assert search["properties"]["result_item_ids"]["maxItems"] == LIMITS.max_list_items


def test_every_event_kind_has_a_schema() -> None:
    assert {p.stem for p in SCHEMA_DIR.glob("*.json")} == set(SCHEMA_NAMES)
    assert set(SCHEMA_NAMES) == {*EVENT_KINDS, "item", "recommendation", "impression"}


# ---------------------------------------------------------------------------
# Output: recommendation.json
# ---------------------------------------------------------------------------
def recommendation(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "user_id": "u-1",
        "items": [
            {"item_id": "i-9", "score": 0.92, "rank": 1, "tier": "head",
             "reason": "popular in shoes", "category": "shoes"},
            {"item_id": "i-4", "score": 0.5, "rank": 2, "tier": "tail",
             "reason": "similar to items you viewed", "category": None},
        ],
        "model_version": "2024-06-01T12:00:00Z-3",
        "generated_at": NOW,
        "trigger": "event",
        "event_id": "e-1",
        "event_ts": NOW - 1.5,
        "published_at": NOW + 0.01,
    }
    out.update(fields)
    return {k: v for k, v in out.items() if v is not DROP}


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        pytest.param(recommendation(), True, id="event"),
        pytest.param(recommendation(trigger="promotion", event_id=None, event_ts=None), True,
                     id="promotion"),
        pytest.param(recommendation(items=[]), True, id="empty-list"),
        pytest.param(recommendation(items=[{"item_id": "i", "score": 1, "rank": 1,
                                            "tier": "torso", "reason": "r",
                                            "category": "c", "extra": 1}]),
                     True, id="item-extra-field"),
        pytest.param(recommendation(model_version=DROP), False, id="missing-model_version"),
        pytest.param(recommendation(event_id=DROP), False, id="missing-event_id"),
        pytest.param(recommendation(generated_at="now"), False, id="generated_at-string"),
        pytest.param(recommendation(items=[{"item_id": "i", "score": 1, "rank": 1,
                                            "tier": "long", "reason": "r",
                                            "category": None}]),
                     False, id="bad-tier"),
        pytest.param(recommendation(items=[{"item_id": "i", "score": 1, "rank": 1.5,
                                            "tier": "tail", "reason": "r",
                                            "category": None}]),
                     False, id="fractional-rank"),
        pytest.param(recommendation(items=[{"item_id": "i", "score": 1, "rank": 0,
                                            "tier": "tail", "reason": "r",
                                            "category": None}]),
                     False, id="rank-0"),
        pytest.param(recommendation(items=[{"item_id": "i", "score": "high", "rank": 1,
                                            "tier": "tail", "reason": "r",
                                            "category": None}]),
                     False, id="string-score"),
    ],
)
def test_recommendation_schema(value: dict[str, Any], valid: bool) -> None:
    assert schema("recommendation").is_valid(value) is valid


# ---------------------------------------------------------------------------
# Output: impression.json
# ---------------------------------------------------------------------------
def impression() -> dict[str, Any]:
    """What the worker writes for a published list (Impression.to_json)."""
    from tailstream.streams.stores.impressions import Impression

    return dict(json.loads(Impression("u-1", "00ff00ff00ff00ff", "v00002", "canary", "hybrid",
                                      "event", NOW, ("i-9", "i-4"), ("head", "tail"))
                           .to_json()))


def test_impression_records_match_their_schema() -> None:
    assert schema("impression").is_valid(impression())
    assert not schema("impression").is_valid({**impression(), "arm": "other"})
    bad = impression()
    bad["items"][0]["position"] = 0
    assert not schema("impression").is_valid(bad)
