"""The event contract: what may be written to tailstream's topics, and the decoder
that turns raw message bytes into a validated :class:`Event` or a :class:`Rejection`.

Shared by producers (which build events) and streams (which validate them), so the
two never disagree. The JSON Schema files in ``docs/schemas/`` describe the same
contract for non-Python producers; ``tests/unit/test_contract.py`` checks they agree.

Size limits are enforced *before* parsing so hostile input cannot make the
decoder allocate without bound.
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

SCHEMA_VERSION = 1
"""Current event schema version (field ``v``; absent means 1)."""

# --------------------------------------------------------------------------- vocabulary
# The one definition of the event classes; every other module imports these.
CLASSES: tuple[str, ...] = ("click", "cart", "fav", "purchase")
"""The interaction classes, in the order of every per-class vector (counts, weights, the
outcome head's logits). A typical shop's mix: click ≫ cart > fav > purchase."""
RARE_CLASSES: tuple[str, ...] = CLASSES[1:]
"""Every class but the click: the outcomes the imbalance loop exists for."""
TRANSACTION_CLASSES: tuple[str, ...] = (CLASSES[1], CLASSES[3])
"""Cart and purchase: the classes that commit money (their events carry the price paid;
the promotion gate guards their recall by default)."""
SEARCH = "search"
EVENT_KINDS: tuple[str, ...] = (*CLASSES, SEARCH)
"""Kinds of user events; each has its own input topic."""
CATALOGUE = "item"
"""Kind of the catalogue records (the compacted ``items`` topic)."""
INTERACTION_KINDS: frozenset[str] = frozenset(CLASSES)
TIERS: tuple[str, ...] = ("head", "torso", "tail")
"""Item popularity tiers: the head holds the most interactions, the tail the fewest."""
TAIL = "tail"


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied by the decoder (taken from :class:`~tailstream.settings.Settings`)."""

    max_event_bytes: int = 16_384
    max_envelope_bytes: int = 1_048_576
    max_envelope_events: int = 1000
    max_string_chars: int = 512
    max_list_items: int = 100
    max_future_skew_s: float = 86_400.0
    min_ts: float = 946_684_800.0  # 2000-01-01: older stamps are almost surely a unit bug
    max_price: float = 1e7
    max_quantity: int = 10_000


@dataclass(frozen=True, slots=True)
class Event:
    """A validated user event. ``kind`` is one of :data:`EVENT_KINDS`."""

    kind: str
    event_id: str
    user_id: str
    ts: float
    item_id: str | None = None
    category: str | None = None
    price: float | None = None
    quantity: int | None = None
    source: str | None = None
    query: str | None = None
    result_item_ids: tuple[str, ...] = ()
    clicked_item_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire form (optional fields left out when unset)."""
        out: dict[str, Any] = {"event_id": self.event_id, "user_id": self.user_id, "ts": self.ts}
        for name in ("item_id", "category", "price", "quantity", "source", "query",
                     "clicked_item_id"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.result_item_ids:
            out["result_item_ids"] = list(self.result_item_ids)
        return out


@dataclass(frozen=True, slots=True)
class Item:
    """A catalogue record from the ``items`` topic (compacted, key = item_id)."""

    item_id: str
    title: str
    category: str
    brand: str = ""
    price: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "title": self.title,
                               "category": self.category}
        if self.brand:
            out["brand"] = self.brand
        if self.price is not None:
            out["price"] = self.price
        return out


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was refused. ``reason`` is a short, low-cardinality code."""

    reason: str
    detail: str = ""


class InvalidEvent(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------
def decode_payload(raw: bytes | None, limits: Limits) -> list[Any] | Rejection:
    """Parse message bytes into one or more JSON values.

    A JSON array is a *batched envelope*: each element is one event.

    >>> decode_payload(b'{"a": 1}', Limits())
    [{'a': 1}]
    >>> decode_payload(b'not json', Limits()).reason
    'not_json'
    >>> decode_payload(b'{"user_id": "a", "user_id": "b"}', Limits()).detail
    "duplicate key 'user_id'"
    """
    if not raw:
        return Rejection("empty", "message has no value")
    limit = size_limit(raw, limits)
    if len(raw) > limit:
        return Rejection("oversize", f"{len(raw)} bytes > {limit}")
    fast = _decode_fast(raw, limits)
    if fast is not None:
        return fast
    try:
        # Decode strictly first: json.loads(bytes) also accepts UTF-16/32 and decodes with
        # "surrogatepass", so invalid UTF-8 (encoded lone surrogates) got through. The
        # contract is UTF-8 only; a leading BOM is still ignored, as before.
        text = raw.decode("utf-8-sig")
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return Rejection("not_json", str(exc)[:200])
    if isinstance(value, list):
        if not value:
            return Rejection("empty", "batched envelope has no events")
        if len(value) > limits.max_envelope_events:
            return Rejection("oversize", f"envelope of {len(value)} events > "
                                         f"{limits.max_envelope_events}")
        if len(raw) > limits.max_event_bytes * len(value):
            return Rejection("oversize", f"envelope of {len(raw)} bytes for {len(value)} events")
        return value
    return [value]


_FAST_DECODER = msgspec.json.Decoder()


def _decode_fast(raw: bytes, limits: Limits) -> list[Any] | None:
    """The values of a message the contract accepts, decoded by msgspec (about 4× faster
    than the strict ``json`` path), or None: then the strict path decides, and gives the
    reason. msgspec is at least as strict as that path (UTF-8 only, no NaN/Infinity, no
    control characters in strings, no trailing data) but keeps the last of duplicate
    keys; a duplicate would leave fewer keys than the message has ``:`` bytes, so a
    message whose ``:`` bytes are not exactly its objects' keys (a colon inside a string
    too) goes the strict way. Only objects and non-empty envelopes within the limits are
    answered here; everything else, valid or not, takes the strict path.

    >>> _decode_fast(b'{"a": 1, "b": [2]}', Limits())
    [{'a': 1, 'b': [2]}]
    >>> _decode_fast(b'{"a": 1, "a": 2}', Limits()) is None   # duplicate: strict path
    True
    >>> _decode_fast(b'{"q": "a:b"}', Limits()) is None       # a colon in a string
    True
    """
    try:
        value = _FAST_DECODER.decode(raw)
    except (msgspec.MsgspecError, RecursionError, ValueError):  # the strict path says why
        return None
    colons = raw.count(b":")
    if type(value) is dict:
        return [value] if colons == len(value) else None
    if type(value) is not list or not value or len(value) > limits.max_envelope_events \
            or len(raw) > limits.max_event_bytes * len(value):
        return None
    keys = 0
    for element in value:
        if type(element) is dict:
            keys += len(element)
    return value if colons == keys else None


def size_limit(raw: bytes, limits: Limits) -> int:
    """The byte bound a message is held to *before* parsing: ``max_event_bytes``, or
    ``max_envelope_bytes`` for a batched envelope (a JSON array). After parsing, an
    envelope must also average at most ``max_event_bytes`` per event and hold at most
    ``max_envelope_events``.

    >>> big = b' [' + b'{"a": 1},' * 2000 + b'{"a": 1}]'
    >>> size_limit(b'{"a": 1}', Limits()), size_limit(big, Limits())
    (16384, 1048576)
    """
    if len(raw) > limits.max_event_bytes and raw.lstrip()[:1] == b"[":
        return max(limits.max_event_bytes, limits.max_envelope_bytes)
    return limits.max_event_bytes


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A key given twice is ambiguous: parsers disagree on which value wins (Python keeps the
    # last, others the first), so a validator and a downstream reader could see different
    # events. Refused as not JSON this contract accepts.
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {twice[:40]!r}")
    return out


def _reject_constant(name: str) -> Any:
    # NaN / Infinity are not JSON; Python's json accepts them by default.
    raise ValueError(f"non-standard JSON constant {name}")


def validate_event(kind: str, value: Any, limits: Limits, now: float | None = None) -> Event:
    """Check one decoded JSON value against the contract for ``kind``.

    Raises :class:`InvalidEvent` with a reason code on the first problem.

    >>> validate_event("click", {"event_id": "e1", "user_id": "u1", "ts": 1.7e9,
    ...                          "item_id": "i9"}, Limits()).item_id
    'i9'
    >>> try:
    ...     validate_event("click", {"event_id": "e1", "user_id": "u1", "ts": 1.7e9}, Limits())
    ... except InvalidEvent as e:
    ...     print(e.reason)
    missing_field
    """
    if kind not in EVENT_KINDS:
        raise InvalidEvent("unknown_kind", kind)
    if not isinstance(value, dict):
        raise InvalidEvent("not_object", type(value).__name__)
    version = value.get("v", SCHEMA_VERSION)
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidEvent("unknown_version", _describe(version))
    event_id = _req_str(value, "event_id", limits)
    user_id = _req_str(value, "user_id", limits)
    ts = _req_number(value, "ts")
    now = time.time() if now is None else now
    if ts < limits.min_ts or ts > now + limits.max_future_skew_s:
        raise InvalidEvent("bad_value", f"ts {ts} outside [{limits.min_ts}, now+skew]")
    price = _opt_number(value, "price")
    if price is not None and not (0 <= price <= limits.max_price):
        raise InvalidEvent("bad_value", f"price {price}")
    quantity = value.get("quantity")
    if quantity is not None:
        if not isinstance(quantity, int) or isinstance(quantity, bool):
            raise InvalidEvent("wrong_type", "quantity must be an integer")
        if not 1 <= quantity <= limits.max_quantity:
            raise InvalidEvent("bad_value", f"quantity {quantity}")
    source = _opt_str(value, "source", limits)
    category = _opt_str(value, "category", limits)
    if kind == "search":
        query = _req_str(value, "query", limits)
        results = value.get("result_item_ids")
        if results is None:  # absent or null: no results. (`or []` let {}, "", 0, false in)
            results = []
        if not isinstance(results, list):
            raise InvalidEvent("wrong_type", "result_item_ids must be a list")
        if len(results) > limits.max_list_items:
            raise InvalidEvent("oversize", f"result_item_ids has {len(results)} items")
        result_ids = tuple(_as_id(r, "result_item_ids", limits) for r in results)
        clicked = _opt_str(value, "clicked_item_id", limits)
        return Event(kind, event_id, user_id, ts, query=query, result_item_ids=result_ids,
                     clicked_item_id=clicked, source=source, category=category)
    item_id = _req_str(value, "item_id", limits)
    return Event(kind, event_id, user_id, ts, item_id=item_id, category=category, price=price,
                 quantity=quantity, source=source)


def validate_item(value: Any, limits: Limits) -> Item:
    """Check a catalogue record.

    >>> validate_item({"item_id": "i1", "title": "Red shoe", "category": "shoes"}, Limits()).title
    'Red shoe'
    """
    if not isinstance(value, dict):
        raise InvalidEvent("not_object", type(value).__name__)
    price = _opt_number(value, "price")
    if price is not None and not (0 <= price <= limits.max_price):
        raise InvalidEvent("bad_value", f"price {price}")
    return Item(
        item_id=_req_str(value, "item_id", limits),
        title=_req_str(value, "title", limits),
        category=_req_str(value, "category", limits),
        brand=_opt_str(value, "brand", limits) or "",
        price=price,
    )


def _describe(value: Any) -> str:
    # Not repr() of a list or object: repr() recurses once per level, as the parser does, so
    # a value nested just shallowly enough to be parsed could make it raise RecursionError.
    if value is None or isinstance(value, bool | int | float | str):
        return repr(value)[:40]
    return type(value).__name__


def _req_str(value: dict[str, Any], name: str, limits: Limits) -> str:
    if name not in value or value[name] is None:
        raise InvalidEvent("missing_field", name)
    return _as_id(value[name], name, limits)


def _opt_str(value: dict[str, Any], name: str, limits: Limits) -> str | None:
    if value.get(name) is None:
        return None
    return _as_id(value[name], name, limits)


def _as_id(raw: Any, name: str, limits: Limits) -> str:
    # Integer ids are common in real logs (Taobao); they are normalised to strings.
    if isinstance(raw, bool):
        raise InvalidEvent("wrong_type", f"{name} must be a string")
    if isinstance(raw, int):
        raw = str(raw)
    if not isinstance(raw, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string")
    if not raw or not raw.strip():
        raise InvalidEvent("bad_value", f"{name} is empty")
    if len(raw) > limits.max_string_chars:
        raise InvalidEvent("oversize", f"{name} has {len(raw)} chars")
    if not raw.isascii():
        try:  # lone surrogates survive json.loads but break every later encode
            raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEvent("bad_value", f"{name} is not valid unicode") from exc
    return raw


def _req_number(value: dict[str, Any], name: str) -> float:
    if name not in value or value[name] is None:
        raise InvalidEvent("missing_field", name)
    out = _opt_number(value, name)
    assert out is not None
    return out


def _opt_number(value: dict[str, Any], name: str) -> float | None:
    raw = value.get(name)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidEvent("wrong_type", f"{name} must be a number")
    try:
        out = float(raw)
    except OverflowError as exc:  # a 400-digit integer literal is legal JSON
        raise InvalidEvent("bad_value", f"{name} is out of range") from exc
    if not math.isfinite(out):
        raise InvalidEvent("bad_value", f"{name} is not finite")
    return out


_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"        # ANSI CSI sequences (colours, cursor moves)
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?")  # ANSI OSC sequences (titles, hyperlinks)


def display_text(text: str, limit: int = 80) -> str:
    r"""``text`` safe to show a user: no control characters, ANSI escapes, bidi overrides or
    zero-width characters (an item title can carry any of them), whitespace collapsed, at
    most ``limit`` characters.

    >>> display_text("Red \x1b[31mmug\x1b[0m\u202e evil\nline")
    'Red mug evil line'
    """
    # Then every character of Unicode's "other" categories goes: controls (C0, C1), format
    # characters (bidi overrides, zero-width joiners, the BOM), surrogates, private use.
    visible = "".join(ch if unicodedata.category(ch)[0] != "C" else " "
                      for ch in _ESCAPES.sub("", text))
    return " ".join(visible.split())[:limit]


# ---------------------------------------------------------------------------
# Encoding (producers)
# ---------------------------------------------------------------------------
def new_event_id() -> str:
    return uuid.uuid4().hex


def encode(value: dict[str, Any] | list[dict[str, Any]]) -> bytes:
    """Compact JSON bytes for the wire."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
