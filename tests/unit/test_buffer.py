"""MinorityBuffer: FIFO minority classes, tail deque, Algorithm R reservoir, exact persistence."""

from __future__ import annotations

import doctest
import json
import random

import pytest

import tailstream.models.imbalance.buffer as buffer_module
from tailstream.models.imbalance.buffer import MinorityBuffer, Sample

# Taobao mix (click 89 %, cart 5.5 %, fav 3 %, purchase 2.2 %): only click is a majority.
SHARES = {"click": 0.89, "cart": 0.055, "fav": 0.03, "purchase": 0.022}


def sample(n: int, label: str, tier: str = "head", ts: float | None = None) -> Sample:
    return Sample(f"e{n}", f"u{n % 7}", f"i{n % 11}", label, float(n if ts is None else ts),
                  tier=tier, user_text=f"user {n}", item_text=f"item {n}")


def stream(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    labels, weights = list(SHARES), list(SHARES.values())
    tiers = ["head", "torso", "tail"]
    return [sample(i, rng.choices(labels, weights)[0], rng.choice(tiers)) for i in range(n)]


def test_docstring_examples() -> None:
    result = doctest.testmod(buffer_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_sample_round_trips_through_dict_and_json() -> None:
    s = Sample("e", "u", "i", "cart", 1.5, tier="torso", weight=3.0, user_text="a", item_text="b")
    assert Sample.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert Sample.from_dict({"event_id": "e", "user_id": "u", "item_id": "i", "label": "click",
                             "ts": 0}) == Sample("e", "u", "i", "click", 0.0)


def test_minority_kept_in_full_up_to_capacity_then_oldest_evicted() -> None:
    buf = MinorityBuffer(capacity_per_class=50)
    for n in range(50):
        assert buf.offer(sample(n, "purchase"), SHARES)
    assert [s.event_id for s in buf.minority()] == [f"e{n}" for n in range(50)]
    for n in range(50, 80):
        assert buf.offer(sample(n, "purchase"), SHARES)
    assert [s.event_id for s in buf.minority()] == [f"e{n}" for n in range(30, 80)]
    assert buf.sizes() == {"purchase": 50}
    assert buf.majority() == [] and buf.tail() == []


def test_each_minority_class_has_its_own_bound() -> None:
    buf = MinorityBuffer(capacity_per_class=5)
    for n in range(40):
        buf.offer(sample(n, ["cart", "fav", "purchase"][n % 3]), SHARES)
    assert buf.sizes() == {"cart": 5, "fav": 5, "purchase": 5}


def test_tail_items_of_majority_class_kept_fifo_head_items_go_to_reservoir() -> None:
    buf = MinorityBuffer(capacity_per_class=3, tail_capacity=4)
    for n in range(10):
        assert buf.offer(sample(n, "click", tier="tail"), SHARES)
    assert [s.event_id for s in buf.tail()] == ["e6", "e7", "e8", "e9"]
    buf.offer(sample(10, "click", tier="head"), SHARES)
    buf.offer(sample(11, "click", tier="torso"), SHARES)
    assert [s.event_id for s in buf.majority()] == ["e10", "e11"]
    assert buf.sizes() == {"click": 2, "tail": 4}
    assert buf.seen("click") == 2  # tail samples do not enter the reservoir's count
    assert buf.new_since_last_take == 10  # the tail clicks are rare; head and torso not


def test_minority_share_threshold_and_unknown_class() -> None:
    buf = MinorityBuffer(minority_share=0.10)
    buf.offer(sample(0, "cart"), {"cart": 0.0999})
    buf.offer(sample(1, "cart"), {"cart": 0.10})  # not strictly below: majority
    buf.offer(sample(2, "fav"), {})  # never seen: share 0, a minority (cold start)
    assert [s.event_id for s in buf.minority()] == ["e0", "e2"]
    assert [s.event_id for s in buf.majority()] == ["e1"]


def test_new_since_last_take_counts_the_rare_only_and_resets() -> None:
    buf = MinorityBuffer(capacity_per_class=2)
    for n in range(5):
        buf.offer(sample(n, "purchase"), SHARES)  # counted even past capacity
    buf.offer(sample(5, "click", tier="tail"), SHARES)  # a tail item's click: rare
    buf.offer(sample(6, "click", tier="head"), SHARES)  # the reservoir's: not
    buf.offer(sample(7, "click", tier="torso"), SHARES)
    assert buf.new_since_last_take == 6
    buf.mark_consumed()
    assert buf.new_since_last_take == 0
    buf.offer(sample(8, "cart"), SHARES)
    assert buf.new_since_last_take == 1


def test_reservoir_fills_then_keeps_capacity() -> None:
    buf = MinorityBuffer(capacity_per_class=10)
    kept = [buf.offer(sample(n, "click"), SHARES) for n in range(1000)]
    assert all(kept[:10]) and not all(kept)
    assert len(buf.majority()) == 10 and buf.seen("click") == 1000


def test_reservoir_is_uniform_over_positions() -> None:
    # Each of N offered samples must be held with probability cap / N. Over many seeds the
    # per-position retention counts follow a multinomial; chi-square with N − 1 = 99 dof.
    n_items, cap, seeds = 100, 10, 3000
    counts = [0] * n_items
    items = [sample(n, "click") for n in range(n_items)]
    for seed in range(seeds):
        buf = MinorityBuffer(capacity_per_class=cap, seed=seed)
        for s in items:
            buf.offer(s, SHARES)
        for s in buf.majority():
            counts[int(s.event_id[1:])] += 1
    expected = seeds * cap / n_items
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 148.2  # χ²(99) 0.999 quantile
    # and no position is systematically favoured (early vs late halves)
    early, late = sum(counts[:50]), sum(counts[50:])
    assert abs(early - late) / (early + late) < 0.03


def test_memory_strictly_bounded_over_a_million_samples() -> None:
    cap, tail_cap = 100, 100
    buf = MinorityBuffer(capacity_per_class=cap, tail_capacity=tail_cap, seed=3)
    # 10k distinct samples cycled 100 times: what counts is a million offers.
    pool = stream(10_000, seed=0)
    bound = 2 * cap * len(SHARES) + tail_cap
    for n in range(1_000_000):
        buf.offer(pool[n % 10_000], SHARES)
        if n % 50_000 == 0:
            assert len(buf) <= bound
    sizes = buf.sizes()
    assert sizes == {"click": cap, "cart": cap, "fav": cap, "purchase": cap, "tail": tail_cap}
    assert len(buf) == len(buf.all()) == 5 * cap


def test_state_round_trip_is_exact_and_json_able() -> None:
    buf = MinorityBuffer(capacity_per_class=20, tail_capacity=15, seed=7)
    for s in stream(2_000, seed=1):
        buf.offer(s, SHARES)
    state = buf.to_state()
    text = json.dumps(state)
    restored = MinorityBuffer.from_state(json.loads(text))
    assert restored.to_state() == state
    assert restored.all() == buf.all()
    assert restored.sizes() == buf.sizes()
    assert restored.new_since_last_take == buf.new_since_last_take
    assert restored.seen("click") == buf.seen("click")


def test_restored_buffer_continues_identically() -> None:
    data = stream(5_000, seed=2)
    a = MinorityBuffer(capacity_per_class=25, tail_capacity=10, seed=11)
    for s in data[:2_500]:
        a.offer(s, SHARES)
    b = MinorityBuffer.from_state(json.loads(json.dumps(a.to_state())))
    decisions_a = [a.offer(s, SHARES) for s in data[2_500:]]
    decisions_b = [b.offer(s, SHARES) for s in data[2_500:]]
    assert decisions_a == decisions_b
    assert a.to_state() == b.to_state()
    # and equals an uninterrupted run with the same seed
    c = MinorityBuffer(capacity_per_class=25, tail_capacity=10, seed=11)
    for s in data:
        c.offer(s, SHARES)
    assert c.to_state() == a.to_state()


def test_seeded_determinism_and_seed_matters() -> None:
    data = [sample(n, "click") for n in range(500)]

    def run(seed: int) -> list[str]:
        buf = MinorityBuffer(capacity_per_class=10, seed=seed)
        for s in data:
            buf.offer(s, SHARES)
        return [s.event_id for s in buf.majority()]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_bad_arguments_and_state_version() -> None:
    with pytest.raises(ValueError):
        MinorityBuffer(capacity_per_class=0)
    with pytest.raises(ValueError):
        MinorityBuffer(minority_share=1.5)
    state = MinorityBuffer().to_state()
    state["version"] = 99
    with pytest.raises(ValueError):
        MinorityBuffer.from_state(state)


def test_zero_tail_capacity_routes_tail_to_reservoir() -> None:
    buf = MinorityBuffer(capacity_per_class=5, tail_capacity=0)
    buf.offer(sample(0, "click", tier="tail"), SHARES)
    assert buf.tail() == [] and len(buf.majority()) == 1
