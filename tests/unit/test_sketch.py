from __future__ import annotations

import doctest
import json
import math
from collections import Counter

import numpy as np
import pytest

import tailstream.models.imbalance.sketch as sketch_module
from tailstream.models.imbalance.sketch import CountMinSketch, ItemFrequency

N_KEYS = 50_000
N_EVENTS = 200_000


def zipf_stream(n_keys: int = N_KEYS, n_events: int = N_EVENTS, s: float = 1.1,
                seed: int = 7) -> list[str]:
    """Every key once (so exactly ``n_keys`` distinct), the rest Zipf(s) over ranks."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_keys + 1) ** s
    p /= p.sum()
    ranks = np.concatenate([np.arange(n_keys), rng.choice(n_keys, n_events - n_keys, p=p)])
    rng.shuffle(ranks)
    return [f"item-{r}" for r in ranks]


@pytest.fixture(scope="module")
def stream() -> list[str]:
    return zipf_stream()


@pytest.fixture(scope="module")
def truth(stream: list[str]) -> Counter[str]:
    return Counter(stream)


@pytest.fixture(scope="module")
def sketches(stream: list[str]) -> dict[bool, CountMinSketch]:
    out = {}
    for conservative in (False, True):
        s = CountMinSketch.from_error(epsilon=0.001, delta=0.01, seed=3,
                                      conservative=conservative)
        s.add_many(stream)
        out[conservative] = s
    return out


def test_docstring_examples() -> None:
    result = doctest.testmod(sketch_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_from_error_sizes() -> None:
    s = CountMinSketch.from_error(0.001, 0.01)
    assert (s.width, s.depth) == (math.ceil(math.e / 0.001), math.ceil(math.log(100)))
    assert s.epsilon <= 0.001 and s.delta <= 0.01
    with pytest.raises(ValueError):
        CountMinSketch.from_error(0.0, 0.1)


@pytest.mark.parametrize("conservative", [False, True])
def test_never_underestimates(sketches: dict[bool, CountMinSketch],
                              truth: Counter[str], conservative: bool) -> None:
    s = sketches[conservative]
    keys = list(truth)
    est = s.estimate_many(keys)
    true = np.array([truth[k] for k in keys], dtype=float)
    assert s.total == N_EVENTS
    assert len(keys) == N_KEYS
    assert np.all(est >= true)
    # the scalar path agrees with the vectorised one
    assert [s.estimate(k) for k in keys[:200]] == est[:200].tolist()


@pytest.mark.parametrize("conservative", [False, True])
def test_error_within_eps_n_for_1_minus_delta_of_keys(
        sketches: dict[bool, CountMinSketch], truth: Counter[str], conservative: bool) -> None:
    s = sketches[conservative]
    keys = list(truth)
    err = s.estimate_many(keys) - np.array([truth[k] for k in keys], dtype=float)
    within = np.mean(err <= s.epsilon * s.total)
    assert within >= 1 - s.delta


def test_conservative_update_no_worse_than_plain(
        sketches: dict[bool, CountMinSketch], truth: Counter[str]) -> None:
    keys = list(truth)
    plain = sketches[False].estimate_many(keys)
    cons = sketches[True].estimate_many(keys)
    assert np.all(cons <= plain)
    true = np.array([truth[k] for k in keys], dtype=float)
    # and it helps a lot on a skewed stream (tail keys share cells with head keys)
    assert (cons - true).mean() < 0.75 * (plain - true).mean()


def test_merge_equals_sketch_of_union(stream: list[str]) -> None:
    stream = stream[:60_000]
    half = len(stream) // 2
    a, b, union = (CountMinSketch(1024, 4, seed=1, conservative=False) for _ in range(3))
    a.add_many(stream[:half])
    b.add_many(stream[half:])
    union.add_many(stream)
    merged = a.merge(b)
    assert merged == union
    assert np.array_equal(merged.table, union.table)


def test_merge_of_conservative_sketches_is_an_upper_bound(
        stream: list[str], truth: Counter[str]) -> None:
    stream = stream[:60_000]
    truth = Counter(stream)
    half = len(stream) // 2
    a, b = CountMinSketch(1024, 4), CountMinSketch(1024, 4)
    a.add_many(stream[:half])
    b.add_many(stream[half:])
    merged = a.merge(b)
    keys = list(truth)[:2000]
    assert np.all(merged.estimate_many(keys) >= [truth[k] for k in keys])
    with pytest.raises(ValueError):
        a.merge(CountMinSketch(1024, 4, seed=2))


def test_hash_is_stable_across_instances_and_processes() -> None:
    # Fixed expected cells: a salted hash (Python's hash()) would change between runs.
    s = CountMinSketch(1000, 3, seed=0)
    assert s._cells_of("item-42") == CountMinSketch(1000, 3, seed=0)._cells_of("item-42")
    assert s._cells_of("item-42") != CountMinSketch(1000, 3, seed=1)._cells_of("item-42")
    deep = CountMinSketch(1000, 11)  # more rows than one BLAKE2b digest holds
    cells = deep._cells_of("x")
    assert len(cells) == 11 and all(r * 1000 <= c < (r + 1) * 1000 for r, c in enumerate(cells))


@pytest.mark.parametrize("compress", [False, True])
def test_serialise_round_trip(stream: list[str], compress: bool) -> None:
    s = CountMinSketch(2048, 5, seed=9)
    s.add_many(stream[:20_000])
    s.decay(0.75)
    data = s.to_bytes(compress=compress)
    back = CountMinSketch.from_bytes(data)
    assert back == s and back.conservative and back.seed == 9
    assert back.estimate("item-1") == s.estimate("item-1")
    if compress:
        assert len(data) < s.memory_bytes
    # the restored sketch keeps working
    back.add("item-1", 2.0)
    assert back.estimate("item-1") >= s.estimate("item-1") + 2.0 - 1e-9
    with pytest.raises(ValueError):
        CountMinSketch.from_bytes(b"XXXX" + data[4:])


def test_decay_halves() -> None:
    s = CountMinSketch(256, 4)
    for k, n in [("a", 8.0), ("b", 4.0), ("c", 2.0)]:
        s.add(k, n)
    before = s.table.copy()
    s.decay(0.5)
    assert np.array_equal(s.table, before / 2)
    assert (s.estimate("a"), s.estimate("b"), s.total) == (4.0, 2.0, 7.0)
    with pytest.raises(ValueError):
        s.decay(1.5)


def test_negative_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        CountMinSketch(8, 2).add("a", -1.0)


def test_memory_is_fixed_as_distinct_keys_grow() -> None:
    s = CountMinSketch(512, 4)
    f = ItemFrequency(capacity=50, width=512, depth=4, half_life_s=None)
    mem, fmem = s.memory_bytes, f.memory_bytes
    assert mem == 512 * 4 * 8
    for i in range(20_000):
        s.add(f"k{i}")
        f.observe(f"k{i}")
    assert s.memory_bytes == mem and f.memory_bytes == fmem
    assert len(f.heavy_hitters()) == 50
    assert len(f._heap) <= 4 * f.capacity + 16


def test_heavy_hitters_find_true_top_items(stream: list[str], truth: Counter[str]) -> None:
    f = ItemFrequency(capacity=200, width=4096, depth=5, half_life_s=None)
    for key in stream:
        f.observe(key)
    true_top = [k for k, _ in truth.most_common(20)]
    kept = dict(f.heavy_hitters())
    assert set(true_top) <= set(kept)
    assert [k for k, _ in f.heavy_hitters(10)] == true_top[:10]
    for k in true_top:  # estimates near truth for head items
        assert truth[k] <= kept[k] <= truth[k] + f.sketch.epsilon * f.sketch.total


def test_tiers_of_a_known_skewed_distribution() -> None:
    f = ItemFrequency(capacity=5, width=4096, depth=5, half_life_s=None)
    counts = {"a": 50, "b": 20, "c": 10, "d": 10, "e": 5, "f": 3, "g": 2}
    for item, n in counts.items():
        for _ in range(n):
            f.observe(item)
    # before-share: a 0, b .5, c .7, d .8, e .9; f and g fall out of a capacity of 5
    assert [f.tier(i) for i in "abcdefg"] == ["head", "torso", "torso", "tail", "tail",
                                            "tail", "tail"]
    assert f.tier("never") == "tail"
    assert f.tier_sizes() == {"head": 1, "torso": 2, "tail": 2}
    assert f.tier("b", head_share=0.8, torso_share=0.1) == "head"
    assert f.share("a") == pytest.approx(0.5)


def test_share_and_log_q() -> None:
    f = ItemFrequency(capacity=10, width=4096, depth=5, half_life_s=None, q_floor=1e-6)
    for item, n in [("a", 6), ("b", 3), ("c", 1)]:
        f.observe(item, float(n))
    assert f.log_q([]) == []
    assert f.log_q(["a", "b", "c"]) == pytest.approx([math.log(0.6), math.log(0.3),
                                                      math.log(0.1)])
    lq = f.log_q(["unseen-1", "unseen-2"])
    assert all(math.isfinite(x) and x >= math.log(1e-6) for x in lq)
    empty = ItemFrequency(width=64, depth=2)
    assert empty.log_q(["x"]) == [math.log(empty.q_floor)]
    assert empty.share("x") == 0.0


def test_time_decay_halves_per_half_life() -> None:
    f = ItemFrequency(capacity=10, width=1024, depth=4, half_life_s=100.0)
    f.observe("old", 8.0, ts=0.0)
    f.observe("new", 1.0, ts=300.0)
    assert f.estimate("old", now=300.0) == pytest.approx(1.0)
    assert f.estimate("new", now=300.0) == pytest.approx(1.0)
    assert f.estimate("old", now=400.0) == pytest.approx(0.5)
    assert f.total(now=300.0) == pytest.approx(2.0)
    assert f.share("old") == pytest.approx(0.5)


def test_recent_items_overtake_old_heavy_hitters() -> None:
    f = ItemFrequency(capacity=2, width=1024, depth=4, half_life_s=60.0)
    for _ in range(10):
        f.observe("was-hot", ts=0.0)
        f.observe("also-old", ts=0.0)
    for _ in range(3):
        f.observe("now-hot", ts=600.0)
    assert f.heavy_hitters(1)[0][0] == "now-hot"
    assert f.tier("now-hot") == "head"


def test_rebase_keeps_values_finite_over_long_runs() -> None:
    f = ItemFrequency(capacity=4, width=256, depth=3, half_life_s=1.0)
    f.observe("a", ts=0.0)
    f.observe("a", ts=10_000.0)  # 2^10000 would overflow without a rebase
    assert f.estimate("a", now=10_000.0) == pytest.approx(1.0)
    assert math.isfinite(f.sketch.total)
    [(item, value)] = f.heavy_hitters()
    assert item == "a" and value == pytest.approx(1.0)


def test_sketch_bytes_fit_in_json_changelog_as_hex() -> None:
    s = CountMinSketch(128, 3)
    s.add("a", 3.0)
    blob = json.dumps({"cms": s.to_bytes().hex()})
    assert CountMinSketch.from_bytes(bytes.fromhex(json.loads(blob)["cms"])) == s
