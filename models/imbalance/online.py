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
from typing import Any

from river import compose, imblearn, linear_model, metrics, multiclass, optim, preprocessing

from tailstream.contract import CLASSES
from tailstream.models.imbalance.features import Features, interaction_features

__all__ = ["Features", "OnlineOutcomeModel", "PerClassRecall", "interaction_features"]


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
