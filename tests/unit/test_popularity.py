from __future__ import annotations

import copy
import random

import pytest

from tailstream.models.serving.baseline import recommend
from tailstream.models.serving.popularity import PopularityTracker


def test_tiers_follow_cumulative_share() -> None:
    p = PopularityTracker(half_life_s=1e9, head_share=0.5, torso_share=0.3)
    counts = {"a": 50, "b": 20, "c": 10, "d": 10, "e": 5, "f": 5}
    for item, n in counts.items():
        for _ in range(n):
            p.observe(item, "cat", 1.0, ts=0.0)
    p.set_category("never", "cat")
    p.refresh(now=0.0)
    # before-share: a 0, b .5, c .7, d .8, e .9, f .95
    assert [p.tier(i) for i in "abcdef"] == ["head", "torso", "torso", "tail", "tail", "tail"]
    assert p.tier("never") == "tail"
    assert p.tier_sizes() == {"head": 1, "torso": 2, "tail": 4}
    assert p.top_in("cat") == ["a", "b", "c"]
    assert p.tail_in("cat") == ["d", "e", "f", "never"]


def test_decay_halves_counts_per_half_life() -> None:
    p = PopularityTracker(half_life_s=100.0)
    p.observe("old", None, 8.0, ts=0.0)
    p.observe("new", None, 1.0, ts=300.0)
    assert p.decayed_count("old", now=300.0) == pytest.approx(1.0)
    assert p.decayed_count("new", now=300.0) == pytest.approx(1.0)
    assert p.decayed_count("old", now=400.0) == pytest.approx(0.5)


def test_recent_events_outrank_old_ones() -> None:
    p = PopularityTracker(half_life_s=60.0)
    for _ in range(10):
        p.observe("was-hot", "x", 1.0, ts=0.0)
    for _ in range(3):
        p.observe("now-hot", "x", 1.0, ts=600.0)
    p.refresh(now=600.0)
    assert p.top_in("x")[0] == "now-hot"


def test_rebase_keeps_values_finite_over_long_runs() -> None:
    p = PopularityTracker(half_life_s=1.0)
    p.observe("a", None, 1.0, ts=0.0)
    p.observe("a", None, 1.0, ts=10_000.0)  # 2^10000 would overflow without a rebase
    assert p.decayed_count("a", now=10_000.0) == pytest.approx(1.0)


def test_bad_shares_are_refused() -> None:
    with pytest.raises(ValueError):
        PopularityTracker(head_share=0.0)


def test_the_per_category_memo_is_never_stale() -> None:
    """Users of a turn share one ranking per category (``ranked_in``); after any change
    of the counts, categories or tiers, every read and every list must be what a fresh
    computation gives."""
    rng = random.Random(7)
    pop = PopularityTracker(per_category=6)
    items = [f"i{n}" for n in range(40)]
    profile = {"cats": {"c0": 3.0, "c1": 1.0, "c2": 0.5}, "items": ["i1", "i2"]}
    for step in range(400):
        op = rng.random()
        item = rng.choice(items)
        if op < 0.6:
            pop.observe(item, f"c{rng.randrange(3)}", rng.random() * 3, ts=step / 10)
        elif op < 0.8:
            pop.refresh(now=step / 10)
        elif op < 0.9:
            pop.set_category(item, f"c{rng.randrange(3)}")
        else:
            pop.forget(item)
        for cat in ("c0", "c1", "c2"):
            fresh = list(dict.fromkeys(pop.top_in(cat)[:4] + pop.tail_in(cat)[:4]))
            assert pop.ranked_in(cat, 4) == (fresh, pop.relative_many(fresh))
        unmemoised = copy.deepcopy(pop)
        unmemoised._memo, unmemoised._memo_version = {}, -1
        assert recommend(profile, pop, k=5) == recommend(profile, unmemoised, k=5)
