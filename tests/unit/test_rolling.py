from __future__ import annotations

import doctest
import json
import random

import pytest

import tailstream.models.imbalance.rolling as rolling_module
from tailstream.models.imbalance.rolling import DecayedCounts, HoppingWindowCounts, class_shares

# size 10, step 5: buckets [0,5) [5,10) [10,15) ...; the window at `now` is the bucket of
# `now` and the one before it.
EVENTS = [("click", 0.0), ("click", 3.0), ("cart", 4.0), ("click", 6.0),
          ("purchase", 9.0), ("click", 12.0)]


def filled(events: list[tuple[str, float]] = EVENTS) -> HoppingWindowCounts:
    w = HoppingWindowCounts(size_s=10, step_s=5)
    for cls, ts in events:
        assert w.add(cls, ts)
    return w


def test_docstring_examples() -> None:
    result = doctest.testmod(rolling_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_hand_computed_counts_size_10_step_5() -> None:
    w = HoppingWindowCounts(size_s=10, step_s=5)
    seen = []
    for cls, ts in EVENTS:
        w.add(cls, ts)
        seen.append(w.counts(now=ts))
    assert seen == [
        {"click": 1.0},                                      # t=0:  [-5, 5)
        {"click": 2.0},                                      # t=3
        {"click": 2.0, "cart": 1.0},                         # t=4
        {"click": 3.0, "cart": 1.0},                         # t=6:  [0, 10)
        {"click": 3.0, "cart": 1.0, "purchase": 1.0},        # t=9
        {"click": 2.0, "cart": 0.0, "purchase": 1.0},        # t=12: [5, 15)
    ]
    assert w.window(12.0) == (5.0, 15.0)
    assert w.window(9.999) == (0.0, 10.0)


def test_each_event_falls_into_size_over_step_windows() -> None:
    w = HoppingWindowCounts(size_s=10, step_s=5)
    w.add("click", 7.0)
    # windows [0,10) and [5,15) contain it; [10,20) does not
    assert [w.counts(now)["click"] for now in (2.0, 7.0, 12.0, 17.0)] == [0.0, 1.0, 1.0, 0.0]


def test_window_expiry() -> None:
    w = filled()
    assert w.counts(now=14.9) == {"click": 2.0, "cart": 0.0, "purchase": 1.0}
    assert w.counts(now=15.0) == {"click": 1.0, "cart": 0.0, "purchase": 0.0}  # [10, 20)
    assert w.counts(now=20.0) == {"click": 0.0, "cart": 0.0, "purchase": 0.0}
    # a slot recycled by a much newer event holds only that event
    w.add("cart", 101.0)
    assert w.counts(now=101.0) == {"click": 0.0, "cart": 1.0, "purchase": 0.0}


def test_late_events_are_ignored_and_counted() -> None:
    w = filled()  # watermark bucket [10, 15): window [5, 15)
    before = w.counts(now=12.0)
    assert not w.add("purchase", 4.9, weight=2.0)
    assert not w.add("click", -100.0)
    assert (w.late, w.late_weight) == (2, 3.0)
    assert w.counts(now=12.0) == before


def test_out_of_order_events_within_the_window_are_counted() -> None:
    w = filled()
    assert w.add("purchase", 5.0)      # older than the newest event, still in [5, 15)
    assert w.add("cart", 11.0)
    assert w.late == 0
    assert w.counts(now=12.0) == {"click": 2.0, "cart": 1.0, "purchase": 2.0}
    # shuffled arrival within one window gives the same counts as sorted arrival
    events = [(c, float(t)) for c, t in [("click", 20), ("cart", 21), ("click", 26),
                                         ("purchase", 27), ("click", 29)]]
    shuffled = events[:]
    random.Random(0).shuffle(shuffled)
    assert filled(shuffled).counts(now=29.0) == filled(events).counts(now=29.0)


def test_shares_sum_to_one() -> None:
    w = HoppingWindowCounts(size_s=10, step_s=5)
    for cls, ts in EVENTS:
        w.add(cls, ts)
        assert sum(w.shares(now=ts).values()) == pytest.approx(1.0)
        if ts == 9.0:
            assert w.shares(9.0) == pytest.approx({"click": 0.6, "cart": 0.2, "purchase": 0.2})
    d = DecayedCounts(half_life_s=30.0)
    for i, (cls, ts) in enumerate(EVENTS):
        d.add(cls, ts, weight=1.0 + i)
    assert sum(d.shares(now=50.0).values()) == pytest.approx(1.0)


def test_class_shares_edge_cases() -> None:
    assert class_shares({}) == {}
    assert class_shares({"a": 0.0, "b": 0.0}) == {"a": 0.0, "b": 0.0}
    assert class_shares({"a": 3.0, "b": -1.0}) == {"a": 1.0, "b": 0.0}


def test_hopping_state_round_trip_gives_identical_results() -> None:
    w = filled()
    w.add("purchase", 1.0)  # late
    state = json.loads(json.dumps(w.to_state()))
    back = HoppingWindowCounts.from_state(state)
    for now in (12.0, 14.0, 15.0, 19.0, 30.0):
        assert back.counts(now) == w.counts(now)
    assert (back.late, back.late_weight, back.watermark) == (w.late, w.late_weight, 10.0)
    # both keep evolving the same way, lateness included
    for x in (w, back):
        assert not x.add("cart", 2.0)
        assert x.add("cart", 16.0)
    assert back.counts(16.0) == w.counts(16.0)
    assert back.to_state() == w.to_state()


def test_bad_window_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        HoppingWindowCounts(size_s=10, step_s=3)
    with pytest.raises(ValueError):
        HoppingWindowCounts(size_s=0, step_s=1)
    assert HoppingWindowCounts(3600, 300).n_buckets == 12


def test_decayed_counts_halve_each_half_life_exactly() -> None:
    d = DecayedCounts(half_life_s=100.0)
    d.add("click", ts=0.0, weight=8.0)
    d.add("purchase", ts=100.0, weight=2.0)
    # by hand: click 8 → 4 → 2 → 1; purchase (from t=100) 2 → 1 → 0.5
    assert d.counts(now=100.0) == {"click": 4.0, "purchase": 2.0}
    assert d.counts(now=200.0) == {"click": 2.0, "purchase": 1.0}
    assert d.counts(now=300.0) == {"click": 1.0, "purchase": 0.5}
    assert d.counts(now=50.0)["click"] == pytest.approx(8.0 / 2**0.5)


def test_decayed_counts_are_smooth_in_time() -> None:
    d = DecayedCounts(half_life_s=60.0)
    for t in range(0, 600, 7):
        d.add("click", float(t))
    values = [d.counts(now=600.0 + s)["click"] for s in range(0, 300)]
    ratios = [b / a for a, b in zip(values, values[1:], strict=False)]
    assert all(r == pytest.approx(2 ** (-1 / 60)) for r in ratios)  # no jumps


def test_decayed_out_of_order_and_rebase() -> None:
    a, b = DecayedCounts(half_life_s=10.0), DecayedCounts(half_life_s=10.0)
    events = [("click", 5.0), ("cart", 0.0), ("click", 20.0), ("cart", 12.0)]
    for cls, ts in events:
        a.add(cls, ts)
    for cls, ts in sorted(events, key=lambda e: e[1]):
        b.add(cls, ts)
    assert a.counts(30.0) == pytest.approx(b.counts(30.0))
    long = DecayedCounts(half_life_s=1.0)
    long.add("click", 0.0)
    long.add("click", 10_000.0)  # would overflow 2^10000 without a rebase
    assert long.counts(10_000.0) == {"click": 1.0}


def test_decayed_state_round_trip_gives_identical_results() -> None:
    d = DecayedCounts(half_life_s=45.0)
    for i, (cls, ts) in enumerate(EVENTS):
        d.add(cls, ts, weight=0.5 + i)
    back = DecayedCounts.from_state(json.loads(json.dumps(d.to_state())))
    for now in (12.0, 60.0, 1000.0):
        assert back.counts(now) == d.counts(now)
        assert back.shares(now) == d.shares(now)
    assert DecayedCounts.from_state(DecayedCounts(5.0).to_state()).counts(1.0) == {}
