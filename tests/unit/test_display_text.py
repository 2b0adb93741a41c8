"""Display text and duplicate keys, property-based: what the outsider's titles and
ambiguous objects cannot do any more."""

from __future__ import annotations

import json
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from tailstream.contract import Limits, Rejection, decode_payload, display_text

HOSTILE = st.text(alphabet=st.sampled_from(
    ["a", "b", " ", "\n", "\t", "\r", "\x1b", "[", "3", "1", "m", "]", "\x07", "\x00", "\x9b",
     "\u202e", "\u202a", "\u2066", "\u200b", "\u200f", "\ufeff", "é", "€", "日"]), max_size=60)
FORBIDDEN = set("\x1b\x07\x00\x9b\r\n\t\u202e\u202a\u2066\u200b\u200f\ufeff")


@given(st.one_of(HOSTILE, st.text(max_size=60)))
def test_display_text_never_carries_controls_escapes_or_bidi_overrides(text: str) -> None:
    shown = display_text(text)
    assert not FORBIDDEN & set(shown)
    assert all(unicodedata.category(ch)[0] != "C" for ch in shown)
    assert len(shown) <= 80 and shown == shown.strip()


def test_ansi_sequences_go_whole() -> None:
    assert display_text("\x1b[1;31mRed\x1b[0m kettle \x1b]8;;http://x\x07link\x1b]8;;\x07") \
        == "Red kettle link"


@settings(max_examples=200)
@given(st.lists(st.sampled_from(["user_id", "item_id", "ts", "x"]), min_size=2, max_size=6))
def test_an_object_with_a_key_twice_is_refused_and_one_without_is_not(keys: list[str]) -> None:
    body = "{" + ",".join(f'"{k}": {n}' for n, k in enumerate(keys)) + "}"
    decoded = decode_payload(body.encode(), Limits())
    if len(set(keys)) < len(keys):
        assert isinstance(decoded, Rejection) and decoded.reason == "not_json"
        assert "duplicate key" in decoded.detail
    else:
        assert decoded == [json.loads(body)]
