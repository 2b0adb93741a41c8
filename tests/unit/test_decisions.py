"""Decisions that follow the live counts: prior correction, EM prior estimate, threshold
moving and stacking (models/imbalance/decisions.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tailstream.models.imbalance.decisions import (
    DecisionLayer,
    Stack,
    as_prior,
    choose_offsets,
    decide_classes,
    em_prior,
    fit_offsets,
    prior_correct,
    recalls,
    score,
)


def shop(n: int, purchase_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes (click, cart, purchase) with overlapping 1-d evidence; returns the
    labels and a model's calibrated posteriors *under a fixed training mix*."""
    rng = np.random.default_rng(seed)
    train = np.array([0.85, 0.10, 0.05])
    mix = np.array([0.95 - 0.10 - purchase_share, 0.10, purchase_share])
    mix[0] += 0.05
    mix = mix / mix.sum()
    y = rng.choice(3, size=n, p=mix)
    means = np.array([0.0, 1.0, 2.0])
    x = rng.normal(means[y], 0.8)
    like = np.exp(-0.5 * ((x[:, None] - means[None, :]) / 0.8) ** 2)
    post = like * train
    return y, post / post.sum(1, keepdims=True)


def test_prior_correction_moves_decisions_when_the_purchase_share_doubles() -> None:
    train = np.array([0.85, 0.10, 0.05])
    y, proba = shop(20_000, purchase_share=0.10, seed=1)  # the sale: twice the purchases
    before = recalls(y, proba.argmax(1), 3)[2]
    live = as_prior({"click": np.mean(y == 0), "cart": np.mean(y == 1),
                     "purchase": np.mean(y == 2)}, ["click", "cart", "purchase"])
    after = recalls(y, prior_correct(proba, train, live).argmax(1), 3)[2]
    assert after > before + 0.05
    # The corrected model is calibrated to the new mix: its mean purchase probability
    # matches the new share.
    assert abs(prior_correct(proba, train, live)[:, 2].mean() - np.mean(y == 2)) < 0.01


def test_em_recovers_the_new_mix_without_labels() -> None:
    train = np.array([0.85, 0.10, 0.05])
    y, proba = shop(20_000, purchase_share=0.10, seed=2)
    est = em_prior(proba, train)
    assert abs(est[2] - np.mean(y == 2)) < 0.02
    assert abs(proba[:, 2].mean() - np.mean(y == 2)) > abs(est[2] - np.mean(y == 2))


@pytest.mark.parametrize("objective", ["g_mean", "macro_f1"])
def test_threshold_moving_beats_the_argmax_on_fresh_data(objective: str) -> None:
    y_fit, p_fit = shop(10_000, 0.05, seed=3)
    y_new, p_new = shop(10_000, 0.05, seed=4)
    b = fit_offsets(p_fit, y_fit, objective)
    plain = score(y_new, p_new.argmax(1), 3, objective)
    moved = score(y_new, decide_classes(p_new, b), 3, objective)
    assert moved > plain
    assert b[0] == 0.0


def test_minority_recall_objective_respects_the_precision_floor() -> None:
    y, p = shop(10_000, 0.05, seed=5)
    b = fit_offsets(p, y, "minority_recall", minority=[1, 2], precision_floor=0.3)
    pred = decide_classes(p, b)
    for c in (1, 2):
        chosen = pred == c
        assert chosen.any() and (y[chosen] == c).mean() >= 0.3
    assert recalls(y, pred, 3)[1:].mean() > recalls(y, p.argmax(1), 3)[1:].mean()


def test_the_stack_learns_to_trust_the_better_model() -> None:
    y, good = shop(6000, 0.05, seed=6)
    rng = np.random.default_rng(7)
    noisy = rng.dirichlet(np.ones(3), size=len(y))
    stack = Stack(3).fit([good, noisy], y)
    assert stack.weights[0] > 3 * stack.weights[1]
    y2, good2 = shop(6000, 0.05, seed=8)
    noisy2 = rng.dirichlet(np.ones(3), size=len(y2))
    stacked = stack.predict([good2, noisy2])
    nll = -np.log(stacked[np.arange(len(y2)), y2]).mean()
    avg = -np.log(((good2 + noisy2) / 2)[np.arange(len(y2)), y2]).mean()
    assert nll < avg


def test_an_unfitted_stack_averages_and_a_one_class_window_leaves_it_unfitted() -> None:
    p = np.array([[0.8, 0.2]])
    q = np.array([[0.4, 0.6]])
    stack = Stack(2).fit([p, q], np.array([0]))
    assert stack.coef is None
    assert np.allclose(stack.predict([p, q]), [[0.6, 0.4]])


def test_the_layer_fits_on_a_rolling_window_and_forgets_on_reset() -> None:
    from tailstream.models.imbalance.decisions import DecisionLayer

    layer = DecisionLayer(3, window=5000)
    for seed in range(4):
        y, p = shop(3000, 0.05, seed=20 + seed)
        layer.add([p], y)
    assert layer.fitted_on == 6000  # the newest windows reaching 5,000, not all 12,000
    y, p = shop(800, 0.05, seed=30)
    layer.add([p], y, reset=True)
    assert layer.fitted_on == 800


def test_thresholds_fitted_on_a_rare_rich_window_hold_on_the_stream() -> None:
    """The gate's window over-keeps rare classes; the layer fitted there must still decide
    well on the stream's own mix once the live prior corrects the probabilities."""
    from tailstream.models.imbalance.decisions import DecisionLayer

    y, p = shop(30_000, 0.05, seed=40)
    rare = np.flatnonzero(y > 0)
    common = np.flatnonzero(y == 0)[:len(rare)]
    window = np.concatenate([rare, common])  # half rare: like a buffer's held-out window
    live = np.bincount(y, minlength=3) / len(y)
    y_new, p_new = shop(20_000, 0.05, seed=41)
    fitted = DecisionLayer(3).fit([p[window]], y[window], live_prior=live)
    _, pred = fitted.predict([p_new], live)
    naive = DecisionLayer(3).fit([p[window]], y[window])  # thresholds for the window's mix
    _, pred_naive = naive.predict([p_new], live)
    assert score(y_new, pred, 3, "g_mean") > score(y_new, pred_naive, 3, "g_mean") + 0.05
    assert score(y_new, pred, 3, "g_mean") > score(y_new, p_new.argmax(1), 3, "g_mean")


def test_offsets_split_a_weak_model_whose_spread_is_below_one_grid_step() -> None:
    # Probabilities that barely move around the prior still tell the classes apart a
    # little; a grid of 0.25 steps would predict the minority for all rows or none.
    rng = np.random.default_rng(3)
    y = (rng.random(5000) < 0.05).astype(int)
    p1 = 0.05 + 0.001 * y + rng.normal(0, 0.0005, 5000)
    proba = np.stack([1 - p1, p1], axis=1)
    b = fit_offsets(proba, y, "g_mean")
    pred = decide_classes(proba, b)
    assert 0.0 < pred.mean() < 0.9
    assert score(y, pred, 2, "g_mean") > 0.6


def test_the_layer_keeps_the_balanced_rule_where_fitting_does_not_pay_out_of_fold() -> None:
    """Calibrated probabilities of a weak model: the balanced rule (p/π) is already the
    best decision, and fitted offsets on a few hundred rows mostly chase noise; an
    over-confident model needs fitted offsets."""
    picks = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        p1 = rng.beta(1, 9, 400)
        y = (rng.random(400) < p1).astype(int)
        picks.append(choose_offsets(np.stack([1 - p1, p1], 1), y, np.array([0.9, 0.1]))[1])
    assert picks.count("balanced") >= 6, picks
    rng = np.random.default_rng(1)
    y = (rng.random(4000) < 0.1).astype(int)
    p1 = np.clip(0.5 + 0.3 * y + rng.normal(0, 0.1, 4000), 0.01, 0.99)  # says 1 too often
    offsets, rule = choose_offsets(np.stack([1 - p1, p1], 1), y, np.array([0.9, 0.1]))
    assert rule == "fitted" and offsets[1] < 0
    layer = DecisionLayer(2).fit([np.stack([1 - p1, p1], 1)], y)
    assert layer.report()["rule"] in ("fitted", "balanced")
