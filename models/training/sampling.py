"""Re-sampling batch builders and minority augmentation: pure functions, seeded by the caller.

Batch builders (``BATCH_BUILDERS``; all take ``samples, target_mix, batch_size, rng``):

* ``none``: a uniform sample of the buffer (the natural, imbalanced mix).
* ``oversample``: random oversampling (Japkowicz, "The Class Imbalance Problem:
  Significance and Strategies", ICAI 2000; He & Garcia, "Learning from Imbalanced Data",
  IEEE TKDE 2009). Every class that the target mix *up-weights* (quota above its natural
  share) is drawn i.i.d. **with replacement**, duplicating minority samples; the others are
  drawn without replacement.
* ``undersample``: random undersampling (same sources): every class is drawn **without
  replacement**, discarding the surplus of the majority classes; only a class whose pool is
  smaller than its quota is topped up with replacement, so the target mix always holds.

Quotas: ``q_c = batch_size · t_c / Σ_{c' present} t_{c'}`` over the classes of the target mix
that occur in ``samples`` (a wanted class with no sample cannot be drawn; its share goes to
the others), rounded by largest remainder so they sum to ``batch_size``. Classes missing
from the target mix get no quota.

SMOTE (Chawla et al., "SMOTE: Synthetic Minority Over-sampling Technique", JAIR 2002),
:func:`smote_embeddings`: ``x_new = x_i + λ (x_nn − x_i)``, ``λ ~ U(0, 1)``, with ``x_nn`` one
of the k nearest neighbours of ``x_i`` *within the same class*. It is applied in embedding
space, on the pooled user/item embeddings right before the outcome head — never on raw
text or token ids, where an interpolation means nothing. For text, :func:`augment_text`
uses EDA (Wei & Zou, "EDA: Easy Data Augmentation Techniques for Boosting Performance on
Text Classification Tasks", EMNLP 2019): synonym replacement, random swap, random deletion.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from tailstream.models.imbalance.buffer import Sample

BatchBuilder = Callable[[Sequence[Sample], Mapping[str, float], int, random.Random], list[Sample]]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


# ---------------------------------------------------------------------------
# Batch builders
# ---------------------------------------------------------------------------
def mix(batch: Sequence[Sample]) -> dict[str, float]:
    """Class shares of a batch (empty batch → ``{}``).

    >>> mix([Sample("a", "u", "i", "click", 0.0)] * 3 + [Sample("b", "u", "i", "cart", 0.0)])
    {'click': 0.75, 'cart': 0.25}
    """
    n = len(batch)
    return {c: k / n for c, k in Counter(s.label for s in batch).items()} if n else {}


def quotas(target_mix: Mapping[str, float], available: Mapping[str, int],
           batch_size: int) -> dict[str, int]:
    """Per-class counts for a batch: the target mix over the classes available, by largest
    remainder (Hamilton) so they sum to ``batch_size`` exactly.

    >>> quotas({"click": 0.4, "cart": 0.2, "fav": 0.2, "purchase": 0.2},
    ...        {"click": 900, "cart": 50, "purchase": 20}, 10)
    {'click': 5, 'cart': 3, 'purchase': 2}
    """
    if batch_size < 0:
        raise ValueError("batch_size must be >= 0")
    wanted = {c: float(t) for c, t in target_mix.items() if t > 0 and available.get(c, 0) > 0}
    total = sum(wanted.values())
    if total <= 0:
        return {}
    exact = {c: batch_size * t / total for c, t in wanted.items()}
    out = {c: int(x) for c, x in exact.items()}
    left = batch_size - sum(out.values())
    # Largest fractional part first; ties by the order of the target mix (deterministic).
    for c in sorted(exact, key=lambda c: out[c] - exact[c])[:left]:
        out[c] += 1
    return out


def _by_class(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.label].append(s)
    return dict(groups)


def _draw(pool: Sequence[Sample], k: int, rng: random.Random, replace: bool) -> list[Sample]:
    if replace:
        return rng.choices(pool, k=k)
    if k <= len(pool):
        return rng.sample(pool, k)
    # Not enough distinct samples: take them all, then top up with replacement.
    return rng.sample(pool, len(pool)) + rng.choices(pool, k=k - len(pool))


def _build(samples: Sequence[Sample], target_mix: Mapping[str, float], batch_size: int,
           rng: random.Random, upweighted_with_replacement: bool) -> list[Sample]:
    groups = _by_class(samples)
    q = quotas(target_mix, {c: len(g) for c, g in groups.items()}, batch_size)
    n = len(samples)
    batch: list[Sample] = []
    for c, k in q.items():
        upweighted = k / max(batch_size, 1) > len(groups[c]) / n
        batch.extend(_draw(groups[c], k, rng, replace=upweighted_with_replacement and upweighted))
    rng.shuffle(batch)  # classes must not arrive in blocks (BatchNorm, per-step metrics)
    return batch


def oversample(samples: Sequence[Sample], target_mix: Mapping[str, float], batch_size: int,
               rng: random.Random) -> list[Sample]:
    """Random oversampling to the target mix: up-weighted classes drawn with replacement.

    >>> pool = [Sample(f"c{i}", "u", "i", "click", 0.0) for i in range(9)]
    >>> pool.append(Sample("p0", "u", "i", "purchase", 0.0))
    >>> mix(oversample(pool, {"click": 0.5, "purchase": 0.5}, 8, random.Random(0)))
    {'purchase': 0.5, 'click': 0.5}
    """
    return _build(samples, target_mix, batch_size, rng, upweighted_with_replacement=True)


def undersample(samples: Sequence[Sample], target_mix: Mapping[str, float], batch_size: int,
                rng: random.Random) -> list[Sample]:
    """Random undersampling to the target mix: without replacement while a class has enough.

    >>> pool = [Sample(f"c{i}", "u", "i", "click", 0.0) for i in range(90)]
    >>> pool += [Sample(f"p{i}", "u", "i", "purchase", 0.0) for i in range(10)]
    >>> batch = undersample(pool, {"click": 0.5, "purchase": 0.5}, 20, random.Random(0))
    >>> sorted(mix(batch).items()), len({s.event_id for s in batch})
    ([('click', 0.5), ('purchase', 0.5)], 20)
    """
    return _build(samples, target_mix, batch_size, rng, upweighted_with_replacement=False)


def uniform(samples: Sequence[Sample], target_mix: Mapping[str, float], batch_size: int,
            rng: random.Random) -> list[Sample]:
    """The natural mix: ``batch_size`` samples drawn uniformly (``target_mix`` is ignored);
    without replacement when the pool is large enough."""
    if not samples:
        return []
    return _draw(samples, batch_size, rng, replace=False)


BATCH_BUILDERS: dict[str, BatchBuilder] = {
    "none": uniform,
    "oversample": oversample,
    "undersample": undersample,
}
STRATEGIES: tuple[str, ...] = tuple(BATCH_BUILDERS)


def build_batch(strategy: str, samples: Sequence[Sample], target_mix: Mapping[str, float],
                batch_size: int, rng: random.Random) -> list[Sample]:
    """Dispatch to ``BATCH_BUILDERS[strategy]``."""
    try:
        builder = BATCH_BUILDERS[strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}") from None
    return builder(samples, target_mix, batch_size, rng)


# ---------------------------------------------------------------------------
# SMOTE and ADASYN in embedding space (imbalanced-learn)
# ---------------------------------------------------------------------------
SAMPLERS: tuple[str, ...] = ("smote", "adasyn")
"""Synthetic minority samplers of :func:`synthetic_embeddings` (imbalanced-learn's)."""

Pair = tuple[int, int, float]
"""``(p, q, w)``: a synthetic point ``x_p + w (x_q − x_p)``, ``w ∈ [0, 1]``."""


def _split(n_new: int, classes: Sequence[str]) -> dict[str, int]:
    base, extra = divmod(n_new, len(classes))
    return {c: base + (i < extra) for i, c in enumerate(classes)}


def synthetic_embeddings(embeddings: ArrayT, labels: Sequence[str], minority: Collection[str],
                         n_new: int | Mapping[str, int], k: int = 5, *, rng: random.Random,
                         metric: str = "euclidean", sampler: str = "smote"
                         ) -> tuple[ArrayT, list[str]]:
    """Synthetic minority points ``x_new = x_i + λ (x_nn − x_i)``, ``λ ~ U(0, 1)``, ``x_nn``
    one of the k nearest neighbours of ``x_i`` *in its own class*, made by imbalanced-learn
    (Lemaître et al., JMLR 2017):

    * ``smote``: base points uniform over the class (Chawla et al., "SMOTE: Synthetic
      Minority Over-sampling Technique", JAIR 2002), ``imblearn.over_sampling.SMOTE``;
    * ``adasyn``: base point ``i`` drawn ∝ ``r_i = Δ_i / k``, the share of *other* classes
      among its k nearest neighbours in the whole batch, so hard, boundary points get more
      synthetic neighbours (He et al., "ADASYN: Adaptive Synthetic Sampling Approach for
      Imbalanced Learning", IJCNN 2008), ``imblearn.over_sampling.ADASYN``. Where every
      ``r_i`` is 0 (no other class near any of the class's points) ADASYN's weights are
      undefined and the uniform weights of SMOTE, their limit, are used.

    ``n_new`` (int) is split evenly over the minority classes with at least two samples (a
    lone point has no neighbour), or given per class as a mapping; the counts are exact
    (ADASYN's rounding is absorbed by asking for a little more and keeping a uniform subset).
    ``k`` is lowered to ``n_c − 1`` for a class of ``n_c`` points. ``metric`` picks the
    neighbours only: ``"euclidean"`` (the papers) or ``"cosine"`` (sentence-embedding
    spaces; neighbours by euclidean distance of unit vectors, the same order). The
    interpolation is always linear on the vectors as given.

    imbalanced-learn returns points, not the pairs behind them; to rebuild each point from
    its two endpoints (so that, for a tensor input, gradients flow to both with torch ops)
    every row gets an index block: row ``i`` of the class ``s·e_i``, every other row
    ``s·e_{n_c+1}``. That adds the same ``2s²`` to every squared distance from a class
    point, so no neighbour changes, and a synthetic point's block is
    ``s((1 − λ) e_i + λ e_nn)``: the pair and λ, exactly.

    >>> x = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    >>> new, lab = synthetic_embeddings(x, ["buy", "buy", "click"], {"buy"}, 3,
    ...                                 rng=random.Random(0))
    >>> lab, bool(np.all(new[:, 1] == 0.0)), bool(np.all((0 <= new[:, 0]) & (new[:, 0] <= 1)))
    (['buy', 'buy', 'buy'], True, True)
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError("metric must be 'euclidean' or 'cosine'")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    if k < 1:
        raise ValueError("k must be >= 1")
    n = int(embeddings.shape[0])
    if len(labels) != n:
        raise ValueError("need one label per embedding row")
    x = (embeddings.detach().cpu().double().numpy() if isinstance(embeddings, torch.Tensor)
         else np.asarray(embeddings, dtype=np.float64))
    space = x
    if metric == "cosine":
        space = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    members: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        if lab in minority:
            members[lab].append(i)
    eligible = [c for c in sorted(members) if len(members[c]) >= 2]
    if isinstance(n_new, Mapping):
        plan = {c: int(n_new.get(c, 0)) for c in eligible}
    else:
        plan = _split(n_new, eligible) if eligible else {}
    pairs: list[Pair] = []
    new_labels: list[str] = []
    for c in eligible:
        if plan[c] <= 0:
            continue
        idx = members[c]
        got = oversample_class(space, idx, plan[c], min(k, len(idx) - 1), sampler,
                               rng.randrange(2**31 - 1))
        pairs.extend((idx[p], idx[q], w) for p, q, w in got)
        new_labels.extend([c] * len(got))
    return _interpolate(embeddings, x, pairs), new_labels


def smote_embeddings(embeddings: ArrayT, labels: Sequence[str], minority: Collection[str],
                     n_new: int | Mapping[str, int], k: int = 5, *, rng: random.Random,
                     metric: str = "euclidean") -> tuple[ArrayT, list[str]]:
    """SMOTE (Chawla et al., JAIR 2002) by imbalanced-learn:
    :func:`synthetic_embeddings` with ``sampler="smote"``.

    >>> x = np.array([[0.0], [2.0], [9.0]])
    >>> new, lab = smote_embeddings(x, ["p", "p", "c"], {"p"}, 4, rng=random.Random(0))
    >>> lab, bool(np.all((0 <= new) & (new <= 2)))
    (['p', 'p', 'p', 'p'], True)
    """
    return synthetic_embeddings(embeddings, labels, minority, n_new, k, rng=rng,
                                metric=metric, sampler="smote")


def adasyn_embeddings(embeddings: ArrayT, labels: Sequence[str], minority: Collection[str],
                      n_new: int | Mapping[str, int], k: int = 5, *, rng: random.Random,
                      metric: str = "euclidean") -> tuple[ArrayT, list[str]]:
    """ADASYN (He et al., IJCNN 2008) by imbalanced-learn:
    :func:`synthetic_embeddings` with ``sampler="adasyn"``.

    >>> x = np.array([[0.0], [1.0], [1.2], [9.0]])
    >>> new, lab = adasyn_embeddings(x, ["p", "p", "c", "p"], {"p"}, 5, k=1,
    ...                              rng=random.Random(0))
    >>> len(lab), bool(np.all((0 <= new) & (new <= 9)))
    (5, True)
    """
    return synthetic_embeddings(embeddings, labels, minority, n_new, k, rng=rng,
                                metric=metric, sampler="adasyn")


def oversample_class(space: np.ndarray, members: Sequence[int], count: int, k: int,
                     sampler: str, seed: int) -> list[Pair]:
    """``count`` synthetic points of the class whose rows of ``space`` are ``members``,
    made by imbalanced-learn's ``sampler`` with ``k`` neighbours, as pairs of positions in
    ``members`` (see :func:`synthetic_embeddings` for the index block that recovers them).

    With one neighbour, 0 ↔ 1 and 3 → 1 are the only segments (never 0 – 3):

    >>> space = np.array([[0.0], [1.0], [3.0], [9.0]])
    >>> pairs = oversample_class(space, [0, 1, 2], 6, 1, "smote", 0)
    >>> len(pairs), sorted({tuple(sorted((p, q))) for p, q, _ in pairs})
    (6, [(0, 1), (1, 2)])
    """
    if sampler == "smote":  # SMOTE's neighbours are within the class: other rows play no part
        space, members = space[list(members)], range(len(members))
    n, m = len(space), len(members)
    in_class = np.zeros(n, dtype=bool)
    in_class[list(members)] = True
    spread = float(np.sqrt(((space - space.mean(0)) ** 2).sum(1).mean())) if n else 0.0
    scale = spread if spread > 1e-12 else 1.0
    block = np.zeros((n, m + 1))
    block[list(members), np.arange(m)] = scale
    block[~in_class, m] = scale
    xs, y = np.hstack([space, block]), in_class.astype(int)
    if in_class.all():  # imbalanced-learn needs a second class: a stand-in SMOTE never uses
        stand_in = np.zeros((1, xs.shape[1]))
        stand_in[0, -1] = scale
        xs, y = np.vstack([xs, stand_in]), np.append(y, 0)
        sampler = "smote"  # ADASYN's density over other classes is undefined without any
    ask = count if sampler == "smote" else count + (m + 1) // 2  # ADASYN rounds per point
    try:
        out = _resampler(sampler, k, {1: m + ask}, seed).fit_resample(xs, y)[0]
    except (RuntimeError, ValueError):
        if sampler == "smote":
            raise
        # ADASYN: no class point has another class among its neighbours (weights 0/0), or
        # its rounding left nothing to make: SMOTE's uniform weights are the limit.
        return oversample_class(space, members, count, k, "smote", seed)
    codes = out[len(xs):, space.shape[1]:space.shape[1] + m] / scale
    if len(codes) > count:
        keep = np.sort(np.random.default_rng(seed).choice(len(codes), count, replace=False))
        codes = codes[keep]
    top = np.argsort(-codes, axis=1, kind="stable")[:, :2]
    a = codes[np.arange(len(codes)), top[:, 0]]
    b = codes[np.arange(len(codes)), top[:, 1]] if m > 1 else np.zeros(len(codes))
    pairs: list[Pair] = []
    for p, q, wa, wb in zip(top[:, 0], top[:, 1] if m > 1 else top[:, 0], a, b, strict=True):
        w = float(wb / (wa + wb)) if wb > 1e-9 else 0.0
        pairs.append((int(p), int(q) if w > 0 else int(p), w))
    return pairs


def _resampler(sampler: str, k: int, strategy: dict[int, int], seed: int) -> Any:
    from imblearn.over_sampling import ADASYN, SMOTE

    if sampler == "adasyn":
        return ADASYN(sampling_strategy=strategy, n_neighbors=k, random_state=seed)
    return SMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=seed)


def _interpolate(embeddings: ArrayT, x: np.ndarray, pairs: Sequence[Pair]) -> ArrayT:
    """``x_p + w (x_q − x_p)`` per pair; torch ops for a tensor (gradients reach both
    endpoints), the input's dtype for an array."""
    d = int(embeddings.shape[1])
    p = [a for a, _, _ in pairs]
    q = [b for _, b, _ in pairs]
    if isinstance(embeddings, torch.Tensor):
        w_t = torch.tensor([w for _, _, w in pairs], dtype=embeddings.dtype,
                           device=embeddings.device)[:, None]
        xp, xq = embeddings[p], embeddings[q]
        return (xp + w_t * (xq - xp)).reshape(len(pairs), d)
    w_a = np.asarray([w for _, _, w in pairs], dtype=np.float64)[:, None]
    out = (x[p] + w_a * (x[q] - x[p])).reshape(len(pairs), d)
    return out.astype(np.asarray(embeddings).dtype, copy=False)


# ---------------------------------------------------------------------------
# EDA text augmentation
# ---------------------------------------------------------------------------
_SYNONYM_PAIRS: tuple[tuple[str, str], ...] = (
    ("tee", "t-shirt"), ("sneakers", "trainers"), ("phone", "smartphone"),
    ("cheap", "affordable"), ("sofa", "couch"), ("pants", "trousers"), ("jumper", "sweater"),
    ("hoodie", "sweatshirt"), ("laptop", "notebook"), ("earphones", "earbuds"),
    ("headphones", "headset"), ("handbag", "purse"), ("cap", "hat"), ("tv", "television"),
    ("fridge", "refrigerator"), ("kids", "children"), ("women", "ladies"), ("men", "gents"),
    ("small", "mini"), ("large", "big"), ("sale", "discount"), ("gift", "present"),
    ("jacket", "coat"), ("shoes", "footwear"), ("perfume", "fragrance"), ("mug", "cup"),
    ("backpack", "rucksack"), ("cable", "cord"), ("sunglasses", "shades"),
    ("cosmetics", "makeup"), ("pillow", "cushion"), ("bottle", "flask"),
)


def _synonym_map(pairs: Sequence[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = defaultdict(list)
    for a, b in pairs:
        out[a].append(b)
        out[b].append(a)
    return {w: tuple(alts) for w, alts in out.items()}


SYNONYMS: dict[str, tuple[str, ...]] = _synonym_map(_SYNONYM_PAIRS)
_PUNCT = ".,;:!?()[]\"'"


def _synonym(token: str, rng: random.Random) -> str | None:
    core = token.strip(_PUNCT)
    alts = SYNONYMS.get(core.lower())
    if not core or not alts:
        return None
    alt = rng.choice(alts)
    if core[0].isupper():
        alt = alt[0].upper() + alt[1:]
    start = token.index(core)
    return token[:start] + alt + token[start + len(core):]


def augment_text(text: str, rng: random.Random, p_swap: float = 0.1, p_delete: float = 0.1,
                 n_synonym: int = 1) -> str:
    """EDA (Wei & Zou, EMNLP 2019) on whitespace tokens, in this order:

    1. synonym replacement: ``n_synonym`` tokens found in :data:`SYNONYMS` (e-commerce
       terms, both directions) replaced by a synonym, case kept;
    2. random swap: ``max(1, round(p_swap · L))`` swaps of two random positions (if
       ``p_swap > 0`` and ``L ≥ 2``);
    3. random deletion: each token dropped with probability ``p_delete``; if all would go,
       one random token is kept, so a non-empty text never becomes empty.

    Blank input is returned unchanged. Same ``rng`` state → same output.

    >>> augment_text("cheap red tee", random.Random(1), p_swap=0, p_delete=0, n_synonym=2)
    'affordable red t-shirt'
    """
    tokens = text.split()
    if not tokens:
        return text
    # 1. synonym replacement, on distinct positions
    positions = [i for i, t in enumerate(tokens) if t.strip(_PUNCT).lower() in SYNONYMS]
    for i in rng.sample(positions, min(max(n_synonym, 0), len(positions))):
        tokens[i] = _synonym(tokens[i], rng) or tokens[i]
    # 2. random swap
    if p_swap > 0 and len(tokens) >= 2:
        for _ in range(max(1, round(p_swap * len(tokens)))):
            a, b = rng.sample(range(len(tokens)), 2)
            tokens[a], tokens[b] = tokens[b], tokens[a]
    # 3. random deletion
    if p_delete > 0 and len(tokens) >= 2:
        kept = [t for t in tokens if rng.random() >= p_delete]
        tokens = kept or [rng.choice(tokens)]
    return " ".join(tokens)


def augment_sample(sample: Sample, rng: random.Random, p_swap: float = 0.1,
                   p_delete: float = 0.1, n_synonym: int = 1) -> Sample:
    """A copy with EDA-augmented ``user_text`` and ``item_text``; ids, label and weight are
    kept (the copy lives only inside a training batch). The caller applies it to minority
    classes only.

    >>> s = Sample("e", "u", "i", "purchase", 0.0, user_text="cheap phone", item_text="tee")
    >>> augment_sample(s, random.Random(0), p_swap=0, p_delete=0).item_text
    't-shirt'
    """
    return dataclasses.replace(
        sample,
        user_text=augment_text(sample.user_text, rng, p_swap, p_delete, n_synonym),
        item_text=augment_text(sample.item_text, rng, p_swap, p_delete, n_synonym),
    )
