"""Outcome and retrieval losses (torch): pure functions, registered by policy name.

:data:`LOSS_MAPPING` names the outcome loss of each weight policy
(:mod:`tailstream.models.imbalance.policies`), so the trainer's loss is configuration
(``TAILSTREAM_WEIGHT_POLICY``, as published by the workers), not code:

* ``none``: plain cross-entropy; ``inverse`` / ``sqrt_inverse`` / ``class_balanced``: the
  policy's class weights ``w_y · CE``;
* ``focal``: ``−α_y (1 − p_t)^γ log p_t`` with the class-balanced α (Lin et al., "Focal Loss
  for Dense Object Detection", ICCV 2017);
* ``logit_adjusted``: ``CE(z + τ · log π, y)`` (Menon et al., "Long-tail learning via logit
  adjustment", ICLR 2021);
* ``importance``: each sample's loss scaled by ``p(y_i|x_i) / p(y_i)`` (clipped).

For the retrieval side and per-sample weights:

* :func:`logq_correction`: ``s(x, y) − log q(y)`` for sampled softmax (Yi et al.,
  "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations",
  RecSys 2019).
* :func:`importance_weights`: ``w_i = p(y_i | x_i) / p(y_i)``, clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Counts = Mapping[str, float]


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
