"""The online fast path: a river classifier that learns from every interaction.

It predicts the *class* of an interaction (click / cart / fav / purchase) from cheap
features known before the event, prequentially: each event is first predicted, then
learned from ("test-then-train", Dawid 1984; Gama et al., "On evaluating stream learning
algorithms", Machine Learning 2013). Its scores improve between fine-tunes of the
transformer, and its prequential error feeds the drift detector.

Imbalance handling (river's tools, chosen by ``imbalance``):

* ``"weights"``: ``learn_one(x, y, w)`` with ``w`` the live class weight from the
  imbalance loop (the same policy the transformer's loss uses).
* ``"oversample"``: :class:`river.imblearn.RandomOverSampler` towards a uniform class mix.
* ``"none"``: plain learning.

Prequential metrics: macro-F1, recall per class, ROC-AUC of ``p(purchase)``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import compose, imblearn, linear_model, metrics, multiclass, optim, preprocessing

from tailstream.contract import CLASSES
from tailstream.models.imbalance.features import (
    FEATURE_NAMES,
    LOG_SCALE,
    Features,
    interaction_features,
)

__all__ = ["FastPathSnapshot", "Features", "OnlineOutcomeModel", "PerClassRecall",
           "interaction_features"]

_UNSCALE = np.array([LOG_SCALE if n.startswith("log_") else 1.0 for n in FEATURE_NAMES])
"""Per column of a :func:`~tailstream.models.imbalance.features.feature_vector` row: what
turns it back into the units river learns from."""


@dataclass(frozen=True)
class FastPathSnapshot:
    """The river fast path's parameters at one moment, as arrays, to predict many rows in
    one product: a list's items (the decision layer can stack river beside the head) or a
    batch's buffered samples. Immutable, so the event loop can hand a new one to the
    scoring thread with one assignment.

    River's model (``StandardScaler`` → one-vs-rest logistic regression):
    ``z = (x − μ) / σ`` (0 where ``σ = 0``), ``p_c = sigmoid(w_c · z + b_c)`` (0 below a
    logit of −30, 1 above 30, as river's ``sigmoid``), normalised over the classes that
    have a binary model; uniform before any learning.
    """

    classes: tuple[str, ...]
    mean: np.ndarray
    inv_std: np.ndarray
    weight: np.ndarray
    """``[K, F]``, :data:`FEATURE_NAMES` order."""
    intercept: np.ndarray
    known: np.ndarray
    """``[K]``: the classes river has a binary model for."""
    trained: bool

    def proba(self, rows: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
        """``[N, K]`` probabilities of ``rows`` (``feature_vector`` rows), in
        :attr:`classes` order."""
        x = np.asarray(rows, dtype=float).reshape(-1, len(FEATURE_NAMES))
        k = len(self.classes)
        if not self.trained or not self.known.any():
            return np.full((len(x), k), 1.0 / k)
        logit = ((x * _UNSCALE - self.mean) * self.inv_std) @ self.weight.T + self.intercept
        p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30.0, 30.0)))
        p[logit < -30.0] = 0.0
        p[logit > 30.0] = 1.0
        p[:, ~self.known] = 0.0
        total = p.sum(axis=1, keepdims=True)
        fallback = self.known / self.known.sum()  # river: uniform over its labels
        return np.where(total > 0, p / np.where(total > 0, total, 1.0), fallback)


class PerClassRecall:
    """Recall of each class: correct predictions of c / true occurrences of c."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.hits: defaultdict[str, float] = defaultdict(float)  # weighted counts
        self.total: defaultdict[str, float] = defaultdict(float)
        self.classes = tuple(classes)

    def update(self, y_true: str, y_pred: str | None, w: float = 1.0) -> None:
        self.total[y_true] += w
        self.hits[y_true] += (y_true == y_pred) * w

    def get(self) -> dict[str, float]:
        return {c: self.hits[c] / self.total[c] if self.total[c] else 0.0 for c in self.classes}


class OnlineOutcomeModel:
    """river one-vs-rest logistic regression over :func:`interaction_features`.

    >>> m = OnlineOutcomeModel(seed=1)
    >>> x = interaction_features(item_count=1, item_class_counts={}, user_class_counts={},
    ...                          tier="tail", category_affinity=0.0, repeat=False, price=None)
    >>> sorted(m.predict_then_learn(x, "click"))
    ['cart', 'click', 'fav', 'purchase']
    """

    def __init__(self, classes: Sequence[str] = CLASSES, imbalance: str = "weights",
                 learning_rate: float = 0.05, seed: int = 0) -> None:
        if imbalance not in ("weights", "oversample", "none"):
            raise ValueError(f"unknown imbalance handling {imbalance!r}")
        self.classes = tuple(classes)
        self.imbalance = imbalance
        self.learning_rate = learning_rate
        self.seed = seed
        core: Any = multiclass.OneVsRestClassifier(
            linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate)))
        if imbalance == "oversample":
            uniform = {c: 1.0 / len(self.classes) for c in self.classes}
            core = imblearn.RandomOverSampler(core, desired_dist=uniform, seed=seed)
        self.model = compose.Pipeline(preprocessing.StandardScaler(), core)
        self.macro_f1 = metrics.MacroF1()
        self.recall = PerClassRecall(self.classes)
        self.purchase_auc = metrics.ROCAUC()
        self.n = 0
        self.weighted_n = 0.0
        self.errors = 0.0
        self._snapshot: FastPathSnapshot | None = None
        self._snapshot_n = -1

    def snapshot(self) -> FastPathSnapshot:
        """The model's parameters now (:class:`FastPathSnapshot`; rebuilt only after it
        learned). Read on the thread that trains it.

        >>> m = OnlineOutcomeModel(seed=1)
        >>> for n in range(40):
        ...     x = interaction_features(item_count=n, item_class_counts={"cart": n % 3},
        ...         user_class_counts={"purchase": n % 2}, tier="tail",
        ...         category_affinity=0.5, repeat=n % 4 == 0, price=float(n))
        ...     _ = m.predict_then_learn(x, ["click", "cart", "purchase"][n % 3])
        >>> from tailstream.models.imbalance.features import feature_vector
        >>> row = m.snapshot().proba([feature_vector(x)])[0]
        >>> one = m.predict_proba(x)
        >>> bool(np.allclose(row, [one[c] for c in m.classes]))
        True
        """
        if self._snapshot is not None and self._snapshot_n == self.n:
            return self._snapshot
        f, k = len(FEATURE_NAMES), len(self.classes)
        steps = list(self.model.steps.values())
        scaler, core = steps[0], steps[-1]
        ovr = core.classifier if isinstance(core, imblearn.RandomOverSampler) else core
        mean = np.array([float(scaler.means.get(n, 0.0)) for n in FEATURE_NAMES])
        var = np.array([float(scaler.vars.get(n, 0.0)) for n in FEATURE_NAMES])
        inv_std = np.divide(1.0, np.sqrt(var), out=np.zeros(f), where=var > 0)
        weight, intercept, known = np.zeros((k, f)), np.zeros(k), np.zeros(k, dtype=bool)
        for c, clf in list(ovr.classifiers.items()):
            if c in self.classes:
                j = self.classes.index(c)
                w = clf.weights
                weight[j] = [float(w.get(n, 0.0)) for n in FEATURE_NAMES]
                intercept[j], known[j] = float(clf.intercept), True
        self._snapshot = FastPathSnapshot(self.classes, mean, inv_std, weight, intercept,
                                          known, self.n > 0)
        self._snapshot_n = self.n
        return self._snapshot

    def predict_proba(self, x: Features) -> dict[str, float]:
        proba = self.model.predict_proba_one(x) if self.n else {}
        out = {c: float(proba.get(c, 0.0)) for c in self.classes}
        total = sum(out.values())
        if total <= 0:
            return {c: 1.0 / len(self.classes) for c in self.classes}
        return {c: p / total for c, p in out.items()}

    def predict_then_learn(self, x: Features, y: str, weight: float = 1.0,
                           metric_weight: float = 1.0) -> dict[str, float]:
        """Prequential step: predict ``x``, score the prediction against ``y``, then learn.

        ``metric_weight`` counts this event that many times in the metrics (1/rate when
        the caller subsamples a class)."""
        proba = self.predict_proba(x)
        y_pred = max(proba, key=lambda c: proba[c]) if self.n else None
        if y_pred is not None:
            self.macro_f1.update(y, y_pred, w=metric_weight)
            self.errors += (y_pred != y) * metric_weight
        self.recall.update(y, y_pred, metric_weight)
        if "purchase" in self.classes:
            self.purchase_auc.update(y == "purchase", proba["purchase"])
        self.weighted_n += metric_weight
        if self.imbalance == "weights":
            self.model.learn_one(x, y, w=weight)
        else:
            self.model.learn_one(x, y)
        self.n += 1
        return proba

    def report(self) -> dict[str, Any]:
        return {"events": self.n, "macro_f1": self.macro_f1.get(),
                "recall": self.recall.get(), "purchase_roc_auc": self.purchase_auc.get(),
                "error_rate": self.errors / self.weighted_n if self.weighted_n else 0.0}
