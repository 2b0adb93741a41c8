"""The msgspec fast path of ``decode_payload`` gives exactly what the strict ``json`` path
gives (same values, same types, same rejections), on hostile input too: it answers only
when it can prove the strict path would accept, and otherwise the strict path decides."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tailstream import contract
from tailstream.contract import Limits, decode_payload

LIMITS = Limits()
TIGHT = Limits(max_event_bytes=300, max_envelope_events=3)

keys = st.text(min_size=0, max_size=6)
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
events = st.dictionaries(st.sampled_from(["event_id", "user_id", "ts", "item_id", "q", "a:b"]),
                         values, max_size=6)


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    """JSON messages (objects, envelopes, scalars), then hostile edits: a repeated key, a
    colon inside a string, NaN, a huge integer, a BOM, a bad byte, truncation."""
    value = draw(st.one_of(events, st.lists(events, max_size=5), values))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()),
                      separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
    edit = draw(st.sampled_from(["none", "dup", "colon", "nan", "bigint", "bom", "byte",
                                 "cut", "space"]))
    if edit == "dup" and text.startswith("{") and len(text) > 2:
        text = '{"k": 1, "k": 2, ' + text[1:] if text != "{}" else '{"k": 1, "k": 2}'
    elif edit == "colon":
        text = text.replace('"', '"x:', 1)
    elif edit == "nan":
        text = text.replace("null", "NaN", 1)
    elif edit == "bigint":
        text = text.replace("null", "9" * draw(st.integers(19, 5000)), 1)
    elif edit == "space":
        text = " \n" + text + "\t "
    raw = text.encode()
    if edit == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif edit == "byte":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\x01"])) + raw[at:]
    elif edit == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    return raw


def same(a: Any, b: Any) -> bool:
    """Equal values of the same types, all the way down (1 and 1.0 differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or repr(a) == repr(b)
    return bool(a == b)


@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=raw_messages(), limits=st.sampled_from([LIMITS, TIGHT]))
def test_the_fast_path_agrees_with_the_strict_path(raw: bytes, limits: Limits,
                                                   ) -> None:
    fast = decode_payload(raw, limits)
    original = contract._decode_fast
    try:
        contract._decode_fast = lambda r, lim: None  # the strict path alone
        strict = decode_payload(raw, limits)
    finally:
        contract._decode_fast = original
    assert same(fast, strict), (raw[:200], fast, strict)


@pytest.mark.parametrize("raw", [
    b'{"a":1,"a":2}', b'{"a":{"b":1,"b":2}}', b'[{"a":1},{"a":1,"a":2}]',
    b'{"a":"\\u003a","a":1}', b'{"\\u0061":1,"a":2}', b'{"a":NaN}', b'\xef\xbb\xbf{"a":1}',
    b'{"a":' + b"9" * 4301 + b'}', b'{"a":1e400}', b'[' * 5000 + b']' * 5000,
])
def test_hostile_messages_take_the_strict_path(raw: bytes) -> None:
    assert contract._decode_fast(raw, LIMITS) is None


def test_plain_events_and_envelopes_take_the_fast_path() -> None:
    one = b'{"event_id":"e1","user_id":"u1","ts":1.7e9,"item_id":"i1"}'
    assert contract._decode_fast(one, LIMITS) == [json.loads(one)]
    envelope = b"[" + b",".join([one] * 3) + b"]"
    assert contract._decode_fast(envelope, LIMITS) == json.loads(envelope)
