"""Batch builders, SMOTE and ADASYN (imbalanced-learn) in embedding space and EDA text
augmentation."""

from __future__ import annotations

import doctest
import random
from collections import Counter

import numpy as np
import pytest
import torch

import tailstream.models.training.sampling as sampling_module
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.training.sampling import (
    BATCH_BUILDERS,
    SAMPLERS,
    SYNONYMS,
    BatchBuilder,
    adasyn_embeddings,
    augment_sample,
    augment_text,
    build_batch,
    mix,
    oversample,
    quotas,
    smote_embeddings,
    synthetic_embeddings,
    undersample,
)

NATURAL = {"click": 0.90, "cart": 0.05, "fav": 0.03, "purchase": 0.02}
TARGET = {"click": 0.40, "cart": 0.20, "fav": 0.20, "purchase": 0.20}


def imbalanced_stream(n: int, seed: int = 0) -> list[Sample]:
    """Exactly the 90/5/3/2 mix, shuffled like an arriving stream."""
    labels = [c for c, p in NATURAL.items() for _ in range(round(n * p))]
    random.Random(seed).shuffle(labels)
    return [Sample(f"e{i}", f"u{i % 97}", f"i{i % 501}", c, float(i)) for i, c in enumerate(labels)]


def test_docstring_examples() -> None:
    result = doctest.testmod(sampling_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------
# Quotas and batch builders
# ---------------------------------------------------------------------------
def test_quotas_sum_to_batch_size_and_skip_absent_classes() -> None:
    q = quotas(TARGET, {"click": 10, "cart": 5, "fav": 3, "purchase": 2}, 7)
    assert sum(q.values()) == 7
    q = quotas(TARGET, {"click": 10, "purchase": 1}, 6)  # cart, fav absent: share re-spread
    assert q == {"click": 4, "purchase": 2}
    assert quotas(TARGET, {"other": 5}, 10) == {}
    assert quotas({"click": 1.0, "zzz": 0.0}, {"click": 3, "zzz": 3}, 4) == {"click": 4}


@pytest.mark.parametrize("builder", [oversample, undersample])
@pytest.mark.parametrize("seed", range(5))
def test_builders_hit_the_target_mix_on_a_90_5_3_2_stream(builder: BatchBuilder, seed: int) -> None:
    # By hand: target 40/20/20/20, batch 1000 → 400/200/200/200, each within ±3 % (±30).
    data = imbalanced_stream(20_000, seed=seed)
    batch = builder(data, TARGET, 1000, random.Random(seed))
    counts = Counter(s.label for s in batch)
    assert len(batch) == 1000
    for c, want in {"click": 400, "cart": 200, "fav": 200, "purchase": 200}.items():
        assert abs(counts[c] - want) <= 30, (c, counts)
    got = mix(batch)
    assert all(abs(got[c] - TARGET[c]) <= 0.03 for c in TARGET)


def test_builders_with_a_small_buffer_still_hit_the_mix() -> None:
    data = imbalanced_stream(2_000)  # only 40 purchases for a quota of 200
    for builder in (oversample, undersample):
        batch = builder(data, TARGET, 1000, random.Random(0))
        counts = Counter(s.label for s in batch)
        assert counts == {"click": 400, "cart": 200, "fav": 200, "purchase": 200}
        # all 40 distinct purchases are used (undersample takes all before duplicating)
        purchases = {s.event_id for s in batch if s.label == "purchase"}
        assert len(purchases) <= 40
    under = undersample(data, TARGET, 1000, random.Random(0))
    assert len({s.event_id for s in under if s.label == "purchase"}) == 40


@pytest.mark.parametrize("seed", range(5))
def test_undersample_never_duplicates_when_enough_data(seed: int) -> None:
    data = imbalanced_stream(20_000, seed=seed)  # 400 purchases ≥ quota 200
    batch = undersample(data, TARGET, 1000, random.Random(seed))
    assert len({s.event_id for s in batch}) == len(batch) == 1000


def test_oversample_duplicates_minority_keeps_majority_distinct() -> None:
    data = imbalanced_stream(20_000)
    batch = oversample(data, TARGET, 1000, random.Random(0))
    clicks = [s.event_id for s in batch if s.label == "click"]
    assert len(set(clicks)) == len(clicks)  # the majority is only subsampled
    purchases = [s.event_id for s in batch if s.label == "purchase"]
    assert len(set(purchases)) < len(purchases)  # i.i.d. with replacement: birthday collisions


def test_builders_are_deterministic_and_shuffled() -> None:
    data = imbalanced_stream(5_000)
    for name in BATCH_BUILDERS:
        a = build_batch(name, data, TARGET, 256, random.Random(42))
        b = build_batch(name, data, TARGET, 256, random.Random(42))
        assert a == b
    batch = oversample(data, TARGET, 256, random.Random(0))
    first = [s.label for s in batch[:40]]
    assert len(set(first)) > 1  # not one class block after another


def test_none_keeps_the_natural_mix() -> None:
    data = imbalanced_stream(20_000)
    batch = build_batch("none", data, TARGET, 5_000, random.Random(0))
    assert len({s.event_id for s in batch}) == 5_000
    got = mix(batch)
    assert abs(got["click"] - 0.90) < 0.02 and abs(got["purchase"] - 0.02) < 0.01
    assert build_batch("none", [], TARGET, 10, random.Random(0)) == []
    assert len(build_batch("none", data[:3], TARGET, 10, random.Random(0))) == 10


def test_build_batch_registry_and_unknown_strategy() -> None:
    assert set(BATCH_BUILDERS) == {"none", "oversample", "undersample"}
    with pytest.raises(ValueError):
        build_batch("smote", imbalanced_stream(100), TARGET, 10, random.Random(0))


def test_empty_inputs() -> None:
    assert oversample([], TARGET, 10, random.Random(0)) == []
    assert undersample(imbalanced_stream(100), TARGET, 0, random.Random(0)) == []
    assert mix([]) == {}


# ---------------------------------------------------------------------------
# SMOTE
# ---------------------------------------------------------------------------
def clusters(seed: int = 0, d: int = 8) -> tuple[np.ndarray, list[str]]:
    g = np.random.default_rng(seed)
    parts, labels = [], []
    for c, (n, centre) in {"click": (60, 0.0), "cart": (15, 3.0), "purchase": (9, -3.0)}.items():
        parts.append(g.normal(centre, 1.0, size=(n, d)))
        labels += [c] * n
    return np.vstack(parts), labels


def segment_sources(x: np.ndarray, point: np.ndarray) -> list[tuple[int, int, float]]:
    """All (i, j, λ) with point = x_i + λ (x_j − x_i), λ ∈ [0, 1] (float tolerance)."""
    v = x[None, :, :] - x[:, None, :]  # v[i, j] = x_j − x_i
    p = point[None, :] - x  # p[i] = point − x_i
    vv = np.einsum("ijd,ijd->ij", v, v)
    np.fill_diagonal(vv, np.inf)
    lam = np.einsum("id,ijd->ij", p, v) / vv
    resid = np.linalg.norm(x[:, None, :] + lam[:, :, None] * v - point, axis=2)
    ok = (resid < 1e-9) & (lam >= -1e-9) & (lam <= 1 + 1e-9)
    return [(int(i), int(j), float(lam[i, j])) for i, j in zip(*np.nonzero(ok), strict=True)]


def knn(x: np.ndarray, labels: list[str], i: int, k: int, metric: str) -> list[int]:
    same = [m for m in range(len(x)) if labels[m] == labels[i] and m != i]
    if metric == "euclidean":
        d = [float(np.linalg.norm(x[m] - x[i])) for m in same]
    else:
        d = [1 - float(x[m] @ x[i] / np.linalg.norm(x[m]) / np.linalg.norm(x[i])) for m in same]
    return [same[r] for r in np.argsort(d, kind="stable")[:k]]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_smote_points_lie_on_same_class_neighbour_segments(metric: str) -> None:
    x, labels = clusters()
    k = 3
    new, new_labels = smote_embeddings(x, labels, {"cart", "purchase"}, 40, k,
                                       rng=random.Random(0), metric=metric)
    assert new.shape == (40, x.shape[1]) and new.dtype == x.dtype
    assert Counter(new_labels) == {"cart": 20, "purchase": 20}
    for point, lab in zip(new, new_labels, strict=True):
        sources = segment_sources(x, point)
        assert sources, "not on any segment between two original points"
        for i, j, lam in sources:
            assert labels[i] == labels[j] == lab  # never interpolates across classes
            assert 0.0 <= lam <= 1.0 + 1e-9
        # the partner is among the k nearest same-class neighbours of the base point
        # (a segment reads both ways: base i, λ or base j, 1 − λ)
        assert any(j in knn(x, labels, i, k, metric) or i in knn(x, labels, j, k, metric)
                   for i, j, _ in sources)


def test_smote_interpolation_factor_is_spread_over_0_1() -> None:
    x = np.array([[0.0], [1.0], [10.0]])
    new, _ = smote_embeddings(x, ["p", "p", "c"], {"p"}, 2_000, rng=random.Random(1))
    lam = np.where(new[:, 0] <= 1.0, new[:, 0], np.nan)  # base 0 → λ, base 1 → 1 − λ
    assert np.all((new >= 0.0) & (new <= 1.0))
    assert abs(float(np.nanmean(lam)) - 0.5) < 0.03
    assert np.histogram(new[:, 0], bins=10, range=(0, 1))[0].min() > 150


def test_smote_deterministic_and_skips_singletons_and_majority() -> None:
    x, labels = clusters(1)
    labels[-1] = "fav"  # a lone fav: no neighbour → no synthetic fav
    a = smote_embeddings(x, labels, {"purchase", "fav"}, 10, rng=random.Random(5))
    b = smote_embeddings(x, labels, {"purchase", "fav"}, 10, rng=random.Random(5))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] == ["purchase"] * 10
    new, lab = smote_embeddings(x, labels, {"nothing"}, 10, rng=random.Random(5))
    assert new.shape == (0, x.shape[1]) and lab == []
    new, lab = smote_embeddings(x, labels, {"cart", "purchase"}, {"cart": 3}, rng=random.Random(0))
    assert lab == ["cart"] * 3


def test_smote_on_tensors_keeps_type_and_gradients() -> None:
    x, labels = clusters(2)
    t = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    new, lab = smote_embeddings(t, labels, {"purchase"}, 12, rng=random.Random(0))
    assert isinstance(new, torch.Tensor) and new.shape == (12, x.shape[1])
    assert new.dtype == torch.float32
    new.sum().backward()
    assert t.grad is not None
    grad_rows = set(torch.nonzero(t.grad.abs().sum(1)).flatten().tolist())
    assert grad_rows and all(labels[r] == "purchase" for r in grad_rows)
    # same plan as the numpy path
    ref, _ = smote_embeddings(x, labels, {"purchase"}, 12, rng=random.Random(0))
    assert np.allclose(new.detach().numpy(), ref, atol=1e-5)


def test_smote_bad_arguments() -> None:
    x, labels = clusters()
    with pytest.raises(ValueError):
        smote_embeddings(x, labels, {"cart"}, 3, rng=random.Random(0), metric="manhattan")
    with pytest.raises(ValueError):
        smote_embeddings(x, labels[:-1], {"cart"}, 3, rng=random.Random(0))


def overlapping(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A majority cloud around 0 with minority points inside it ("hard") and a second
    minority group far away ("easy"), in 2-D."""
    g = np.random.default_rng(seed)
    x = np.vstack([g.normal(0.0, 1.0, size=(200, 2)),      # click
                   g.normal(0.0, 0.6, size=(12, 2)),       # purchase, among the clicks
                   g.normal(12.0, 0.6, size=(12, 2))])     # purchase, alone
    return x, ["click"] * 200 + ["purchase"] * 24


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_imblearn_samplers_stay_in_their_class_neighbourhood_with_exact_counts(
        sampler: str, metric: str) -> None:
    """Every synthetic point lies on a segment between two points of its own class that
    are k-nearest neighbours (so inside the class's convex hull, near its points), and
    each class gets exactly the count asked for, ADASYN included."""
    x, labels = overlapping(1)
    x = np.vstack([x, clusters(2, d=2)[0][60:75] + 6.0])  # a cart class too
    labels = labels + ["cart"] * 15
    k = 3
    want = {"cart": 25, "purchase": 31}
    new, new_labels = synthetic_embeddings(x, labels, {"cart", "purchase"}, want, k,
                                           rng=random.Random(0), metric=metric,
                                           sampler=sampler)
    assert Counter(new_labels) == want and new.shape == (56, 2) and new.dtype == x.dtype
    for point, lab in zip(new, new_labels, strict=True):
        own = x[[i for i, c in enumerate(labels) if c == lab]]
        assert np.all(point >= own.min(0) - 1e-9) and np.all(point <= own.max(0) + 1e-9)
        sources = segment_sources(x, point)
        assert sources, "not on any segment between two original points"
        assert any(labels[i] == labels[j] == lab and
                   (j in knn(x, labels, i, k, metric) or i in knn(x, labels, j, k, metric))
                   for i, j, _ in sources)


def test_adasyn_puts_its_points_where_the_other_classes_are() -> None:
    """ADASYN draws base points ∝ the share of other classes among their neighbours (He
    et al. 2008): the purchases inside the click cloud get nearly all new points; SMOTE
    splits them evenly between the two groups."""
    x, labels = overlapping()
    ada, _ = adasyn_embeddings(x, labels, {"purchase"}, 400, k=5, rng=random.Random(0))
    smo, _ = smote_embeddings(x, labels, {"purchase"}, 400, k=5, rng=random.Random(0))
    hard = lambda pts: float(np.mean(pts[:, 0] < 6.0))  # noqa: E731
    assert hard(ada) > 0.95
    assert 0.35 < hard(smo) < 0.65


def test_adasyn_without_other_classes_nearby_is_smote() -> None:
    """When no point of the class has another class among its neighbours, ADASYN's
    weights are 0/0 (imbalanced-learn refuses); SMOTE's uniform weights are the limit."""
    x, labels = clusters(4)
    for rng_seed in range(3):
        a = adasyn_embeddings(x, labels, {"cart", "purchase"}, 20, k=3,
                              rng=random.Random(rng_seed))
        b = smote_embeddings(x, labels, {"cart", "purchase"}, 20, k=3,
                             rng=random.Random(rng_seed))
        assert np.array_equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_fewer_neighbours_than_k_and_one_class_batches(sampler: str) -> None:
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.4, 0.4], [3.0, 3.0]])
    labels = ["cart", "cart", "cart", "click", "purchase"]
    new, lab = synthetic_embeddings(x, labels, {"cart", "purchase"}, 9, k=5,
                                    rng=random.Random(0), sampler=sampler)
    assert lab == ["cart"] * 9  # k lowered to 2; the lone purchase has no neighbour
    assert np.all(new >= 0.0) and np.all(new.sum(1) <= 1.0 + 1e-9)  # the cart triangle
    only, lab = synthetic_embeddings(x[:3], labels[:3], {"cart"}, 4, k=5,
                                     rng=random.Random(0), sampler=sampler)
    assert lab == ["cart"] * 4 and np.all(only >= 0.0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_imblearn_points_on_tensors_keep_gradients(sampler: str) -> None:
    x, labels = overlapping(2)
    t = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    new, lab = synthetic_embeddings(t, labels, {"purchase"}, 30, rng=random.Random(0),
                                    sampler=sampler)
    assert isinstance(new, torch.Tensor) and new.shape == (30, 2) and len(lab) == 30
    new.sum().backward()
    assert t.grad is not None
    rows = set(torch.nonzero(t.grad.abs().sum(1)).flatten().tolist())
    assert rows and all(labels[r] == "purchase" for r in rows)
    ref, _ = synthetic_embeddings(x, labels, {"purchase"}, 30, rng=random.Random(0),
                                  sampler=sampler)
    assert np.allclose(new.detach().numpy(), ref, atol=1e-5)


def test_unknown_sampler_is_refused() -> None:
    x, labels = clusters()
    with pytest.raises(ValueError, match="unknown sampler"):
        synthetic_embeddings(x, labels, {"cart"}, 3, rng=random.Random(0), sampler="rose")


# ---------------------------------------------------------------------------
# EDA
# ---------------------------------------------------------------------------
TEXTS = [
    "cheap red tee for women with cotton print",
    "wireless phone charger cable fast",
    "kids sneakers size 30 blue",
    "leather handbag",
    "sofa",
    "Nike Sneakers, white.",
]


def test_synonym_map_is_symmetric_and_large_enough() -> None:
    assert len(SYNONYMS) >= 60  # ~30 pairs, both directions
    for word, alts in SYNONYMS.items():
        for alt in alts:
            assert word in SYNONYMS[alt]
    assert "t-shirt" in SYNONYMS["tee"] and "trainers" in SYNONYMS["sneakers"]


def test_augment_text_deterministic_per_seed() -> None:
    for text in TEXTS:
        assert augment_text(text, random.Random(3)) == augment_text(text, random.Random(3))
    outs = {augment_text(TEXTS[0], random.Random(s)) for s in range(50)}
    assert len(outs) > 10


def test_augment_text_never_empty() -> None:
    for seed in range(300):
        rng = random.Random(seed)
        for text in TEXTS:
            assert augment_text(text, rng, p_swap=0.5, p_delete=0.9).strip()
            assert augment_text(text, rng, p_delete=1.0).strip()
    assert augment_text("", random.Random(0)) == ""


def test_augment_text_changes_something_but_keeps_most_tokens() -> None:
    text = TEXTS[0]
    orig = text.split()
    changed, kept = 0, []
    for seed in range(500):
        out = augment_text(text, random.Random(seed))
        changed += out != text
        toks = Counter(out.split())
        kept.append(sum(min(toks[t], n) for t, n in Counter(orig).items()) / len(orig))
    assert changed / 500 >= 0.95
    assert sum(kept) / len(kept) >= 0.75
    assert sum(k >= 0.6 for k in kept) / len(kept) >= 0.9  # ≤ 3 of 8 tokens touched


def test_synonym_replacement_keeps_case_and_punctuation() -> None:
    out = augment_text("Sneakers, white.", random.Random(0), p_swap=0, p_delete=0)
    assert out == "Trainers, white."
    assert augment_text("no known words", random.Random(0), p_swap=0, p_delete=0) == \
        "no known words"


def test_augment_sample_copies_with_new_text_only() -> None:
    s = Sample("e9", "u1", "i2", "purchase", 3.0, tier="tail", weight=4.0,
               user_text="searched cheap phone case", item_text="black smartphone cover slim")
    rng = random.Random(0)
    out = augment_sample(s, rng)
    assert (out.event_id, out.user_id, out.item_id, out.label, out.ts, out.tier, out.weight) == (
        s.event_id, s.user_id, s.item_id, s.label, s.ts, s.tier, s.weight)
    assert (out.user_text, out.item_text) != (s.user_text, s.item_text)
    assert augment_sample(s, random.Random(0)) == out
