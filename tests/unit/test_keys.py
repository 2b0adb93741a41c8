"""No id can reach another's Redis key (the outsider's D3: user ``victim:meta`` overwrote the
list metadata of ``victim``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tailstream.redis_io import Keys

IDS = st.text(min_size=1, max_size=40)
NAMED = ("recs", "meta", "seen", "minority", "reservoir", "text_vectors")


def keys_of(k: Keys, name: str) -> dict[str, str]:
    return {kind: getattr(k, kind)(name) for kind in NAMED}


def test_the_outsiders_collision_is_gone() -> None:
    k = Keys("tailstream")
    assert k.meta("victim") not in (k.recs("victim:meta"), k.meta("victim:meta"))
    assert len({k.recs("victim"), k.meta("victim"), k.recs("victim:meta"),
                k.meta("victim:meta")}) == 4


@given(IDS, IDS, st.sampled_from(NAMED), st.sampled_from(NAMED))
def test_two_keys_are_equal_only_for_the_same_kind_and_name(a: str, b: str, kind_a: str,
                                                             kind_b: str) -> None:
    k = Keys("ts")
    same = (a == b and kind_a == kind_b)
    assert (keys_of(k, a)[kind_a] == keys_of(k, b)[kind_b]) == same


@given(IDS)
def test_no_named_key_is_a_fixed_key(a: str) -> None:
    k = Keys("ts")
    fixed = {k.tail, k.buffer_meta, k.weights, k.trainer_replay, k.trainer_offsets}
    assert not set(keys_of(k, a).values()) & fixed
