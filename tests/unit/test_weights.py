"""Every weight policy and loss against values computed by hand from the papers' definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tailstream.configs import Policy
from tailstream.models.imbalance.policies import (
    POLICIES,
    class_weights,
    effective_number_weights,
    inverse_frequency,
    normalise,
    smooth,
    sqrt_inverse_frequency,
)
from tailstream.models.training.losses import (
    focal_loss,
    importance_weights,
    log_prior,
    logit_adjusted_cross_entropy,
    logq_correction,
    weighted_cross_entropy,
)

# Taobao subset counts (SOURCE.md): pv 85,773, cart 5,292, fav 2,959, buy 2,144.
TAOBAO = {"click": 85_773.0, "cart": 5_292.0, "fav": 2_959.0, "purchase": 2_144.0}


def mix_mean(w: dict[str, float], counts: dict[str, float]) -> float:
    total = sum(counts.values())
    return sum(counts[c] / total * w[c] for c in w)


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_has_mean_one_over_the_mix_and_is_bounded(name: str) -> None:
    policy = Policy(name, min_weight=0.05, max_weight=50.0)
    w = class_weights(policy, TAOBAO)
    assert mix_mean(w, TAOBAO) == pytest.approx(1.0)
    assert all(0.05 - 1e-12 <= v <= 50.0 + 1e-12 for v in w.values())


def test_inverse_frequency_by_hand() -> None:
    raw = inverse_frequency({"a": 80, "b": 20})
    assert raw == {"a": 1 / 80, "b": 1 / 20}
    # normalised: π = (.8, .2); Σ π w = .8/80 + .2/20 = 0.02 → w = (0.625, 2.5)
    w = class_weights(Policy("inverse", min_weight=0, max_weight=math.inf), {"a": 80, "b": 20})
    assert w["a"] == pytest.approx(0.625) and w["b"] == pytest.approx(2.5)


def test_sqrt_inverse_by_hand() -> None:
    assert sqrt_inverse_frequency({"a": 100, "b": 25}) == {"a": 0.1, "b": 0.2}


def test_class_balanced_ratio_is_the_effective_number_ratio() -> None:
    beta = 0.9999
    w = class_weights(Policy("class_balanced", beta=beta), TAOBAO)
    expected = (1 - beta ** TAOBAO["click"]) / (1 - beta ** TAOBAO["purchase"])
    assert w["purchase"] / w["click"] == pytest.approx(expected, rel=1e-9)
    # β = 0 → no re-weighting; β → 1 → inverse frequency
    assert set(effective_number_weights(TAOBAO, 0.0).values()) == {1.0}
    near_inv = effective_number_weights({"a": 10, "b": 1000}, 1 - 1e-9)
    assert near_inv["a"] / near_inv["b"] == pytest.approx(100, rel=1e-4)


def test_class_balanced_by_hand_small() -> None:
    # n = 1 → (1-β)/(1-β) = 1 ; n = 2 → (1-β)/(1-β²) = 1/(1+β)
    w = effective_number_weights({"one": 1, "two": 2}, beta=0.5)
    assert w == {"one": 1.0, "two": pytest.approx(1 / 1.5)}
    with pytest.raises(ValueError):
        effective_number_weights({"a": 1}, beta=1.0)


def test_normalise_clips_and_keeps_the_mean() -> None:
    counts = {"a": 990, "b": 9, "c": 1}
    w = normalise(inverse_frequency(counts), counts, min_weight=0.1, max_weight=20)
    assert w["c"] == pytest.approx(20) and w["b"] <= 20
    assert mix_mean(w, counts) == pytest.approx(1.0)


def test_smoothing_has_no_jumps() -> None:
    w = None
    for target in ([1.0] * 3 + [5.0] * 3):
        new = smooth(w, {"a": target}, alpha=0.25)
        if w is not None:
            assert abs(new["a"] - w["a"]) <= 0.25 * 4 + 1e-12
        w = new
    assert w is not None and 1.0 < w["a"] < 5.0


def _torchvision_sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor,
                                    alpha: float, gamma: float) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, as published (torchvision itself cannot be
    installed beside the CPU torch wheel here), reduction='mean'."""
    p = torch.sigmoid(inputs)
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * loss).mean()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_focal_loss_matches_torchvision_in_the_binary_case(gamma: float) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, generator=g) * 3
    y = (torch.rand(64, generator=g) < 0.3).long()
    logits = torch.stack([torch.zeros_like(z), z], dim=1)  # softmax([0, z]) = sigmoid(z)
    alpha = torch.tensor([0.75, 0.25])
    ours = focal_loss(logits, y, gamma=gamma, alpha=alpha)
    ref = _torchvision_sigmoid_focal_loss(z, y.float(), alpha=0.25, gamma=gamma)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_focal_loss_by_hand() -> None:
    # p_t = 0.8 → −(0.2)^2 · log 0.8
    logits = torch.log(torch.tensor([[0.8, 0.2]]))
    assert focal_loss(logits, torch.tensor([0]), gamma=2.0).item() == pytest.approx(
        -(0.2**2) * math.log(0.8), rel=1e-6)


def test_weighted_cross_entropy_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    w = torch.tensor([1.0, 4.0])
    got = weighted_cross_entropy(logits, torch.tensor([0, 1]), w)
    assert got.item() == pytest.approx((math.log(2) + 4 * -math.log(0.75)) / 2, rel=1e-6)


def test_logit_adjustment_by_hand() -> None:
    prior = log_prior({"a": 299, "b": 99}, ["a", "b"])  # add-one: π = (.75, .25)
    assert prior.exp().tolist() == pytest.approx([0.75, 0.25])
    logits = torch.zeros(1, 2)
    got = logit_adjusted_cross_entropy(logits, torch.tensor([1]), prior, tau=1.0)
    # softmax(log π) = π → CE = −log 0.25
    assert got.item() == pytest.approx(-math.log(0.25), rel=1e-6)


def test_logq_and_importance_by_hand() -> None:
    q = torch.tensor([0.5, 0.1])
    corrected = logq_correction(torch.ones(2, 2), torch.log(q))
    assert corrected[0].tolist() == pytest.approx([1 - math.log(0.5), 1 - math.log(0.1)])
    w = importance_weights(torch.tensor([0.9, 0.5, 0.001]), torch.tensor([0.9, 0.01, 0.5]),
                           clip=(0.1, 10.0))
    assert w.tolist() == pytest.approx([1.0, 10.0, 0.1])


def test_policy_describe_names_its_parameters() -> None:
    assert Policy("focal", beta=0.99, gamma=1.5).describe() == {
        "policy": "focal", "beta": 0.99, "gamma": 1.5}
    assert Policy("logit_adjusted", tau=0.5).describe() == {"policy": "logit_adjusted",
                                                            "tau": 0.5}
