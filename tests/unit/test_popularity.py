from __future__ import annotations

import pytest

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
