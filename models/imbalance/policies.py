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

:data:`LOSS_MAPPING` names the outcome loss of each policy, so the trainer's loss is
configuration (``TAILSTREAM_WEIGHT_POLICY``), not code.

Losses for the retrieval side and per-sample weights:

* :func:`logq_correction`: ``s(x, y) − log q(y)`` for sampled softmax (Yi et al.,
  "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations",
  RecSys 2019).
* :func:`importance_weights`: ``w_i = p(y_i | x_i) / p(y_i)``, clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@dataclass(frozen=True)
class Policy:
    """A named weighting policy with its parameters (what the trainer and metrics see)."""

    name: str
    beta: float = 0.999
    gamma: float = 2.0
    tau: float = 1.0
    min_weight: float = 0.05
    max_weight: float = 50.0

    def raw(self, counts: Counts) -> Weights:
        fn = _RAW[self.name]
        return fn(counts, self)

    def describe(self) -> dict[str, float | str]:
        """Parameters that matter for this policy (for summaries and metrics)."""
        out: dict[str, float | str] = {"policy": self.name}
        if self.name in ("class_balanced", "focal"):
            out["beta"] = self.beta
        if self.name == "focal":
            out["gamma"] = self.gamma
        if self.name == "logit_adjusted":
            out["tau"] = self.tau
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
    return normalise(policy.raw(counts), counts, policy.min_weight, policy.max_weight)


def smooth(previous: Weights | None, current: Weights, alpha: float) -> Weights:
    """Exponential smoothing ``w ← (1 − α) w_prev + α w_new`` so weights never jump.

    >>> smooth({"a": 1.0}, {"a": 3.0}, alpha=0.5)
    {'a': 2.0}
    """
    if previous is None:
        return dict(current)
    return {c: (1 - alpha) * previous.get(c, w) + alpha * w for c, w in current.items()}


# ---------------------------------------------------------------------------
# Losses (torch)
# ---------------------------------------------------------------------------
def log_prior(counts: Counts, classes: Sequence[str]) -> torch.Tensor:
    """``log π_c`` for the classes in order (add-one smoothed)."""
    n = torch.tensor([max(float(counts.get(c, 0.0)), 0.0) + 1.0 for c in classes])
    return torch.log(n / n.sum())


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           weight: torch.Tensor | None = None,
                           reduction: str = "mean") -> torch.Tensor:
    """``w_{y_i} · CE(z_i, y_i)``, averaged over the batch (not renormalised by Σw, so the
    scale of the loss follows the weights' mix-weighted mean of 1)."""
    ce = F.cross_entropy(logits, target, reduction="none")
    if weight is not None:
        ce = ce * weight.to(ce)[target]
    return _reduce(ce, reduction)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss ``−α_{y} (1 − p_t)^γ log p_t`` (Lin et al., ICCV 2017).

    With two classes, logits ``[0, z]`` and ``α = [1 − a, a]`` it equals torchvision's
    ``sigmoid_focal_loss(z, y, a, γ)`` (tested).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    logp_t = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    p_t = logp_t.exp()
    loss = -((1 - p_t) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * alpha.to(loss)[target]
    return _reduce(loss, reduction)


def logit_adjusted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                                 log_prior_: torch.Tensor, tau: float = 1.0,
                                 reduction: str = "mean") -> torch.Tensor:
    """``CE(z + τ · log π, y)``: the logit-adjusted loss of Menon et al. (ICLR 2021, eq. 10).
    At inference the raw ``z`` is used, which is balanced-error optimal."""
    return F.cross_entropy(logits.float() + tau * log_prior_.to(logits.device).float(), target,
                           reduction=reduction)


def logq_correction(scores: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """In-batch sampled-softmax correction ``s(x_i, y_j) − log q(y_j)`` (Yi et al., RecSys 2019).

    ``scores`` is the [B, N] user×item score matrix of a batch, ``log_q`` the log sampling
    probability of each in-batch item.

    >>> logq_correction(torch.zeros(2, 2), torch.log(torch.tensor([0.5, 0.25]))).tolist()
    [[0.6931471824645996, 1.3862943649291992], [0.6931471824645996, 1.3862943649291992]]
    """
    return scores - log_q.unsqueeze(0)


def sampled_softmax_loss(scores: torch.Tensor, target: torch.Tensor, log_q: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """Retrieval loss over in-batch negatives with logQ correction (Yi et al. 2019, eq. 3):
    ``−log softmax_j(s(x_i, y_j) − log q_j)[t_i]``.

    ``scores`` is ``[B, N]`` over the batch's *distinct* items (so an item bought twice in a
    batch is never its own negative), ``target[i]`` the column of row i's item, ``log_q``
    the log probability that each item is sampled into a batch. Without the correction,
    popular items, which appear as negatives most often, are pushed down too hard.

    >>> s = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    >>> flat = sampled_softmax_loss(s, torch.tensor([0, 1]), torch.log(torch.tensor([.5, .5])))
    >>> round(flat.item(), 4)   # uniform q changes nothing: log(1 + e^-2)
    0.1269
    """
    return F.cross_entropy(logq_correction(scores.float(), log_q.to(scores.device).float()),
                           target, reduction=reduction)


def importance_weights(p_y_given_x: torch.Tensor, prior: torch.Tensor,
                       clip: tuple[float, float] = (0.1, 10.0)) -> torch.Tensor:
    """``w_i = p(y_i | x_i) / p(y_i)`` clipped to ``clip`` (per-sample importance).

    >>> importance_weights(torch.tensor([0.5, 0.02]), torch.tensor([0.9, 0.01])).tolist()
    [0.5555555820465088, 2.0]
    """
    return (p_y_given_x / prior.clamp_min(1e-12)).clamp(*clip)


@dataclass(frozen=True)
class LossInputs:
    """What an outcome loss may use besides logits and targets (all on the logits' device).

    ``class_weight``: the policy's weights ``w_c`` (mean 1 over the mix); ``sample_weight``:
    per-sample multipliers (e.g. undoing the buffer's skew); ``log_prior``: ``log π_c`` of
    the reference class mix; ``gamma``/``tau``: focal and logit-adjustment parameters.
    """

    class_weight: torch.Tensor
    sample_weight: torch.Tensor
    log_prior: torch.Tensor
    gamma: float = 2.0
    tau: float = 1.0


OutcomeLoss = Callable[[torch.Tensor, torch.Tensor, LossInputs], torch.Tensor]


def _ce(logits: torch.Tensor, target: torch.Tensor, x: LossInputs) -> torch.Tensor:
    return weighted_cross_entropy(logits.float(), target, None, reduction="none")


def _weighted_ce(logits: torch.Tensor, target: torch.Tensor, x: LossInputs) -> torch.Tensor:
    return weighted_cross_entropy(logits.float(), target, x.class_weight, reduction="none")


def _focal(logits: torch.Tensor, target: torch.Tensor, x: LossInputs) -> torch.Tensor:
    return focal_loss(logits, target, x.gamma, x.class_weight, reduction="none")


def _logit_adjusted(logits: torch.Tensor, target: torch.Tensor, x: LossInputs) -> torch.Tensor:
    return logit_adjusted_cross_entropy(logits, target, x.log_prior, x.tau, reduction="none")


def _importance(logits: torch.Tensor, target: torch.Tensor, x: LossInputs) -> torch.Tensor:
    # p(y|x) from the model being trained, without gradient through the weight.
    p = torch.softmax(logits.detach().float(), dim=-1).gather(-1, target.unsqueeze(-1))
    w = importance_weights(p.squeeze(-1), x.log_prior.exp()[target])
    return w * F.cross_entropy(logits.float(), target, reduction="none")


LOSS_MAPPING: dict[str, OutcomeLoss] = {
    "none": _ce,
    "inverse": _weighted_ce,
    "sqrt_inverse": _weighted_ce,
    "class_balanced": _weighted_ce,
    "focal": _focal,
    "logit_adjusted": _logit_adjusted,
    "importance": _importance,
}
"""Per-sample outcome loss of each policy, by name (the policy is configuration)."""


def outcome_loss(policy: str, logits: torch.Tensor, target: torch.Tensor,
                 inputs: LossInputs) -> torch.Tensor:
    """Mean over the batch of ``sample_weight_i · loss_policy(z_i, y_i)``.

    >>> x = LossInputs(torch.tensor([1.0, 3.0]), torch.ones(2), torch.log(torch.tensor([.75, .25])))
    >>> z, y = torch.zeros(2, 2), torch.tensor([0, 1])
    >>> round(outcome_loss("class_balanced", z, y, x).item(), 4)   # (1 + 3)/2 · log 2
    1.3863
    """
    try:
        fn = LOSS_MAPPING[policy]
    except KeyError:
        raise ValueError(f"unknown loss policy {policy!r}; choose from {sorted(LOSS_MAPPING)}"
                         ) from None
    per_sample = fn(logits, target, inputs)
    return (per_sample * inputs.sample_weight.to(per_sample)).mean()
