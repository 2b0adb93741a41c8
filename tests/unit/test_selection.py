"""Adaptive = policy selection: the selector's rules and state, the routine promoting the
better of two candidates, and triggers that fire on any stream."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tailstream.configs import (
    FineTuneConfig,
    GateConfig,
    SelectionConfig,
    TowerConfig,
    gate_config,
    policy,
)
from tailstream.contract import CLASSES, Event
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.decisions import score_se
from tailstream.models.imbalance.policies import class_weights
from tailstream.models.towers.encoder import load_encoder
from tailstream.models.towers.loading import ServedModel, build_model
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.training.finetune import NonFiniteLoss, prepare_data
from tailstream.models.training.gate import QUALITY_METRICS, decide, objective_metric
from tailstream.models.training.losses import LOSS_MAPPING
from tailstream.models.training.routine import fine_tune
from tailstream.models.training.selection import (
    ARMS,
    PolicySelector,
    Trial,
    arm_config,
    choose,
)
from tailstream.settings import Settings
from tailstream.streams.worker.imbalance import ImbalanceLoop

CPU = torch.device("cpu")
POLICIES = ["class_balanced", "focal", "logit_adjusted", "inverse", "none", "oversample"]
TRUE_LIFT = {"class_balanced": 0.01, "focal": 0.06, "logit_adjusted": 0.02, "inverse": 0.0,
             "none": -0.04, "oversample": 0.03}
"""A synthetic stream on which focal is the best fixed policy."""


def simulate(selector: PolicySelector, triggers: int, seed: int = 0,
             noise: float = 0.02) -> Counter[str]:
    """Feed ``triggers`` rounds of noisy rewards; the best candidate of a round is promoted
    when it beats the served model (the gate's analogue). Returns the tries per policy."""
    rng = random.Random(seed)
    tries: Counter[str] = Counter()
    for _ in range(triggers):
        arms = selector.plan("class_balanced")
        assert arms[0] not in arms[1:] and len(arms) == 1 + selector.challengers
        rewards = {a: TRUE_LIFT[a] + rng.gauss(0.0, noise) for a in arms}
        tries.update(arms[1:])
        best = max(arms, key=lambda a: rewards[a])
        selector.record(rewards, best if rewards[best] > 0 else None)
    return tries


# --------------------------------------------------------------------------- the selector
def test_burn_in_tries_every_policy_before_exploiting() -> None:
    sel = PolicySelector(POLICIES, challengers=2, burn_in=1, epsilon=0.0)
    seen: set[str] = set()
    for _ in range(3):  # 5 challengers, 2 a trigger: 3 triggers cover them all
        arms = sel.plan("class_balanced")
        seen.update(arms[1:])
        sel.record(dict.fromkeys(arms, 0.0), None)
    assert seen == set(POLICIES) - {"class_balanced"}


@pytest.mark.parametrize("seed", range(3))
def test_the_bandit_converges_to_the_best_policy(seed: int) -> None:
    sel = PolicySelector(POLICIES, rule="bandit", challengers=1, epsilon=0.1, seed=seed)
    tries = simulate(sel, 120, seed)
    assert sel.best() == "focal"
    assert sel.incumbent == "focal"
    # Once focal serves it is trained every time; the challenger slot explores the rest.
    assert sel.pulls["focal"] > 0.8 * 120
    assert tries.most_common(1)[0][0] in ("oversample", "logit_adjusted", "focal")


@pytest.mark.parametrize("seed", range(3))
def test_successive_halving_keeps_only_the_best_policy(seed: int) -> None:
    sel = PolicySelector(POLICIES, rule="halving", challengers=1, burn_in=2, eta=2, seed=seed)
    simulate(sel, 60, seed, noise=0.01)
    assert sel.active == ["focal"]
    assert sel.rung >= 3  # 6 → 3 → 2 → 1
    assert sel.best() == "focal" and sel.incumbent == "focal"
    # Converged: the best of the others keeps challenging.
    assert sel.plan("class_balanced") == ["focal", "oversample"]


@pytest.mark.parametrize("rule", ["bandit", "halving"])
def test_the_state_round_trips_through_json(rule: str) -> None:
    sel = PolicySelector(POLICIES, rule=rule, challengers=2, seed=4)
    simulate(sel, 7, 4)
    restored = PolicySelector.from_dict(json.loads(json.dumps(sel.to_dict())))
    assert restored == sel
    assert restored.plan("class_balanced") == sel.plan("class_balanced")
    assert restored.report()["policies"] == sel.report()["policies"]


def test_a_saved_state_follows_a_changed_configuration() -> None:
    sel = PolicySelector.from_config(SelectionConfig(policies=("class_balanced", "focal",
                                                               "none"), rule="halving"))
    sel.record({"class_balanced": 0.01, "focal": 0.05}, "focal")
    cfg = SelectionConfig(policies=("focal", "none", "adasyn"), rule="halving", challengers=2)
    carried = PolicySelector.from_config(cfg, json.loads(json.dumps(sel.to_dict())))
    assert carried.arms == ["focal", "none", "adasyn"] and carried.challengers == 2
    assert carried.active == ["focal", "none", "adasyn"]  # class_balanced left, adasyn joined
    assert carried.pulls == {"class_balanced": 1, "focal": 1} and carried.incumbent == "focal"
    assert carried.plan("class_balanced") == ["focal", "none", "adasyn"]


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        PolicySelector(["focal", "smoote"])
    with pytest.raises(ValueError, match="unknown selection rule"):
        PolicySelector(["focal"], rule="thompson")
    with pytest.raises(ValueError):
        PolicySelector(["focal"], epsilon=2.0)
    assert PolicySelector(["ce", "none", "focal"]).arms == ["none", "focal"]


def test_every_registry_policy_is_a_run_config() -> None:
    published = policy(Settings().replace(weight_policy="focal", weight_gamma=1.5))
    base = FineTuneConfig(builder="none", smote_share=0.0)
    for name in ARMS:
        cfg, weights = arm_config(base, name, published, 0.25)
        assert weights.gamma == 1.5 and weights.beta == published.beta  # published parameters
        assert cfg.policy == weights.name
    assert arm_config(base, "undersample", published, 0.25)[0].builder == "undersample"
    smote = arm_config(base, "smote", published, 0.25)[0]
    assert (smote.policy, smote.sampler, smote.smote_share) == ("none", "smote", 0.25)
    assert arm_config(base, "ce", published, 0.25)[0].policy == "none"


def test_choose_prefers_the_objective_then_macro_f1_then_the_current_policy() -> None:
    t = [Trial("class_balanced", 0.3, 0.2, metrics={"macro_f1": 0.4}),
         Trial("focal", 0.3, 0.2, metrics={"macro_f1": 0.4}),
         Trial("none", 0.3, 0.2, metrics={"macro_f1": 0.5})]
    assert choose(t) == 2 and choose(t[:2]) == 0
    assert t[0].lift == pytest.approx(0.1)


def test_a_lead_within_the_noise_keeps_the_current_policy() -> None:
    noisy = [Trial("inverse", 0.300, 0.29, se=0.02), Trial("focal", 0.320, 0.29, se=0.02),
             Trial("oversample", 0.315, 0.29, se=0.01)]
    assert choose(noisy, margin_se=1.0) == 0  # 0.020 < √(0.02² + 0.02²) = 0.028
    assert choose(noisy, margin_se=0.0) == 1  # any lead
    clear = [*noisy, Trial("smote", 0.40, 0.29, se=0.02)]
    assert choose(clear, margin_se=1.0) == 3  # 0.100 > 0.028
    failed = [Trial("inverse", 0.0, 0.29, failed="nan"), noisy[1]]
    assert choose(failed, margin_se=1.0) == 1  # nothing to keep


def test_the_objectives_standard_error_shrinks_with_the_window() -> None:
    rng = np.random.default_rng(0)

    def se(n: int) -> float:
        y = (rng.random(n) < 0.1).astype(int)
        pred = np.where(rng.random(n) < 0.7, y, 1 - y)
        return score_se(y, pred, 2, "g_mean")

    small, large = se(300), se(30_000)
    assert 0.02 < small < 0.1 and large < small / 5  # ~1/√n


def test_the_gate_guards_the_objective_too() -> None:
    cur = {"recall_cart": 0.3, "recall_purchase": 0.2, "macro_f1": 0.4, "hit_at_10": 0.5,
           "support_cart": 50, "support_purchase": 20, "objective_g_mean": 0.40}
    metrics = (*QUALITY_METRICS, objective_metric("g_mean"))
    worse = decide(cur, {**cur, "recall_cart": 0.35, "objective_g_mean": 0.30},
                   quality_metrics=metrics)
    assert not worse.promote and "objective_g_mean fell 0.400 → 0.300" in worse.reason
    assert decide(cur, {**cur, "objective_g_mean": 0.45}, quality_metrics=metrics).promote


def test_a_fall_inside_the_windows_noise_does_not_reject_but_a_clear_one_does() -> None:
    """The first fine-tune of a fresh demo: a window of ~four purchases, the served G-mean
    0.232 ± 0.144, the candidate's 0 (one class without a hit), its HitRate@10 up."""
    metrics = ("hit_at_10", objective_metric("g_mean"))
    cur = {"hit_at_10": 0.761, "objective_g_mean": 0.232, "objective_g_mean_se": 0.144}
    thin = {"hit_at_10": 0.770, "objective_g_mean": 0.0, "objective_g_mean_se": 0.0}
    let_through = decide(cur, thin, (), quality_metrics=metrics, noise_z=2.0)
    assert let_through.promote and "within noise 0.288" in let_through.reason
    assert not decide(cur, thin, (), quality_metrics=metrics, noise_z=0.0).promote
    # The same fall measured on a window large enough to tell is a fall.
    sure = {**cur, "objective_g_mean_se": 0.01}
    clear = decide(sure, {**thin, "objective_g_mean_se": 0.01}, (), quality_metrics=metrics,
                   noise_z=2.0)
    assert not clear.promote and "objective_g_mean fell 0.232 → 0.000" in clear.reason
    # HitRate carries no standard error: its tolerance stays the fixed one.
    assert not decide(cur, {**thin, "hit_at_10": 0.70}, (), quality_metrics=metrics,
                      noise_z=2.0).promote
    assert gate_config(Settings().replace(gate_noise_z=0.0)).noise_z == 0.0


# --------------------------------------------------------------------------- the routine
def served_base(encoder: Path) -> tuple[ServedModel, TextVectors]:
    enc = load_encoder(encoder)
    model = build_model(enc, TowerConfig(embed_dim=32))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    vectors = TextVectors(model, enc.tokenizer, device=CPU, max_len=32, fingerprint="t")
    return ServedModel("base", model, enc.tokenizer, "t", {}), vectors


def test_selection_promotes_the_better_candidate(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    """The workers publish plain cross-entropy, which on this stream learns to say
    "click"; the class-balanced challenger finds the rare classes. Selection trains both,
    the challenger is clearly better on the held-out objective, the gate promotes it and
    the selector makes it the current policy."""
    samples = shop_samples(2000)
    n = Counter(s.label for s in samples)
    counts = {c: float(n.get(c, 0)) for c in CLASSES}
    published = policy(Settings().replace(weight_policy="none", weight_beta=0.999))
    served, vectors = served_base(tiny_encoder)
    data = prepare_data(samples, counts, 0.2)
    cfg = FineTuneConfig(max_steps=60, batch_size=128, lr=3e-3).with_policy(published)
    # Judged on the head's argmax (move_to=None): with thresholds moved, plain
    # cross-entropy finds the rare classes too and the two are close.
    gate = GateConfig(objective="minority_recall", move_to=None)
    selector = PolicySelector(["none", "class_balanced"], challengers=1)
    cand = fine_tune(served, vectors, data, cfg=cfg, device=CPU, gate=gate,
                     class_weight=class_weights(published, counts), selector=selector,
                     policy=published, counts=counts)
    tried = {t.policy: t for t in cand.trials}
    assert list(tried) == ["none", "class_balanced"]
    assert tried["class_balanced"].objective > tried["none"].objective + 0.1
    assert cand.policy == "class_balanced" and cand.cfg is not None
    assert cand.cfg.policy == "class_balanced"
    assert cand.class_weight["purchase"] > cand.class_weight["click"]
    assert cand.decision.promote, cand.decision.reason
    assert cand.metrics["objective_minority_recall"] == tried["class_balanced"].objective
    assert cand.current["objective_minority_recall"] == tried["none"].served
    assert selector.incumbent == "class_balanced" and selector.triggers == 1
    assert selector.pulls == {"none": 1, "class_balanced": 1}


def test_a_failing_challenger_costs_only_itself(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A challenger whose loss turns NaN gets the worst reward and is never the best; the
    current policy's candidate is judged as usual. The current policy failing fails the
    run, as it did before selection."""
    samples = shop_samples(600)
    counts = {c: float(n) for c, n in Counter(s.label for s in samples).items()}
    published = policy(Settings().replace(weight_policy="none"))
    served, vectors = served_base(tiny_encoder)
    data = prepare_data(samples, counts, 0.2)
    cfg = FineTuneConfig(max_steps=5, batch_size=64).with_policy(published)
    monkeypatch.setitem(LOSS_MAPPING, "importance",
                        lambda logits, target, x: logits.sum(-1) * float("nan"))
    selector = PolicySelector(["none", "importance"], challengers=1)
    cand = fine_tune(served, vectors, data, cfg=cfg, device=CPU, gate=GateConfig(),
                     class_weight=dict.fromkeys(CLASSES, 1.0), selector=selector,
                     policy=published, counts=counts)
    assert cand.policy == "none" and [t.policy for t in cand.trials] == ["none", "importance"]
    failed = cand.trials[1]
    assert failed.failed.startswith("NonFiniteLoss") and failed.lift == -1.0
    assert failed.to_dict()["objective"] is None and choose(cand.trials) == 0
    assert selector.mean("importance") == -1.0 and selector.pulls["none"] == 1
    with pytest.raises(NonFiniteLoss):
        fine_tune(served, vectors, data, cfg=cfg.with_policy(
                      dataclasses.replace(published, name="importance")),
                  device=CPU, gate=GateConfig(), class_weight=dict.fromkeys(CLASSES, 1.0),
                  selector=PolicySelector(["importance", "none"]),
                  policy=dataclasses.replace(published, name="importance"), counts=counts)


def test_selection_needs_a_gate_and_the_published_policy(
        tiny_encoder: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    served, vectors = served_base(tiny_encoder)
    data = prepare_data(shop_samples(200), {}, 0.2)
    with pytest.raises(ValueError, match="needs a gate"):
        fine_tune(served, vectors, data, cfg=FineTuneConfig(), class_weight={}, device=CPU,
                  gate=None, selector=PolicySelector(["none"]))


# --------------------------------------------------------------------------- triggers
def test_the_interval_trigger_fires_on_a_click_only_stream() -> None:
    """Clicks never enter the minority buffer once the mix is known; the interval must
    still ask for a fine-tune (otherwise a click-only stream trains once, or never)."""
    now = [1_000_000.0]
    settings = Settings().replace(trigger_min_samples=10**9, trigger_max_interval_s=600.0,
                                  trigger_cooldown_s=0.0, mix_warmup_events=100)
    loop = ImbalanceLoop(settings, clock=lambda: now[0])
    reasons = []
    for i in range(6000):
        event = Event("click", f"e{i}", f"u{i % 50}", 1.7e9 + i, item_id=f"i{i % 300}")
        loop.observe(event, partition=0, user_class_counts={}, category_affinity=0.5,
                     repeat=False)
        if i % 100 == 99:
            now[0] += 60.0
            request = loop.end_batch()
            if request is not None:
                reasons.append(request["reason"])
    assert reasons.count("interval") >= 4, reasons
