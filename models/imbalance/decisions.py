"""Decisions that follow the live class counts: prior correction, threshold moving, stacking.

A classifier trained on one class mix and served on another is miscalibrated by exactly
the ratio of the two priors. Bayes' rule gives the correction without retraining
(Saerens, Latinne & Decaestecker, "Adjusting the Outputs of a Classifier to New a Priori
Probabilities", Neural Computation 2002, eq. 2.4; the post-hoc logit adjustment of Menon
et al., "Long-tail learning via logit adjustment", ICLR 2021, is the same rule in logit
space)::

    p'(y | x) ∝ p(y | x) · π_live(y) / π_train(y)

so when a sale doubles the purchase share, ``π_live`` (the rolling counts) moves the
probabilities within seconds, with no fine-tune. When no labels are known for the new
mix, :func:`em_prior` estimates it from the predictions alone (Saerens et al., §2.3).

The decision is then made with per-class offsets moved on a held-out window to the
configured objective (*threshold moving*; Provost, "Machine Learning from Imbalanced Data
Sets 101", AAAI 2000 workshop; Collell et al., "A simple plug-in bagging ensemble based
on threshold-moving for classifying binary and multiclass imbalanced data",
Neurocomputing 2018)::

    ŷ = argmax_c  log p'(c | x) + b_c

with ``b`` fitted by coordinate ascent to maximise macro-F1, the G-mean of the class
recalls, or the minority macro-recall subject to a precision floor (:func:`fit_offsets`).

Several models' probabilities are combined by stacking (Wolpert, "Stacked
Generalization", Neural Networks 1992): a multinomial logistic regression over the
models' log-probabilities, fitted on the held-out window (:class:`Stack`).

Torch-free (numpy and scikit-learn): the worker's loop uses it without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OBJECTIVES: tuple[str, ...] = ("g_mean", "macro_f1", "minority_recall")
EPS = 1e-9


def as_prior(counts: Mapping[str, float], classes: Sequence[str], floor: float = 1e-4
             ) -> np.ndarray:
    """Class shares ``π`` in ``classes`` order from counts, floored and renormalised (a
    class never seen must not get probability 0: it would zero its predictions for good).

    >>> as_prior({"a": 3, "b": 1}, ["a", "b", "c"], floor=0.01).round(4).tolist()
    [0.7426, 0.2475, 0.0099]
    """
    raw = np.array([max(float(counts.get(c, 0.0)), 0.0) for c in classes])
    raw = raw / raw.sum() if raw.sum() > 0 else np.full(len(classes), 1.0 / len(classes))
    raw = np.maximum(raw, floor)
    return raw / raw.sum()


def prior_correct(proba: np.ndarray, train_prior: np.ndarray, live_prior: np.ndarray
                  ) -> np.ndarray:
    """``p'(y|x) ∝ p(y|x) · π_live(y) / π_train(y)`` row-wise (Saerens et al. 2002, eq. 2.4).

    >>> p = np.array([[0.9, 0.1]])
    >>> prior_correct(p, np.array([0.9, 0.1]), np.array([0.8, 0.2])).round(4).tolist()
    [[0.8, 0.2]]
    """
    ratio = np.asarray(live_prior, dtype=float) / np.maximum(np.asarray(train_prior, float),
                                                             EPS)
    out = np.asarray(proba, dtype=float) * ratio
    return out / np.maximum(out.sum(axis=-1, keepdims=True), EPS)


def em_prior(proba: np.ndarray, train_prior: np.ndarray, *, iterations: int = 100,
             tol: float = 1e-6) -> np.ndarray:
    """The class prior of the data behind ``proba`` (predictions made under
    ``train_prior``), estimated without labels by EM (Saerens et al. 2002, §2.3)::

        π⁽ˢ⁺¹⁾(y) = mean_i p⁽ˢ⁾(y | x_i),   p⁽ˢ⁾ = prior_correct(p, π_train, π⁽ˢ⁾)

    A classifier calibrated for a 50/50 mix, on data whose true mix is 70/30 (the plain
    mean of its probabilities says 61/39):

    >>> rng = np.random.default_rng(0)
    >>> y = rng.random(5000) < 0.3
    >>> p1 = 1 / (1 + np.exp(-2 * rng.normal(np.where(y, 1.0, -1.0), 1.0)))
    >>> em_prior(np.stack([1 - p1, p1], 1), np.array([0.5, 0.5])).round(2).tolist()
    [0.69, 0.31]
    """
    proba = np.asarray(proba, dtype=float)
    prior = np.asarray(train_prior, dtype=float).copy()
    if len(proba) == 0:
        return prior
    for _ in range(iterations):
        new = prior_correct(proba, train_prior, prior).mean(axis=0)
        if np.abs(new - prior).max() < tol:
            return new
        prior = new
    return prior


# --------------------------------------------------------------------------- objectives
def recalls(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Per-class recall (NaN where the class has no true sample).

    >>> recalls(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3).tolist()
    [0.5, 1.0, nan]
    """
    out = np.full(k, np.nan)
    for c in range(k):
        mask = y == c
        if mask.any():
            out[c] = float((pred[mask] == c).mean())
    return out


def precisions(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Per-class precision (0 where the class is never predicted, NaN where it is absent).

    >>> precisions(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2).round(3).tolist()
    [1.0, 0.667]
    """
    out = np.full(k, np.nan)
    for c in range(k):
        if not (y == c).any():
            continue
        chosen = pred == c
        out[c] = float((y[chosen] == c).mean()) if chosen.any() else 0.0
    return out


def score(y: np.ndarray, pred: np.ndarray, k: int, objective: str,
          minority: Sequence[int] = (), precision_floor: float = 0.0) -> float:
    """The decision objective over the classes present in ``y``:

    * ``g_mean``: ``(Π_c recall_c)^(1/K)`` (Kubat & Matwin, ICML 1997);
    * ``macro_f1``: mean F1;
    * ``minority_recall``: mean recall of the ``minority`` classes, minus a large penalty
      per class whose precision falls under ``precision_floor``.

    >>> y, p = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])
    >>> round(score(y, p, 2, "g_mean"), 4), round(score(y, p, 2, "macro_f1"), 4)
    (0.8165, 0.7333)
    """
    rec = recalls(y, pred, k)
    present = ~np.isnan(rec)
    if not present.any():
        return 0.0
    if objective == "g_mean":
        return float(np.exp(np.log(np.maximum(rec[present], EPS)).mean())) \
            if (rec[present] > 0).all() else 0.0
    prec = precisions(y, pred, k)
    if objective == "macro_f1":
        f1 = 2 * prec * rec / np.maximum(prec + rec, EPS)
        return float(np.nanmean(np.where(present, f1, np.nan)))
    if objective == "minority_recall":
        idx = [c for c in minority if present[c]]
        if not idx:
            return 0.0
        penalty = sum(1.0 for c in idx if prec[c] < precision_floor)
        return float(np.mean(rec[idx])) - penalty
    raise ValueError(f"unknown objective {objective!r}; one of {OBJECTIVES}")


def score_se(y: np.ndarray, pred: np.ndarray, k: int, objective: str,
             minority: Sequence[int] = (), precision_floor: float = 0.0, *,
             draws: int = 100, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`score` over the rows (Efron & Tibshirani, *An
    Introduction to the Bootstrap*, 1993, ch. 6): the spread of the objective over
    ``draws`` resamples of the window with replacement. A window of a few dozen purchases
    moves a G-mean by several hundredths from one draw of events to the next; policy
    selection needs to know that before calling one candidate better.

    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random(400) < 0.2).astype(int)
    >>> pred = np.where(rng.random(400) < 0.8, y, 1 - y)
    >>> 0.01 < score_se(y, pred, 2, "g_mean") < 0.05
    True
    """
    y, pred = np.asarray(y), np.asarray(pred)
    if len(y) < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    values = [score(y[idx], pred[idx], k, objective, minority, precision_floor)
              for idx in (rng.integers(0, len(y), len(y)) for _ in range(draws))]
    return float(np.std(values, ddof=1))


def decide_classes(proba: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``argmax_c log p(c|x) + b_c`` per row.

    >>> decide_classes(np.array([[0.7, 0.3], [0.9, 0.1]]), np.array([0.0, 1.0])).tolist()
    [1, 0]
    """
    return np.argmax(np.log(np.maximum(proba, EPS)) + offsets, axis=-1)


def fit_offsets(proba: np.ndarray, y: np.ndarray, objective: str = "g_mean", *,
                minority: Sequence[int] = (), precision_floor: float = 0.0,
                grid: np.ndarray | None = None, rounds: int = 3) -> np.ndarray:
    """Per-class log offsets ``b`` (class 0 fixed at 0) that maximise ``objective`` of
    :func:`decide_classes` on held-out ``(proba, y)``, by coordinate ascent over ``grid``.
    Ties keep the offset nearest 0 (the plain argmax), so a window without a class leaves
    its offset alone.

    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random(2000) < 0.1).astype(int)
    >>> p1 = np.clip(0.1 + 0.25 * y + rng.normal(0, 0.1, 2000), 0.01, 0.99)
    >>> proba = np.stack([1 - p1, p1], axis=1)
    >>> b = fit_offsets(proba, y, "g_mean")
    >>> bool(b[1] > 0), round(score(y, decide_classes(proba, b), 2, "g_mean"), 2)
    (True, 0.88)
    """
    proba = np.asarray(proba, dtype=float)
    k = proba.shape[1]
    offsets = np.zeros(k)
    if len(y) == 0:
        return offsets
    grid = np.linspace(-4.0, 6.0, 41) if grid is None else grid
    logp = np.log(np.maximum(proba, EPS))

    def search(pred: np.ndarray) -> float:
        # G-mean is 0 while any class has no recall, so from an argmax that ignores two
        # classes no single step could improve it: search on Σ log(recall + 0.01), whose
        # maximum is G-mean's wherever every recall is clearly above 0.
        if objective == "g_mean":
            rec = recalls(y, pred, k)
            return float(np.nansum(np.log(np.where(np.isnan(rec), 1.0, rec + 0.01))))
        return score(y, pred, k, objective, minority, precision_floor)

    best = search(np.argmax(logp, axis=1))
    for _ in range(rounds):
        changed = False
        for c in range(1, k):
            for b in sorted(_candidates(logp, offsets, c, grid), key=abs):
                trial = offsets.copy()
                trial[c] = b
                s = search(np.argmax(logp + trial, axis=1))
                if s > best + 1e-12:
                    best, offsets, changed = s, trial, True
        if not changed:
            break
    return offsets


def balanced_offsets(prior: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """The *balanced* rule's offsets ``b_c = −log π_c``: ``argmax_c p(c|x) / π_c``, the
    Bayes rule for the balanced error (the mean of the class recalls) when ``p`` is
    calibrated to ``π`` (Menon et al., "Long-tail learning via logit adjustment", ICLR
    2021, §3: post-hoc logit adjustment; Collell et al. 2018's threshold ``π_c``). Nothing
    is fitted, so it cannot overfit a small window.

    >>> balanced_offsets(np.array([0.9, 0.1])).round(3).tolist()
    [0.105, 2.303]
    """
    return -np.log(np.maximum(np.asarray(prior, dtype=float), floor))


def choose_offsets(proba: np.ndarray, y: np.ndarray, prior: np.ndarray,
                   objective: str = "g_mean", *, minority: Sequence[int] = (),
                   precision_floor: float = 0.0) -> tuple[np.ndarray, str]:
    """Offsets for :func:`decide_classes` and the rule they come from: ``"fitted"``
    (:func:`fit_offsets` on the whole window) unless the parameter-free
    ``"balanced"`` rule for ``prior`` (:func:`balanced_offsets`) scores higher on
    ``objective`` out of fold (2-fold cross-fitting on alternating rows; ties keep the
    fitted offsets). Fitting three offsets to a window of a few hundred rare events can
    chase noise; the held-out score says when it does, as :func:`choose_inputs` does for
    the stack's inputs.

    >>> rng = np.random.default_rng(7)
    >>> y = (rng.random(4000) < 0.1).astype(int)
    >>> p1 = np.clip(0.1 + 0.3 * y + rng.normal(0, 0.1, 4000), 0.01, 0.99)
    >>> proba = np.stack([1 - p1, p1], 1)        # over-confident in class 1: shift needed
    >>> choose_offsets(proba, y, np.array([0.5, 0.5]))[1]
    'fitted'
    """
    proba = np.asarray(proba, dtype=float)
    y = np.asarray(y)
    k = proba.shape[1]
    fitted = fit_offsets(proba, y, objective, minority=minority,
                         precision_floor=precision_floor)
    balanced = balanced_offsets(prior)
    if len(y) < 4:
        return fitted, "fitted"
    folds = np.arange(len(y)) % 2
    fit_score = balanced_score = 0.0
    for fold in (0, 1):
        train, test = folds != fold, folds == fold
        b = fit_offsets(proba[train], y[train], objective, minority=minority,
                        precision_floor=precision_floor)
        fit_score += score(y[test], decide_classes(proba[test], b), k, objective, minority,
                           precision_floor)
        balanced_score += score(y[test], decide_classes(proba[test], balanced), k,
                                objective, minority, precision_floor)
    if balanced_score > fit_score:
        return balanced, "balanced"
    return fitted, "fitted"


SHARES = np.geomspace(0.002, 0.6, 40)
"""Shares of the rows a class may be given, whose flip points :func:`fit_offsets` tries."""


def _candidates(logp: np.ndarray, offsets: np.ndarray, c: int, grid: np.ndarray
                ) -> np.ndarray:
    """Offsets for class ``c`` to try: the fixed grid, and the points at which given shares
    of the rows flip to ``c`` (quantiles of ``max_{j≠c}(log p_j + b_j) − log p_c``). A
    weak model's probabilities spread less than one grid step, so the grid alone would
    flip all rows or none (the usual data-driven threshold candidates)."""
    others = np.delete(logp + offsets, c, axis=1).max(axis=1)
    flips = np.quantile(others - logp[:, c], SHARES) + 1e-9
    return np.unique(np.concatenate([grid, np.clip(flips, grid.min(), grid.max())]))


# --------------------------------------------------------------------------- stacking
@dataclass
class Stack:
    """Stacked probabilities of several models: a multinomial logistic regression over
    their log-probabilities (Wolpert 1992), fitted on a held-out window. Until fitted (or
    when the window lacks two classes) it averages the models' probabilities.

    >>> rng = np.random.default_rng(1)
    >>> y = (rng.random(600) < 0.2).astype(int)
    >>> good = np.stack([1 - (0.1 + 0.7 * y), 0.1 + 0.7 * y], 1)      # informative
    >>> noise = np.tile([[0.5, 0.5]], (600, 1))                      # useless
    >>> s = Stack(2).fit([good, noise], y)
    >>> p = s.predict([good, noise])
    >>> bool(p[y == 1, 1].mean() > 0.6 and p[y == 0, 1].mean() < 0.3)
    True
    """

    classes: int
    coef: np.ndarray | None = None
    intercept: np.ndarray | None = None
    weights: list[float] = field(default_factory=list)
    """For reports: each model's mean absolute coefficient (how much the stack uses it)."""

    @staticmethod
    def features(models: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([np.log(np.maximum(np.asarray(p, float), EPS)) for p in models],
                              axis=1)

    def fit(self, models: Sequence[np.ndarray], y: np.ndarray, c: float = 0.3) -> Stack:
        from sklearn.linear_model import LogisticRegression

        y = np.asarray(y)
        if len(np.unique(y)) < 2:
            return self
        x = self.features(models)
        lr = LogisticRegression(C=c, max_iter=500)
        lr.fit(x, y)
        coef = np.zeros((self.classes, x.shape[1]))
        intercept = np.full(self.classes, -30.0)  # a class absent from the window: ~0
        if len(lr.classes_) == 2:  # sklearn's binary form: one row for class 1
            coef[lr.classes_[1]], intercept[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
            coef[lr.classes_[0]], intercept[lr.classes_[0]] = 0.0, 0.0
        else:
            coef[lr.classes_], intercept[lr.classes_] = lr.coef_, lr.intercept_
        self.coef, self.intercept = coef, intercept
        per = x.shape[1] // len(models)
        self.weights = [float(np.abs(coef[:, m * per:(m + 1) * per]).mean())
                        for m in range(len(models))]
        return self

    def predict(self, models: Sequence[np.ndarray]) -> np.ndarray:
        if self.coef is None or self.intercept is None:
            return np.mean([np.asarray(p, float) for p in models], axis=0)
        z = self.features(models) @ self.coef.T + self.intercept
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- the layer
class RunningPrior:
    """Class shares of the recent stream: counts decayed by ``2^(−1/h)`` per interaction
    (a half-life of ``h`` interactions, so the estimate follows a shift in the mix within
    a few ``h`` whatever the stream's rate).

    >>> r = RunningPrior(2, half_life=10.0)
    >>> for _ in range(100): r.observe(0)
    >>> for _ in range(20): r.observe(1)
    >>> r.prior().round(2).tolist()
    [0.25, 0.75]
    """

    def __init__(self, classes: int, half_life: float = 2000.0) -> None:
        self.counts = np.zeros(classes)
        self.decay = 0.5 ** (1.0 / half_life)

    def observe(self, label: int) -> None:
        self.counts *= self.decay
        self.counts[label] += 1.0

    def observe_many(self, labels: Sequence[int]) -> None:
        """:meth:`observe` for each label in order, in one vectorised step (a worker's
        batch): ``n ← n · d^m + Σ_j d^(m−1−j) e_(y_j)``.

        >>> a, b = RunningPrior(3, 5.0), RunningPrior(3, 5.0)
        >>> for y in [0, 2, 2, 1, 0]: a.observe(y)
        >>> b.observe_many([0, 2, 2, 1, 0])
        >>> bool(np.allclose(a.counts, b.counts))
        True
        """
        y = np.asarray(labels, dtype=int)
        if len(y) == 0:
            return
        m = len(y)
        self.counts *= self.decay ** m
        np.add.at(self.counts, y, self.decay ** np.arange(m - 1, -1, -1, dtype=float))

    def prior(self, floor: float = 1e-4) -> np.ndarray:
        total = self.counts.sum()
        p = self.counts / total if total > 0 else np.full(len(self.counts),
                                                          1.0 / len(self.counts))
        p = np.maximum(p, floor)
        return p / p.sum()


@dataclass
class DecisionLayer:
    """Stacked probabilities, corrected to the live prior, decided with moved thresholds:

    1. :class:`Stack` over the models' probabilities (the outcome head, the river fast
       path), fitted on a window of their out-of-sample predictions with known labels;
    2. :func:`prior_correct` from the window's class mix to the live one;
    3. :func:`decide_classes` with offsets fitted (:func:`fit_offsets`) on the window to
       ``objective``, or the balanced rule where it scores higher out of fold
       (:func:`choose_offsets`).

    Refit on each new window (test-then-train); until the first fit it averages the
    models and takes the argmax.

    >>> rng = np.random.default_rng(2)
    >>> y = (rng.random(3000) < 0.1).astype(int)
    >>> head = np.stack([1 - (0.05 + 0.3 * y), 0.05 + 0.3 * y], 1)
    >>> layer = DecisionLayer(2).fit([head], y)
    >>> _, pred = layer.predict([head], live_prior=None)
    >>> round(score(y, pred, 2, "g_mean"), 2)
    1.0
    """

    classes: int
    objective: str = "g_mean"
    minority: tuple[int, ...] = ()
    precision_floor: float = 0.0
    window: int = 20_000
    """Most recent predictions kept to fit on (a rolling window: rare classes are few)."""
    stack: Stack = field(init=False)
    offsets: np.ndarray = field(init=False)
    window_prior: np.ndarray | None = None
    fit_prior: np.ndarray | None = None
    """The class prior the offsets were moved for (the live prior at the fit): what to
    correct to while no live prior is known."""
    fitted_on: int = 0
    inputs: tuple[int, ...] = ()
    """The models the stack uses (:func:`choose_inputs`): all, or the one that predicts
    better alone."""
    rule: str = "argmax"
    """Where the offsets come from (:func:`choose_offsets`): fitted or balanced."""
    _seen: list[tuple[list[np.ndarray], np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stack = Stack(self.classes)
        self.offsets = np.zeros(self.classes)

    def add(self, models: Sequence[np.ndarray], y: np.ndarray, *, reset: bool = False,
            live_prior: np.ndarray | None = None) -> DecisionLayer:
        """Append a window of predictions with their labels (``reset``: forget the older
        ones, e.g. after the model behind them was replaced) and refit on the newest
        :attr:`window`."""
        if reset:
            self._seen = []
        self._seen.append(([np.asarray(m, dtype=float) for m in models], np.asarray(y)))
        while len(self._seen) > 1 and sum(len(w[1]) for w in self._seen[1:]) >= self.window:
            self._seen.pop(0)
        joined = [np.concatenate([w[0][k] for w in self._seen])
                  for k in range(len(self._seen[0][0]))]
        return self.fit(joined, np.concatenate([w[1] for w in self._seen]),
                        live_prior=live_prior)

    def fit(self, models: Sequence[np.ndarray], y: np.ndarray,
            live_prior: np.ndarray | None = None) -> DecisionLayer:
        """Stack on ``(models, y)``; the offsets are fitted on the probabilities as
        :meth:`predict` will see them: corrected from the window's class mix to
        ``live_prior`` (a window that over-keeps rare classes, like the gate's, would
        otherwise set thresholds for a mix the stream does not have)."""
        y = np.asarray(y)
        if len(y) == 0 or len(np.unique(y)) < 2:
            return self
        self.inputs = choose_inputs(models, y)
        chosen = [models[k] for k in self.inputs]
        self.stack = Stack(self.classes).fit(chosen, y)
        p = self.stack.predict(chosen)
        self.window_prior = np.bincount(y, minlength=self.classes) / len(y)
        self.window_prior = np.maximum(self.window_prior, 1e-4)
        self.window_prior /= self.window_prior.sum()
        prior = self.window_prior
        if live_prior is not None:
            prior = np.asarray(live_prior, dtype=float)
            p = prior_correct(p, self.window_prior, prior)
        self.fit_prior = prior
        self.offsets, self.rule = choose_offsets(p, y, prior, self.objective,
                                                 minority=self.minority,
                                                 precision_floor=self.precision_floor)
        self.fitted_on = len(y)
        return self

    def reads(self, model: int) -> bool:
        """Whether the fitted stack reads the ``model``-th input (:attr:`inputs`): a
        caller computes a costly second model's probabilities only then.

        >>> layer = DecisionLayer(2)
        >>> layer.inputs = (1,)
        >>> layer.reads(0), layer.reads(1)
        (False, True)
        """
        return model in self.inputs

    def predict(self, models: Sequence[np.ndarray], live_prior: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``[N, K]`` and decisions ``[N]`` (``live_prior``: one row per
        sample, or one for all, or None to skip the correction). ``models`` in the order
        the layer was fitted with; those it does not read may be left off the end."""
        if self.stack.coef is not None and self.inputs and max(self.inputs) >= len(models):
            raise ValueError(f"the layer stacks models {list(self.inputs)}: "
                             f"{len(models)} given")
        p = self.stack.predict([models[k] for k in self.inputs]
                               if self.stack.coef is not None else models)
        if live_prior is not None and self.window_prior is not None:
            p = prior_correct(p, self.window_prior, np.asarray(live_prior))
        return p, decide_classes(p, self.offsets)

    def serving_prior(self, live_prior: np.ndarray | None) -> np.ndarray | None:
        """The prior to correct to: the live one, or — while none is known (a worker just
        started) — the one the offsets were moved for.

        >>> layer = DecisionLayer(2)
        >>> layer.fit_prior = np.array([0.9, 0.1])
        >>> layer.serving_prior(None).tolist(), layer.serving_prior(np.array([0.5, 0.5])).tolist()
        ([0.9, 0.1], [0.5, 0.5])
        """
        return live_prior if live_prior is not None else self.fit_prior

    def to_dict(self) -> dict[str, Any]:
        """The fitted layer as plain JSON (a model version's manifest carries it: the
        trainer fits it on the gate's held-out window, the workers serve with it)."""
        return {"classes": self.classes, "objective": self.objective,
                "minority": list(self.minority), "precision_floor": self.precision_floor,
                "inputs": list(self.inputs), "rule": self.rule, "fitted_on": self.fitted_on,
                "offsets": self.offsets.tolist(),
                "window_prior": None if self.window_prior is None
                else self.window_prior.tolist(),
                "fit_prior": None if self.fit_prior is None else self.fit_prior.tolist(),
                "coef": None if self.stack.coef is None else self.stack.coef.tolist(),
                "intercept": None if self.stack.intercept is None
                else self.stack.intercept.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecisionLayer:
        """The layer :meth:`to_dict` wrote (it predicts the same; refitting starts a new
        window).

        >>> rng = np.random.default_rng(2)
        >>> y = (rng.random(500) < 0.2).astype(int)
        >>> head = np.stack([0.9 - 0.3 * y, 0.1 + 0.3 * y], 1)
        >>> a = DecisionLayer(2).fit([head], y, live_prior=np.array([0.8, 0.2]))
        >>> b = DecisionLayer.from_dict(a.to_dict())
        >>> pa, pb = a.predict([head], [0.7, 0.3]), b.predict([head], [0.7, 0.3])
        >>> bool(np.allclose(pa[0], pb[0]) and (pa[1] == pb[1]).all())
        True
        """
        def arr(key: str) -> np.ndarray | None:
            v = d.get(key)
            return None if v is None else np.asarray(v, dtype=float)

        layer = cls(int(d["classes"]), str(d.get("objective", "g_mean")),
                    tuple(int(c) for c in d.get("minority", ())),
                    float(d.get("precision_floor", 0.0)))
        offsets, coef, intercept = arr("offsets"), arr("coef"), arr("intercept")
        if offsets is not None:
            layer.offsets = offsets
        layer.window_prior, layer.fit_prior = arr("window_prior"), arr("fit_prior")
        layer.inputs = tuple(int(k) for k in d.get("inputs", ()))
        layer.rule = str(d.get("rule", "argmax"))
        layer.fitted_on = int(d.get("fitted_on", 0))
        if coef is not None and intercept is not None:
            layer.stack.coef, layer.stack.intercept = coef, intercept
        return layer

    def report(self) -> dict[str, object]:
        return {"fitted_on": self.fitted_on, "inputs": list(self.inputs), "rule": self.rule,
                "offsets": [round(float(b), 3)
                                                          for b in self.offsets],
                "stack_weights": [round(w, 3) for w in self.stack.weights],
                "window_prior": None if self.window_prior is None
                else [round(float(v), 4) for v in self.window_prior]}


def crossfit_decisions(proba: np.ndarray, y: np.ndarray, objective: str, *,
                       minority: Sequence[int] = (), precision_floor: float = 0.0
                       ) -> np.ndarray:
    """Decisions with thresholds moved out of sample: offsets fitted on every other row
    decide the rows between them, and the other way round (2-fold cross-fitting), so a
    held-out window judges the moved decisions without fitting to itself.

    >>> rng = np.random.default_rng(3)
    >>> y = (rng.random(4000) < 0.1).astype(int)
    >>> p1 = np.clip(0.1 + 0.25 * y + rng.normal(0, 0.1, 4000), 0.01, 0.99)
    >>> proba = np.stack([1 - p1, p1], 1)
    >>> plain = score(y, proba.argmax(1), 2, "g_mean")
    >>> moved = score(y, crossfit_decisions(proba, y, "g_mean"), 2, "g_mean")
    >>> bool(moved > plain + 0.3)
    True
    """
    proba = np.asarray(proba, dtype=float)
    y = np.asarray(y)
    out = proba.argmax(axis=1) if len(y) else np.zeros(0, dtype=int)
    if len(y) < 4:
        return out
    folds = np.arange(len(y)) % 2
    for fold in (0, 1):
        fit, apply = folds != fold, folds == fold
        offsets = fit_offsets(proba[fit], y[fit], objective, minority=minority,
                              precision_floor=precision_floor)
        out[apply] = decide_classes(proba[apply], offsets)
    return out


def choose_inputs(models: Sequence[np.ndarray], y: np.ndarray) -> tuple[int, ...]:
    """Which models the stack should use: all of them, unless one alone has a lower
    out-of-fold log-loss on the window (stacking two weak signals can add more noise
    than signal; a proper scoring rule decides, Gneiting & Raftery 2007).

    >>> rng = np.random.default_rng(5)
    >>> y = (rng.random(3000) < 0.2).astype(int)
    >>> good = np.stack([1 - (0.1 + 0.7 * y), 0.1 + 0.7 * y], 1)
    >>> noise = rng.dirichlet([1, 1], size=3000)
    >>> choose_inputs([good, noise], y)
    (0,)
    """
    if len(models) < 2 or len(y) < 50:
        return tuple(range(len(models)))
    k = np.asarray(models[0]).shape[1]
    options = [tuple(range(len(models)))] + [(m,) for m in range(len(models))]
    losses = []
    for option in options:
        p = _crossfit_stack([models[m] for m in option], y, k)
        losses.append(-float(np.log(np.maximum(p[np.arange(len(y)), y], EPS)).mean()))
    return options[int(np.argmin(losses))]


def _crossfit_stack(models: Sequence[np.ndarray], y: np.ndarray, k: int) -> np.ndarray:
    """Out-of-fold probabilities of a :class:`Stack` (2 folds, alternating rows)."""
    out = np.full((len(y), k), 1.0 / k)
    folds = np.arange(len(y)) % 2
    for fold in (0, 1):
        fit, apply = folds != fold, folds == fold
        stack = Stack(k).fit([np.asarray(m)[fit] for m in models], y[fit])
        out[apply] = stack.predict([np.asarray(m)[apply] for m in models])
    return out


def crossfit_calibrate(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Out-of-fold calibrated probabilities: a :class:`Stack` of the one model fitted on
    every other row maps the rows between them, and the other way round, so a held-out
    window can judge how much a model's probabilities *tell apart*, whatever their offset
    (a class-weighted loss shifts them on purpose; the decision layer maps them back).
    Calibrated to the window's own class mix.

    >>> rng = np.random.default_rng(4)
    >>> y = (rng.random(2000) < 0.2).astype(int)
    >>> skewed = np.stack([0.3 - 0.2 * y, 0.7 + 0.2 * y], 1)   # says 1 almost always
    >>> cal = crossfit_calibrate(skewed, y)
    >>> bool(cal[y == 0, 1].mean() < 0.1 and cal[y == 1, 1].mean() > 0.9)
    True
    """
    proba = np.asarray(proba, dtype=float)
    y = np.asarray(y)
    if len(y) < 4:
        return proba.copy()
    return _crossfit_stack([proba], y, proba.shape[1])
