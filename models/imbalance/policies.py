"""Class-imbalance weight policies and losses: pure functions, registered by name.

Every policy maps class counts ``n_c`` to per-class weights ``w_c``; :func:`class_weights`
then normalises them so the mean weight over the current class mix is 1
(``Σ_c π_c w_c = 1`` with ``π_c = n_c / Σ n``), and bounds them to
``[min_weight, max_weight]`` while keeping the mix-weighted mean at 1.

Policies (``POLICIES``):

* ``none``: ``w_c = 1``.
* ``inverse``: ``w_c ∝ 1 / n_c`` (King & Zeng 2001, "Logistic regression in rare events data").
* ``sqrt_inverse``: ``w_c ∝ 1 / √n_c`` (Mikolov et al. 2013 use the same damping for
  frequent words; Mahajan et al., ECCV 2018, for class re-weighting).
* ``class_balanced``: ``w_c ∝ (1 − β) / (1 − β^{n_c})``, the inverse *effective number* of
  samples (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019).
* ``focal``: class weights as ``class_balanced`` (the α of Lin et al. per class), plus the
  focal modulating factor ``(1 − p_t)^γ`` in the loss (Lin et al., "Focal Loss for Dense
  Object Detection", ICCV 2017).
* ``logit_adjusted``: weights 1; the loss adds ``τ · log π_c`` to the logits (Menon et al.,
  "Long-tail learning via logit adjustment", ICLR 2021).
* ``importance``: weights 1; each sample's loss is scaled by ``p(y_i|x_i) / p(y_i)``
  (clipped), with ``p(y|x)`` from the model being trained and ``p(y)`` the live prior.

The policy *names and parameters* are a config (:class:`~tailstream.configs.Policy`,
built from the settings in :mod:`tailstream.configs`); the losses that go with them are in
:mod:`tailstream.models.training.losses`. This module is torch-free: the worker's
imbalance loop uses it without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from tailstream.configs import Policy

Counts = Mapping[str, float]
Weights = dict[str, float]


# ---------------------------------------------------------------------------
# Raw (unnormalised) policies
# ---------------------------------------------------------------------------
def uniform_weights(counts: Counts) -> Weights:
    """``w_c = 1``.

    >>> uniform_weights({"click": 90, "purchase": 10})
    {'click': 1.0, 'purchase': 1.0}
    """
    return dict.fromkeys(counts, 1.0)


def inverse_frequency(counts: Counts) -> Weights:
    """``w_c = 1 / n_c`` (zero counts treated as 1 so an unseen class is not infinite).

    >>> inverse_frequency({"click": 90, "purchase": 10})
    {'click': 0.011111111111111112, 'purchase': 0.1}
    """
    return {c: 1.0 / max(n, 1.0) for c, n in counts.items()}


def sqrt_inverse_frequency(counts: Counts) -> Weights:
    """``w_c = 1 / √n_c``.

    >>> sqrt_inverse_frequency({"click": 100, "purchase": 4})
    {'click': 0.1, 'purchase': 0.5}
    """
    return {c: 1.0 / math.sqrt(max(n, 1.0)) for c, n in counts.items()}


def effective_number_weights(counts: Counts, beta: float = 0.999) -> Weights:
    """Class-balanced weights ``w_c = (1 − β) / (1 − β^{n_c})`` (Cui et al., CVPR 2019).

    ``E_n = (1 − β^n) / (1 − β)`` is the expected volume covered by n samples; weights are
    its inverse. β → 0 gives ``w = 1``; β → 1 approaches inverse frequency.

    >>> w = effective_number_weights({"click": 1000, "purchase": 10}, beta=0.99)
    >>> round(w["purchase"] / w["click"], 4)   # (1 − 0.99^1000) / (1 − 0.99^10)
    10.4578
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError("beta must be in [0, 1)")
    out: Weights = {}
    for c, n in counts.items():
        n = max(n, 1.0)
        out[c] = (1.0 - beta) / (1.0 - beta**n) if beta > 0 else 1.0
    return out


_RAW: dict[str, Callable[[Counts, Policy], Weights]] = {
    "none": lambda c, p: uniform_weights(c),
    "inverse": lambda c, p: inverse_frequency(c),
    "sqrt_inverse": lambda c, p: sqrt_inverse_frequency(c),
    "class_balanced": lambda c, p: effective_number_weights(c, p.beta),
    "focal": lambda c, p: effective_number_weights(c, p.beta),
    "logit_adjusted": lambda c, p: uniform_weights(c),
    "importance": lambda c, p: uniform_weights(c),
}
POLICIES: tuple[str, ...] = tuple(_RAW)


def raw_weights(policy: Policy, counts: Counts) -> Weights:
    """The policy's unnormalised weights ``w_c`` for the counts.

    >>> raw_weights(Policy("inverse"), {"click": 4, "cart": 1})
    {'click': 0.25, 'cart': 1.0}
    """
    try:
        fn = _RAW[policy.name]
    except KeyError:
        raise ValueError(f"unknown weight policy {policy.name!r}; choose from "
                         f"{list(POLICIES)}") from None
    return fn(counts, policy)


def normalise(weights: Weights, counts: Counts, min_weight: float = 0.0,
              max_weight: float = math.inf) -> Weights:
    """Scale so ``Σ_c π_c w_c = 1``, then clip to bounds and rescale the unclipped classes
    so the mix-weighted mean stays 1 (a few rounds; ratios among unclipped classes are kept).

    >>> normalise({"a": 1.0, "b": 9.0}, {"a": 90, "b": 10})
    {'a': 0.5555555555555556, 'b': 5.0}
    """
    total = sum(max(n, 0.0) for n in counts.values())
    if total <= 0:
        return dict.fromkeys(weights, 1.0)
    pi = {c: max(counts.get(c, 0.0), 0.0) / total for c in weights}
    mean = sum(pi[c] * w for c, w in weights.items()) or 1.0
    out = {c: w / mean for c, w in weights.items()}
    for _ in range(10):
        clipped = {c: min(max(w, min_weight), max_weight) for c, w in out.items()}
        fixed = {c for c in out if clipped[c] != out[c]}
        if not fixed:
            return out
        free = [c for c in out if c not in fixed]
        fixed_mass = sum(pi[c] * clipped[c] for c in fixed)
        free_mass = sum(pi[c] * clipped[c] for c in free)
        if not free or free_mass <= 0:
            return clipped
        scale = max(1.0 - fixed_mass, 0.0) / free_mass
        out = {c: clipped[c] * (scale if c in free else 1.0) for c in out}
    return {c: min(max(w, min_weight), max_weight) for c, w in out.items()}


def class_weights(policy: Policy, counts: Counts) -> Weights:
    """The policy's weights for the counts, normalised to mean 1 over the class mix and bounded.

    >>> w = class_weights(Policy("inverse"), {"click": 90, "purchase": 10})
    >>> {c: round(v, 3) for c, v in w.items()}
    {'click': 0.556, 'purchase': 5.0}
    """
    return normalise(raw_weights(policy, counts), counts, policy.min_weight, policy.max_weight)


def smooth(previous: Weights | None, current: Weights, alpha: float) -> Weights:
    """Exponential smoothing ``w ← (1 − α) w_prev + α w_new`` so weights never jump.

    >>> smooth({"a": 1.0}, {"a": 3.0}, alpha=0.5)
    {'a': 2.0}
    """
    if previous is None:
        return dict(current)
    return {c: (1 - alpha) * previous.get(c, w) + alpha * w for c, w in current.items()}
