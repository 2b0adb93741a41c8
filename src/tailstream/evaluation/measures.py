"""Pure metric functions the evaluation adds to :mod:`tailstream.models.training.metrics`:
standard errors (of proportions, means, macro recall, the G-mean and the average
precision), the G-mean over classes, ROC-AUC, MAP@K of single-target lists, and the
inverse-propensity estimate of a candidate's online hit rate from logged lists."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def binomial_se(p: float, n: int) -> float:
    """Standard error of a proportion ``p`` measured on ``n`` independent trials,
    ``sqrt(p (1 − p) / n)`` (the normal approximation; 0 when ``n`` is 0). For a HitRate
    the trials are the scored lists.

    >>> round(binomial_se(0.02, 15_847), 5)
    0.00111
    >>> binomial_se(0.5, 0)
    0.0
    """
    if n <= 0:
        return 0.0
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def mean_se(values: Sequence[float]) -> float:
    """Standard error of a mean, ``s / sqrt(n)`` with the sample standard deviation
    ``s`` (ddof 1); 0 for fewer than two values.

    >>> round(mean_se([0.0, 1.0, 0.5, 0.5]), 4)
    0.2041
    """
    if len(values) < 2:
        return 0.0
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(len(values)))


def g_mean(recalls: Sequence[float]) -> float:
    """Geometric mean of per-class recalls, ``(Π_c recall_c)^(1/K)`` (Kubat & Matwin,
    "Addressing the curse of imbalanced training sets: one-sided selection", ICML 1997):
    0 as soon as one class is never recognised. Pass only the classes the data has.

    >>> g_mean([0.9, 0.4]), g_mean([1.0, 0.0]), g_mean([])
    (0.6, 0.0, 0.0)
    """
    if not recalls or min(recalls) <= 0.0:
        return 0.0
    return float(round(math.exp(sum(math.log(r) for r in recalls) / len(recalls)), 12))


def macro_recall_se(recalls: Sequence[float], supports: Sequence[int]) -> float:
    """Standard error of a macro-averaged recall over ``m`` classes, each recall a
    proportion over its class's ``n_c`` events: ``sqrt(Σ_c r_c (1 − r_c) / n_c) / m``
    (independent binomials).

    >>> round(macro_recall_se([0.25, 0.25], [1000, 1000]), 4)
    0.0097
    """
    if not recalls:
        return 0.0
    var = sum(binomial_se(r, n) ** 2 for r, n in zip(recalls, supports, strict=True))
    return math.sqrt(var) / len(recalls)


def g_mean_se(recalls: Sequence[float], supports: Sequence[int]) -> float:
    """Standard error of the G-mean ``G = (Π_c r_c)^(1/K)`` by the delta method:
    ``∂G/∂r_c = G / (K r_c)``, so ``se(G) = (G / K) sqrt(Σ_c (1 − r_c) / (r_c n_c))``;
    0 when ``G`` is 0 (a class never recognised).

    >>> round(g_mean_se([0.5, 0.5], [1000, 1000]), 4)
    0.0112
    """
    g = g_mean(recalls)
    if g <= 0.0:
        return 0.0
    var = sum((1.0 - r) / (r * n) for r, n in zip(recalls, supports, strict=True) if n > 0)
    return g / len(recalls) * math.sqrt(var)


def average_precision_se(y_true: Sequence[bool], scores: Sequence[float],
                         resamples: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of the average precision (PR-AUC): the standard deviation
    of ``Σ_i w_i y_i P_i / Σ_i w_i y_i`` over Poisson(1) resampling weights ``w``, where
    ``P_i = Σ_{j ≤ i} w_j y_j / Σ_{j ≤ i} w_j`` down the score order (the Poisson
    bootstrap, Hanley & MacGibbon 2006; no closed form exists for AP).

    >>> y = [i % 10 == 0 for i in range(2000)]
    >>> 0.005 < average_precision_se(y, [0.5 * t + (i % 7) / 7 for i, t in enumerate(y)]) < 0.05
    True
    """
    y = np.asarray(y_true, dtype=np.float64)
    if y.sum() == 0 or resamples < 2:
        return 0.0
    y = y[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")]
    rng = np.random.default_rng(seed)
    aps = []
    for _ in range(resamples):
        w = rng.poisson(1.0, len(y)).astype(np.float64)
        wy = w * y
        total = wy.sum()
        if total == 0:
            continue
        precision = np.cumsum(wy) / np.maximum(np.cumsum(w), 1e-12)
        aps.append(float((wy * precision).sum() / total))
    return float(np.std(aps, ddof=1)) if len(aps) > 1 else 0.0


def roc_auc(y_true: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a
    random negative, ties counting one half (the Mann–Whitney U statistic over mid-ranks;
    Hanley & McNeil, Radiology 1982). None without both a positive and a negative.

    >>> roc_auc([True, False, True, False], [0.9, 0.8, 0.7, 0.1])
    0.75
    >>> roc_auc([True, False], [0.5, 0.5]), roc_auc([True], [0.3])
    (0.5, None)
    """
    y = np.asarray(y_true, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    # Mid-ranks: every run of equal scores shares the mean of its positions (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2.0
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision_at_k(rank: int, k: int) -> float:
    """AP@K of a list with one relevant item at 1-based ``rank`` (0: not in the list):
    ``1 / rank`` if ``rank ≤ K``, else 0 — the Kaggle convention for search → click logs,
    where the mean over queries is MAP@K.

    >>> average_precision_at_k(2, 5), average_precision_at_k(6, 5), average_precision_at_k(0, 5)
    (0.5, 0.0, 0.0)
    """
    return 1.0 / rank if 1 <= rank <= k else 0.0


def ips_hit_rate(logged: Sequence[int], candidate: Sequence[int], k: int = 20,
                 eta: float = 1.0) -> tuple[float, float, float | None]:
    """Inverse-propensity (IPS) estimate of a candidate's online hit rate from the lists a
    logging policy showed, positions as propensities (the position-based click model:
    position p is examined with probability ``θ(p) = p^(−η)``; Joachims, Swaminathan &
    Schnabel, WSDM 2017). ``logged[n]`` and ``candidate[n]`` are the 1-based ranks of
    interaction n's item in the logged and in the candidate's list (0: not in it). An
    interaction on a logged item at rank r is a click observed with propensity θ(r); the
    candidate would have shown it at rank r', where it is examined with θ(r'):

        V̂ = (1/N) Σ_n 1[1 ≤ r_n ≤ k] · 1[1 ≤ r'_n ≤ k] · θ(r'_n) / θ(r_n)

    Returns ``(V̂, its standard error, support)``: support is the share of the candidate's
    own hits (``1 ≤ r' ≤ k``) on items the logging policy showed too — the rest cannot be
    seen in the log, so V̂ under-estimates a candidate that finds other items by about that
    share (None when the candidate hits nothing). For the logging policy itself V̂ is its
    HitRate@k.

    >>> ips_hit_rate([1, 2, 0, 4], [2, 1, 3, 0])
    (0.625, 0.473242, 0.666667)
    >>> ips_hit_rate([1, 2, 0], [1, 2, 0])[0]  # the logging policy: its HitRate@20
    0.666667
    >>> ips_hit_rate([], [])
    (0.0, 0.0, None)
    """
    terms: list[float] = []
    hits = both = 0
    for r, r2 in zip(logged, candidate, strict=True):
        shown, mine = 1 <= r <= k, 1 <= r2 <= k
        hits += mine
        both += shown and mine
        terms.append((r / r2) ** eta if shown and mine else 0.0)
    if not terms:
        return 0.0, 0.0, None
    value = sum(terms) / len(terms)
    return (round(value, 6), round(mean_se(terms), 6),
            round(both / hits, 6) if hits else None)
