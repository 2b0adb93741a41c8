"""The imbalance loop without Kafka: counts → weights → buffer → triggers, and drift."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from tailstream.contract import Event
from tailstream.models.imbalance.features import FEATURE_NAMES, feature_vector
from tailstream.models.imbalance.triggers import DriftMonitor, TriggerPolicy
from tailstream.settings import Settings
from tailstream.streams.worker.imbalance import ImbalanceLoop, Observation

MIX = {"click": 0.89, "cart": 0.055, "fav": 0.03, "purchase": 0.025}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def feed(loop: ImbalanceLoop, n: int, mix: dict[str, float], rng: random.Random,
         start: int = 0, ts0: float = 1.7e9) -> list[dict[str, Any]]:
    """Feed n events in batches of 200; return the training requests that fired."""
    kinds, weights = list(mix), list(mix.values())
    requests = []
    for i in range(start, start + n):
        kind = rng.choices(kinds, weights)[0]
        item = f"i{int(rng.paretovariate(1.2)) % 5000}"
        event = Event(kind, f"e{i}", f"u{i % 500}", ts0 + i * 0.1, item_id=item)
        loop.observe(event, partition=i % 4, user_class_counts={}, category_affinity=0.5,
                     repeat=False)
        if i % 200 == 199:
            request = loop.end_batch()
            if request is not None:
                requests.append(request)
    return requests


def make_loop(**overrides: object) -> tuple[ImbalanceLoop, Clock]:
    clock = Clock()
    base: dict[str, object] = {"trigger_min_samples": 10**9, "trigger_max_interval_s": 1e12,
                               "trigger_cooldown_s": 0.0}
    settings = Settings().replace(**{**base, **overrides})
    return ImbalanceLoop(settings, clock=clock), clock


def test_counts_shares_and_class_balanced_weights() -> None:
    loop, _ = make_loop(weight_policy="class_balanced", weight_beta=0.999)
    feed(loop, 20_000, MIX, random.Random(1))
    loop.end_batch()
    snap = loop.snapshot()
    totals = snap["class_counts"]
    assert sum(totals.values()) == 20_000
    for c, share in MIX.items():
        assert snap["class_shares"][c] == pytest.approx(share, abs=0.01)
    # The weights are the policy applied to the decayed counts they report.
    lw = snap["loss_weights"]
    n = lw["counts"]
    beta = lw["beta"]
    expected = (1 - beta ** n["click"]) / (1 - beta ** n["purchase"])
    assert lw["weights"]["purchase"] / lw["weights"]["click"] == pytest.approx(expected, rel=1e-9)
    assert lw["weights"]["purchase"] > lw["weights"]["cart"] > lw["weights"]["click"]


def test_minority_samples_are_buffered_and_trigger_a_request() -> None:
    loop, clock = make_loop(trigger_min_samples=300, buffer_capacity=1000)
    feed(loop, 5_000, MIX, random.Random(2))
    sizes = loop.buffer.sizes()
    # Every minority event is held; clicks by reservoir (plus those of the warm-up, before
    # the mix was known, which are all kept, bounded by the FIFO capacity).
    assert sizes["purchase"] == loop.totals()["purchase"]
    assert sizes["click"] <= 2 * 1000
    assert loop.triggers.fired["buffer"] >= 1
    clock.now += 1
    requests = feed(loop, 6_000, MIX, random.Random(3), start=10_000)
    assert [r["reason"] for r in requests].count("buffer") >= 1
    request = requests[-1]
    assert set(request) >= {"class_counts", "loss_weights", "buffer_sizes", "triggers_fired"}
    assert request["buffer_sizes"]["purchase"] > 0


def test_purchase_share_halving_fires_drift_and_weights_follow() -> None:
    loop, clock = make_loop(weight_policy="inverse", counts_half_life_s=120.0)
    rng = random.Random(4)
    before = {"click": 0.86, "cart": 0.06, "fav": 0.03, "purchase": 0.05}
    after = {"click": 0.885, "cart": 0.06, "fav": 0.03, "purchase": 0.025}
    feed(loop, 20_000, before, rng)
    loop.end_batch()
    w_before = loop.weights["purchase"]
    loop.drift.take()
    fired_before = loop.triggers.fired["drift"]
    detected_at = None
    for i in range(20_000, 40_000, 200):
        feed(loop, 200, after, rng, start=i)
        clock.now += 1
        if loop.triggers.fired["drift"] > fired_before:
            detected_at = i + 200 - 20_000
            break
    assert detected_at is not None, "no drift trigger after the purchase share halved"
    assert detected_at <= 10_000
    feed(loop, 10_000, after, rng, start=60_000)
    loop.end_batch()
    assert loop.weights["purchase"] > 1.5 * w_before  # rarer purchases weigh more


def test_partition_state_round_trip() -> None:
    loop, _ = make_loop()
    feed(loop, 3_000, MIX, random.Random(5))
    states = loop.take_touched()
    assert set(states) == {0, 1, 2, 3}
    fresh, _ = make_loop()
    for p, state in states.items():
        fresh.load_partition(p, state)
    assert fresh.totals() == loop.totals()
    assert fresh.decayed_counts() == pytest.approx(loop.decayed_counts())
    assert fresh.window_counts() == pytest.approx(loop.window_counts())
    assert loop.take_touched() == {}


def test_searches_are_counted_apart() -> None:
    loop, _ = make_loop()
    loop.observe(Event("search", "s1", "u", 1.7e9, query="red shoe"), 0,
                 user_class_counts={}, category_affinity=0.0, repeat=False)
    assert loop.searches == 1 and sum(loop.totals().values()) == 0


def test_drift_monitor_ignores_a_stationary_stream() -> None:
    rng = random.Random(6)
    monitor = DriftMonitor(["purchase"], delta=0.002)
    for _ in range(30_000):
        monitor.update("purchase" if rng.random() < 0.03 else "click", None)
    assert monitor.detections["mix:purchase"] <= 1


def test_trigger_cooldown_and_interval() -> None:
    t = TriggerPolicy(min_new_samples=10, max_interval_s=100, cooldown_s=5)
    assert t.check(0, 0, []) is None
    assert t.check(1, 10, []) == "buffer"
    assert t.check(2, 50, ["error"]) is None  # cooldown; the drift is remembered
    assert t.check(7, 0, []) == "drift"
    assert t.check(50, 0, []) is None  # nothing new
    assert t.check(120, 1, []) == "interval"
    restored = TriggerPolicy(10, 100, 5)
    restored.load_state(t.to_state())
    assert restored.fired == t.fired and restored.last_fired == 120


def test_offset_watermark_travels_with_the_counts() -> None:
    """The counts' changelog state carries, per topic, the last offset it holds: a
    restored loop knows which replayed messages it must not count again."""
    loop = ImbalanceLoop(Settings())
    feed(loop, 50, MIX, random.Random(1))
    assert not loop.counted(0, "clicks", 0)
    loop.mark_counted(0, "clicks", 41)
    loop.mark_counted(0, "clicks", 17)  # never moves back
    loop.mark_counted(0, "carts", 3)
    state = loop.take_touched()[0]

    restored = ImbalanceLoop(Settings())
    restored.load_partition(0, state)
    assert restored.totals() != dict.fromkeys(restored.totals(), 0)
    assert restored.counted(0, "clicks", 41) and restored.counted(0, "clicks", 0)
    assert not restored.counted(0, "clicks", 42)
    assert restored.counted(0, "carts", 3) and not restored.counted(0, "carts", 4)
    assert not restored.counted(0, "purchases", 0)  # no watermark yet for that topic
    assert not restored.counted(1, "clicks", 0)  # nor for another partition


def _features(sample: Any) -> dict[str, float]:
    assert sample is not None and len(sample.features) == len(FEATURE_NAMES)
    return dict(zip(FEATURE_NAMES, sample.features, strict=True))


def test_samples_carry_the_count_features_known_before_their_event() -> None:
    loop, _ = make_loop()
    first = _features(loop.observe(Event("purchase", "e1", "u1", 1.7e9, item_id="new"), 0,
                                   user_class_counts={}, category_affinity=0.5, repeat=True))
    # Its own purchase is not in its features: the new item has no count yet.
    assert first["log_item_count"] == 0.0
    assert first["item_rate_purchase"] == pytest.approx(1 / 4)
    assert first["repeat"] == 1.0 and first["affinity"] == 0.5
    second = _features(loop.observe(Event("click", "e2", "u2", 1.7e9 + 1, item_id="new"), 0,
                                    user_class_counts={"purchase": 3.0},
                                    category_affinity=0.0, repeat=False))
    assert second["item_rate_purchase"] == pytest.approx(2 / 5, abs=0.01)
    assert second["user_rate_purchase"] == pytest.approx(4 / 7)
    assert second["log_item_count"] > 0


def test_a_batch_s_samples_are_made_before_the_batch_is_counted() -> None:
    loop, _ = make_loop()
    batch = [Observation(Event("purchase", f"e{i}", f"u{i}", 1.7e9 + i, item_id="new"), 0,
                         {}, 0.0, False, "new item", lambda: ("", ""))
             for i in range(3)]
    assert loop.observe_batch(batch) == 3
    for _, _, sample in loop.buffer_changes:
        x = _features(sample)
        assert x["log_item_count"] == 0.0 and x["item_rate_purchase"] == pytest.approx(1 / 4)
    # The next batch sees all three.
    loop.buffer_changes.clear()
    loop.observe_batch([Observation(Event("cart", "e9", "u9", 1.7e9 + 9, item_id="new"), 0,
                                    {}, 0.0, False, "new item", lambda: ("", ""))])
    x = _features(loop.buffer_changes[0][2])
    assert x["item_rate_purchase"] == pytest.approx(4 / 7, abs=0.01)


def test_a_batch_reads_each_item_s_counts_once_with_the_same_floats() -> None:
    """The batch path reads every sketch once for the batch's distinct items
    (:meth:`ImbalanceLoop.item_counts`); its samples' features are the floats that
    :meth:`ImbalanceLoop.features` reads one item at a time before the batch."""
    loop, _ = make_loop()
    for n in range(200):  # history: counts, rare-class counts and decay for many items
        loop.observe(Event(("click", "cart", "purchase")[n % 3], f"h{n}", f"u{n % 7}",
                           1.7e9 + n * 37.0, item_id=f"i{n % 11}"), 0,
                     user_class_counts={}, category_affinity=0.0, repeat=False)
    items = [f"i{n % 13}" for n in range(40)]  # some repeat, two never seen
    expected = [feature_vector(loop.features(i, {"click": 2.0}, loop.tiers.get(i, "tail"),
                                             0.5, False)) for i in items]
    loop.buffer_changes.clear()
    loop.observe_batch([Observation(Event("purchase", f"b{n}", f"v{n}", 1.7e9 + 9000 + n,
                                          item_id=i), 0, {"click": 2.0}, 0.5, False,
                                    f"item {i}", lambda: ("", ""))
                        for n, i in enumerate(items)])
    assert len(loop.buffer_changes) == len(items)
    assert [s.features for _, _, s in loop.buffer_changes] == expected


def test_the_price_paid_never_tells_the_features_their_own_class() -> None:
    """Only carts and purchases carry a price (the price paid): read from the event, a
    non-zero price would tell the river path and the head that the event is one of them —
    a leak that made the synthetic shop's p(purchase) near perfect. The features read the
    item's price as known before the event: from the catalogue, or a past transaction."""
    loop, _ = make_loop()
    price_col = FEATURE_NAMES.index("log_price")
    bought = loop.observe(Event("purchase", "e1", "u1", 1.7e9, item_id="a", price=40.0), 0,
                          user_class_counts={}, category_affinity=0.0, repeat=False)
    assert bought is not None and bought.features[price_col] == 0.0
    later = loop.observe(Event("click", "e2", "u2", 1.7e9 + 1, item_id="a"), 0,
                         user_class_counts={}, category_affinity=0.0, repeat=False)
    assert later is not None and later.features[price_col] > 0.0  # known from e1 now
    # The batch path: a batch's own prices reach the next batch only.
    batch = [Observation(Event(kind, f"b{i}", f"u{i}", 1.7e9 + 2 + i, item_id="b",
                               price=12.0 if kind != "click" else None), 0,
                         {}, 0.0, False, "item b", lambda: ("", ""))
             for i, kind in enumerate(["cart", "purchase", "click"])]
    loop.buffer_changes.clear()
    loop.observe_batch(batch)
    assert [s.features[price_col] for _, _, s in loop.buffer_changes] == [0.0, 0.0, 0.0]
    loop.buffer_changes.clear()
    loop.observe_batch([Observation(Event("click", "b9", "u9", 1.7e9 + 9, item_id="b"), 0,
                                    {}, 0.0, False, "item b", lambda: ("", ""))])
    assert loop.buffer_changes[0][2].features[price_col] > 0.0
    # A catalogue price is known from the record on, for every class alike.
    loop.know_price("c", 99.0)
    for i, kind in enumerate(["click", "purchase"]):
        s = loop.observe(Event(kind, f"c{i}", "u1", 1.7e9 + 20 + i, item_id="c",
                               price=99.0 if kind == "purchase" else None), 0,
                         user_class_counts={}, category_affinity=0.0, repeat=False)
        assert s is not None and s.features[price_col] == pytest.approx(math.log1p(99.0) / 10)


def test_a_restore_keeps_counts_newer_than_the_table() -> None:
    """A rebalance re-reads the changelog of a partition that stays assigned: when its last
    record is not delivered yet, the table holds the state of a batch ago. Loading it would
    drop that batch from the counts while the consumer reads on past it."""
    loop = ImbalanceLoop(Settings())
    feed(loop, 50, MIX, random.Random(1))
    loop.mark_counted(0, "clicks", 20)
    behind = loop.take_touched()[0]  # the last record the changelog holds
    feed(loop, 50, MIX, random.Random(2))
    loop.mark_counted(0, "clicks", 40)
    loop.take_touched()  # sent, not delivered when the rebalance read the log's end
    held = loop.totals()

    assert loop.restore_partition(0, behind)  # kept, and written again with the next save
    assert loop.totals() == held and loop.counted(0, "clicks", 40)
    assert set(loop.take_touched()) == {0}

    # Counts another worker moved further while the partition was away: loaded.
    ahead = {**behind, "offsets": {"clicks": 60}, "totals": {"click": 1}}
    assert not loop.restore_partition(0, ahead)
    assert loop.partitions[0].totals["click"] == 1 and not loop.counted(0, "clicks", 61)
    # A partition this process never held: loaded.
    assert not loop.restore_partition(3, behind) and loop.counted(3, "clicks", 20)


def test_a_lists_features_are_what_the_next_interaction_is_scored_with() -> None:
    """The count features a list's outcomes read for (user, item) are the ones an
    interaction with the item, happening now, gets in its training sample: one function,
    the same counts, the same profile context."""
    from tailstream.streams.worker.state import StreamState, user_item_context

    state = StreamState(Settings(), {})
    for n in range(30):
        state.apply_event(Event("click", f"c{n}", f"u{n % 3}", 1.7e9 + n, item_id=f"i{n % 4}",
                                category="home/mug" if n % 4 else "home/pan"))
    state.apply_event(Event("cart", "k1", "u1", 1.7e9 + 40, item_id="i2",
                            category="home/mug", price=9.0))
    rows = state.list_features([("u1", ["i2", "i0", "never-seen"])])
    profile = state.profiles["u1"]
    one_by_one = [feature_vector(state.imbalance.features(
        i, profile["n"], state.imbalance.tiers.get(i, "tail"),
        *user_item_context(profile, state.popularity.category(i), i)))
        for i in ["i2", "i0", "never-seen"]]
    assert rows == one_by_one  # the list's sketches read once: the same floats
    sample = state.apply_event(Event("purchase", "p1", "u1", 1.7e9 + 50, item_id="i2",
                                     category="home/mug"))
    assert sample is not None and sample.features == rows[0]
    assert len({rows[0], rows[1], rows[2]}) == 3  # the item, its category, the user's past


def test_a_turns_lists_read_the_sketches_once_with_each_lists_own_features() -> None:
    """A whole turn's lists in one call (the sketches read once for all of them) give
    each user the rows their list alone gets: their own profile, items shared between
    users, an empty list and an unknown user included."""
    from tailstream.streams.worker.state import StreamState

    state = StreamState(Settings(), {})
    for n in range(40):
        state.apply_event(Event(["click", "cart", "purchase"][n % 3], f"e{n}", f"u{n % 4}",
                                1.7e9 + n, item_id=f"i{n % 6}", category=f"c{n % 2}",
                                price=float(n)))
    lists = [("u1", ["i2", "i0", "never-seen"]), ("u2", ["i0", "i5"]), ("u3", []),
             ("nobody", ["i1", "i2"]), ("u1", ["i4"])]
    reads = 0
    item_counts = state.imbalance.item_counts

    def counted(items: Any) -> Any:
        nonlocal reads
        reads += 1
        return item_counts(items)

    state.imbalance.item_counts = counted  # type: ignore[method-assign]
    together = state.list_features(lists)
    assert reads == 1
    alone = [row for one in lists for row in state.list_features([one])]
    assert together == alone and len(together) == 8
    assert together[1] != together[3]  # i0 for u1 and for u2: each user's own counts


def test_samples_carry_the_fast_paths_prediction_made_before_it_learns_from_them() -> None:
    """A buffered sample's ``fast`` is the river fast path's prediction for its event
    before learning from it (what the decision layer may stack beside the head, with
    ``TAILSTREAM_DECISION_STACK_FAST``): in a batch, the model as of the batch's start;
    one event at a time, the prediction that preceded the event's own learning step."""
    rng = random.Random(4)
    loop, _ = make_loop(online_batch_budget=0, decision_stack_fast=True)
    feed(loop, 1_000, MIX, rng)
    loop.end_batch()
    before = loop.online.snapshot()
    learned = loop.online.n
    batch = [Observation(Event(kind, f"b{i}", f"u{i}", 1.8e9 + i, item_id=f"i{i % 7}"), 0,
                         {"click": float(i % 5)}, 0.3, False, "", lambda: ("", ""))
             for i, kind in enumerate(["purchase", "cart", "fav", "purchase"] * 5)]
    loop.buffer_changes.clear()
    assert loop.observe_batch(batch) == len(batch)  # every one rare: all kept
    assert loop.online.n > learned  # and the fast path learned from them after
    for _, _, sample in loop.buffer_changes:
        assert sample.fast == pytest.approx(tuple(before.proba([sample.features])[0]))
    assert len({s.fast for _, _, s in loop.buffer_changes}) > 1  # not a constant
    # One event at a time: the prediction made before learning from the event.
    one = loop.observe(Event("purchase", "p1", "u1", 1.9e9, item_id="i3"), 0,
                       user_class_counts={}, category_affinity=0.5, repeat=False)
    assert one is not None and loop.last_proba is not None
    assert one.fast == tuple(loop.last_proba[c] for c in loop.online.classes)
    assert one.fast != tuple(loop.online.snapshot().proba([one.features])[0])
    # Without TAILSTREAM_DECISION_STACK_FAST a worker's batch leaves them out (no trainer
    # will read them); the prediction it made anyway is kept.
    off, _ = make_loop(online_batch_budget=0)
    feed(off, 1_000, MIX, random.Random(4))
    off.end_batch()
    off.buffer_changes.clear()
    off.observe_batch(batch)
    assert off.buffer_changes and all(s.fast == () for _, _, s in off.buffer_changes)
    kept = off.observe(Event("purchase", "p2", "u1", 1.9e9, item_id="i3"), 0,
                       user_class_counts={}, category_affinity=0.5, repeat=False)
    assert kept is not None and kept.fast and off.last_proba is not None
