"""Evaluation metrics: pure functions over labels, scores and ranks.

Classification (the outcome head, the river fast path):

* per-class precision, recall and F1 from a (sample-weighted) confusion count;
  ``macro_f1`` is their unweighted mean over the classes present (Sokolova & Lapalme,
  "A systematic analysis of performance measures for classification tasks", IPM 2009);
* ``average_precision``: area under the precision-recall curve as the mean of precision
  at each positive (the step-wise AP of scikit-learn; Davis & Goadrich, ICML 2006, on why
  PR beats ROC under heavy imbalance).

Ranking (next-item retrieval), for the rank ``r ≥ 1`` of the true item:

* ``HitRate@K = 1[r ≤ K]``; ``NDCG@K = 1[r ≤ K] / log2(r + 1)`` (one relevant item, so the
  ideal DCG is 1; Järvelin & Kekäläinen, TOIS 2002); ``MRR = 1 / r``.

Exposure: catalogue ``coverage`` (distinct items shown / catalogue size) and the Gini
coefficient of exposure counts (0: every item shown equally; → 1: one item gets it all).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def classification_report(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str],
                          weights: Sequence[float] | None = None) -> dict[str, float]:
    """Per-class precision/recall/F1 (keys ``precision_{c}``, ``recall_{c}``, ``f1_{c}``),
    ``macro_f1``, ``accuracy`` and ``support_{c}``. ``weights`` (one per sample) reweight
    the counts, e.g. to report on the stream's class mix from a resampled evaluation set.

    >>> r = classification_report(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    >>> r["recall_a"], r["precision_b"], round(r["macro_f1"], 4)
    (0.5, 0.6666666666666666, 0.7333)
    """
    w = [1.0] * len(y_true) if weights is None else [float(x) for x in weights]
    out: dict[str, float] = {}
    f1s: list[float] = []
    correct = 0.0
    for c in classes:
        tp = sum((wi for t, p, wi in zip(y_true, y_pred, w, strict=True) if t == c == p), 0.0)
        pos = sum((wi for t, wi in zip(y_true, w, strict=True) if t == c), 0.0)
        pred = sum((wi for p, wi in zip(y_pred, w, strict=True) if p == c), 0.0)
        precision = tp / pred if pred else 0.0
        recall = tp / pos if pos else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[f"precision_{c}"] = precision
        out[f"recall_{c}"] = recall
        out[f"f1_{c}"] = f1
        out[f"support_{c}"] = pos
        correct += tp
        if pos:
            f1s.append(f1)
    out["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    out["accuracy"] = correct / sum(w) if w else 0.0
    return out


def macro_recall(report: Mapping[str, float], classes: Iterable[str]) -> float:
    """Mean recall over ``classes`` that have support in ``report``.

    >>> macro_recall({"recall_a": 0.5, "support_a": 2, "recall_b": 1.0, "support_b": 0},
    ...              ["a", "b"])
    0.5
    """
    vals = [report[f"recall_{c}"] for c in classes if report.get(f"support_{c}", 0) > 0]
    return float(np.mean(vals)) if vals else 0.0


def average_precision(y_true: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the precision-recall curve, ``Σ_k P@k · Δrecall_k`` over ranks sorted by
    score (ties broken by order); 0 when there is no positive.

    >>> average_precision([True, False, True, False], [0.9, 0.8, 0.7, 0.1])
    0.8333333333333333
    """
    y = np.asarray(y_true, dtype=bool)
    if not y.any():
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = y[order]
    cum = np.cumsum(hits)
    precision_at = cum / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def rank_metrics(ranks: Iterable[int], ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """Mean ``hit_at_K``, ``ndcg_at_K`` and ``mrr`` over the 1-based ranks of true items
    (a rank of 0 means the item was not ranked at all: a miss everywhere).

    >>> m = rank_metrics([1, 3, 0], ks=(2,))
    >>> round(m["hit_at_2"], 4), round(m["ndcg_at_2"], 4), round(m["mrr"], 4)
    (0.3333, 0.3333, 0.4444)
    """
    r = np.asarray(list(ranks), dtype=np.float64)
    out: dict[str, float] = {}
    if r.size == 0:
        return {**{f"hit_at_{k}": 0.0 for k in ks}, **{f"ndcg_at_{k}": 0.0 for k in ks},
                "mrr": 0.0}
    ranked = r > 0
    for k in ks:
        hit = ranked & (r <= k)
        out[f"hit_at_{k}"] = float(hit.mean())
        out[f"ndcg_at_{k}"] = float(np.where(hit, 1.0 / np.log2(np.maximum(r, 1) + 1), 0.0)
                                    .mean())
    out["mrr"] = float(np.where(ranked, 1.0 / np.maximum(r, 1), 0.0).mean())
    return out


def rank_of(scores: np.ndarray, target: int) -> int:
    """1-based rank of column ``target`` in a score row (ties count against it).

    >>> rank_of(np.array([0.1, 0.9, 0.5]), 2)
    2
    """
    return int((scores > scores[target]).sum()) + 1


def coverage(shown: Iterable[str], catalogue_size: int) -> float:
    """Distinct items shown over the catalogue size.

    >>> coverage(["a", "b", "a"], 4)
    0.5
    """
    return len(set(shown)) / catalogue_size if catalogue_size else 0.0


def gini(counts: Iterable[float]) -> float:
    """Gini coefficient of non-negative exposure counts (include zeros for unshown items):
    ``G = Σ_i (2i − n − 1) x_(i) / (n Σ x)`` over ascending ``x_(i)``.

    >>> gini([1, 1, 1, 1]), gini([0, 0, 0, 4])
    (0.0, 0.75)
    """
    x = np.sort(np.asarray(list(counts), dtype=np.float64))
    n = x.size
    if n == 0 or x.sum() <= 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * x.sum()))


def lorenz_curve(counts: Iterable[float]) -> tuple[list[float], list[float]]:
    """Points of the exposure Lorenz curve: cumulative share of items (ascending exposure)
    against the cumulative share of exposure they receive."""
    x = np.sort(np.asarray(list(counts), dtype=np.float64))
    if x.size == 0 or x.sum() <= 0:
        return [0.0, 1.0], [0.0, 1.0]
    cum = np.concatenate([[0.0], np.cumsum(x) / x.sum()])
    share = np.linspace(0.0, 1.0, x.size + 1)
    return share.tolist(), cum.tolist()


def safe_ratio(a: float, b: float) -> float:
    """``a / b``, 0 when ``b`` is 0 or either is not finite."""
    if not b or not math.isfinite(a) or not math.isfinite(b):
        return 0.0
    return a / b
