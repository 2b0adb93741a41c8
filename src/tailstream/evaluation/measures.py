"""Pure metric functions the evaluation adds to :mod:`tailstream.models.training.metrics`:
standard errors, the G-mean over classes, ROC-AUC, and MAP@K of single-target lists."""

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
