"""The one fine-tune routine: (served model, data, policy) → candidate → gate decision.

The trainer process (:mod:`tailstream.streams.trainer`) and every transformer strategy of
``tailstream eval`` (:mod:`tailstream.evaluation`) call :func:`fine_tune`; nothing else
builds a :class:`~tailstream.models.training.finetune.FineTuner` or asks the gate, so the
evaluation measures exactly what production runs. One call:

1. copies the served model — a frozen encoder, and the text vectors cached for it, are
   shared with the served model rather than copied;
2. makes the configured encoder layers trainable (``FineTuneConfig.layers``:
   ``auto`` = every layer on CUDA, none on the CPU; optionally LoRA adapters);
3. trains one bounded run (``max_steps`` / ``max_seconds``) with the policy's loss and
   class weights (the caller passes the weights the imbalance loop published);
4. with a :class:`~tailstream.configs.GateConfig`: evaluates the served model and the
   candidate on the held-out window, with the gate's decision objective
   (``objective_<name>``, a gated quality metric), and asks the gate
   (:func:`~tailstream.models.training.gate.decide`); without one (a fixed strategy of
   the evaluation, which serves every candidate by definition) the candidate is adopted.

**Policy selection** (``selector=``, a
:class:`~tailstream.models.training.selection.PolicySelector`): steps 1–3 run once for
each policy the selector plans — the current one first, then its challengers, each with
its own loss, builder or sampler and class weights from the live ``counts`` with the
published ``policy``'s parameters (the current policy, when it is the published one,
keeps the published weights) — every candidate is scored on the same held-out window, the
best by the objective (:func:`~tailstream.models.training.selection.choose`) goes to the
gate, and the selector records every policy's reward and what was promoted. The caller
keeps the selector (its state is JSON) from one trigger to the next.

What a promoted run leaves behind for replay is chosen by :func:`remember`, also shared.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from tailstream.configs import FineTuneConfig, GateConfig, Policy
from tailstream.contract import CLASSES
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.decisions import DecisionLayer, as_prior
from tailstream.models.imbalance.policies import class_weights
from tailstream.models.towers.adapters import configure_trainable
from tailstream.models.towers.encoder import encoder_config
from tailstream.models.towers.loading import ServedModel, resolve_finetune_layers
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.towers.two_tower import TwoTowerRecommender
from tailstream.models.training.evaluation import evaluate
from tailstream.models.training.finetune import FineTuner, NonFiniteLoss, RunResult, TrainData
from tailstream.models.training.gate import QUALITY_METRICS, GateDecision, decide, objective_metric
from tailstream.models.training.selection import PolicySelector, Trial, arm_config, choose

ADOPTED = GateDecision(True, "adopted: a fixed strategy serves every candidate", {}, "fixed")
"""The decision when no gate is asked (the evaluation's fixed strategies)."""

StepHook = Callable[[int, float], None]


@dataclass
class Candidate:
    """The outcome of one fine-tune: the trained model and what the gate made of it."""

    model: TwoTowerRecommender
    run: RunResult
    layers: int
    """Encoder layers that trained (0: towers and head only; -1: all)."""
    vectors: TextVectors
    """Text vectors the candidate reads (the served model's when the encoder was frozen)."""
    decision: GateDecision
    current: dict[str, float] = field(default_factory=dict)
    """Held-out metrics of the served model (empty without a gate)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Held-out metrics of the candidate (empty without a gate)."""
    policy: str = ""
    """The policy it trained with (a selection policy name, or the loss policy)."""
    cfg: FineTuneConfig | None = None
    """The run config it trained with."""
    class_weight: dict[str, float] = field(default_factory=dict)
    """The class weights it trained with."""
    trials: list[Trial] = field(default_factory=list)
    """Policy selection: every policy tried at this trigger, on the held-out window."""
    holdout_proba: np.ndarray | None = None
    """The head's class probabilities on the held-out window (gated runs)."""
    decisions: dict[str, object] | None = None
    """The decision layer fitted on the held-out window (:func:`fit_decisions`), which the
    version's manifest carries to the workers (None without a gate, for a rejected
    candidate, or without a usable window)."""
    served_decisions: dict[str, object] | None = None
    """Every gated trigger also refits the *served* model's decisions
    (``GateConfig.refresh_decisions``): the layer fitted on the served head's
    probabilities on the same held-out window — the thresholds the gate judged it with.
    A rejected candidate's trigger serves it at once; a candidate that goes to a canary
    leaves it with the version that keeps serving the other users, and serving everyone
    again if the canary is rolled back. So a stream whose candidates are rejected (offline
    or online) still decides at today's window rather than at the last promotion's (or,
    for the base model, at the argmax). None when switched off or without a usable
    window."""


def fine_tune(served: ServedModel, vectors: TextVectors, data: TrainData, *,
              cfg: FineTuneConfig, class_weight: Mapping[str, float], device: torch.device,
              gate: GateConfig | None, on_step: StepHook | None = None,
              selector: PolicySelector | None = None, policy: Policy | None = None,
              counts: Mapping[str, float] | None = None) -> Candidate:
    """Train a candidate from ``served`` on ``data`` and decide on it (see the module
    docstring). ``on_step(step, loss)`` is called after every step (the benchmark times
    steps with it). With a ``selector`` (which needs ``gate``, the published ``policy``
    and the live class ``counts``) several policies compete and the selector learns.
    Raises :class:`~tailstream.models.training.finetune.NonFiniteLoss` when a step's loss
    is not finite; the served model is never modified."""
    if selector is not None:
        if gate is None or policy is None or counts is None:
            raise ValueError("policy selection needs a gate, the published policy and the "
                             "live class counts")
        return _select(served, vectors, data, cfg=cfg, class_weight=class_weight,
                       device=device, gate=gate, on_step=on_step, selector=selector,
                       policy=policy, counts=counts)
    cand = _train(served, vectors, data, cfg, class_weight, device, on_step)
    cand.policy = cfg.policy
    if gate is None:
        return cand
    cand.metrics = _evaluate(cand.model, cand.vectors, data, cfg, gate, cand)
    served_proba: list[np.ndarray] = []
    cand.current = _evaluate(served.model, vectors, data, cfg, gate, keep=served_proba)
    cand.decision = _decide(cand.current, cand.metrics, gate)
    if cand.decision.promote:
        cand.decisions = fit_decisions(cand, data, gate)
    cand.served_decisions = refresh_decisions(served_proba, cand, data, gate)
    return cand


def _train(served: ServedModel, vectors: TextVectors, data: TrainData, cfg: FineTuneConfig,
           class_weight: Mapping[str, float], device: torch.device,
           on_step: StepHook | None) -> Candidate:
    """Steps 1–3: a trained copy of the served model (decision: adopted)."""
    layers = resolve_finetune_layers(cfg.layers, device,
                                     encoder_config(served.model.encoder, "num_hidden_layers"))
    # A frozen encoder is shared with the served model (and so are its cached text
    # vectors); otherwise the candidate gets its own copy to train.
    memo = {id(served.model.encoder): served.model.encoder} if layers == 0 else {}
    candidate = copy.deepcopy(served.model, memo)
    for p in candidate.head_parameters():
        p.requires_grad_(True)
    configure_trainable(candidate.encoder, layers, cfg.lora_rank)
    # The frequency filter: items seen often enough in what this run may draw get an id
    # slot now (the served model is untouched; a promotion carries the new owners).
    candidate.admit_ids(Counter(s.item_id for s in (*data.pool, *data.replay)),
                        cfg.id_min_count)
    tuner = FineTuner(candidate, served.tokenizer, cfg, device=device,
                      text_vectors=vectors if layers == 0 else None,
                      class_weight=class_weight, max_len=served.model.config.max_len)
    run = tuner.train(data, on_step)
    candidate.eval()
    cand_vectors = vectors if layers == 0 else TextVectors(
        candidate, served.tokenizer, device=device, max_len=served.model.config.max_len,
        fingerprint="candidate", cache_size=len(data.holdout) * 8 + 1024)
    return Candidate(candidate, run, layers, cand_vectors, ADOPTED, cfg=cfg,
                     class_weight=dict(class_weight))


def _evaluate(model: TwoTowerRecommender, vectors: TextVectors, data: TrainData,
              cfg: FineTuneConfig, gate: GateConfig, cand: Candidate | None = None,
              keep: list[np.ndarray] | None = None) -> dict[str, float]:
    """Held-out metrics; a ``cand``idate also keeps its head's held-out probabilities
    (and so does ``keep``, a list the probabilities are appended to)."""
    proba: list[np.ndarray] = []
    metrics = evaluate(model, vectors.vectors, data.holdout, data.stream_mix,
                       minority_classes=list(cfg.minority_classes), objective=gate.objective,
                       precision_floor=gate.precision_floor, move_to=gate.move_to,
                       proba_out=proba if cand is not None or keep is not None else None)
    if cand is not None and proba:
        cand.holdout_proba = proba[0]
    if keep is not None:
        keep.extend(proba)
    return metrics


MIN_DECISION_WINDOW = 50
"""Fewest held-out samples a decision layer is fitted on (fewer: none is shipped)."""


def fit_decisions(cand: Candidate, data: TrainData, gate: GateConfig
                  ) -> dict[str, object] | None:
    """The decision layer the workers serve this candidate with
    (:class:`~tailstream.models.imbalance.decisions.DecisionLayer`): the head's
    probabilities on the held-out window — which the candidate never trained on — stacked
    (calibrated), corrected from the window's class mix to the stream's, and thresholds
    moved there to the decision objective (``gate.move_to``). The worker corrects it again
    to its live class prior at every list, so a change in the mix moves decisions without
    a fine-tune. None when there is nothing to fit (no moved decisions, a window under
    :data:`MIN_DECISION_WINDOW` samples or with a single class)."""
    return _fit_layer(cand.holdout_proba, cand, data, gate)


def refresh_decisions(served_proba: Sequence[np.ndarray], cand: Candidate, data: TrainData,
                      gate: GateConfig) -> dict[str, object] | None:
    """The served model's decision layer refitted at a trigger
    (:attr:`Candidate.served_decisions`): as :func:`fit_decisions`, on the served
    head's held-out probabilities ``served_proba`` — the newest window, which the gate
    just scored the served model on with thresholds moved the same way (cross-fitted
    there), so the workers then decide as the gate judged the model. None when
    ``gate.refresh_decisions`` is off or nothing can be fitted."""
    if not gate.refresh_decisions or not served_proba:
        return None
    return _fit_layer(served_proba[0], cand, data, gate)


def _fit_layer(proba: np.ndarray | None, cand: Candidate, data: TrainData, gate: GateConfig
               ) -> dict[str, object] | None:
    classes = list(cand.model.config.classes)
    if gate.move_to is None or proba is None or len(data.holdout) < MIN_DECISION_WINDOW:
        return None
    labels = np.array([classes.index(s.label) for s in data.holdout])
    if len(np.unique(labels)) < 2:
        return None
    minority = tuple(classes.index(c) for c in cand.cfg.minority_classes
                     if c in classes) if cand.cfg is not None else ()
    layer = DecisionLayer(len(classes), gate.move_to, minority, gate.move_precision_floor)
    fast = fast_inputs(data.holdout, classes) if gate.stack_fast else []
    layer.fit([proba, *fast], labels,
              live_prior=as_prior(data.stream_mix, classes))
    return layer.to_dict()


def fast_inputs(samples: Sequence[Sample], classes: Sequence[str]) -> list[np.ndarray]:
    """The river fast path's probabilities for ``samples`` (``[N, K]``, ``classes``
    order), made by the workers before learning from each: a second model for the decision
    layer to stack beside the head — which keeps it only if it helps out of fold
    (:func:`~tailstream.models.imbalance.decisions.choose_inputs`). Empty when a sample
    lacks them (written before they were kept, or by another class vocabulary).

    >>> s = Sample("e", "u", "i", "cart", 1.0, fast=(0.7, 0.2, 0.06, 0.04))
    >>> fast_inputs([s], ["click", "cart", "fav", "purchase"])[0].tolist()
    [[0.7, 0.2, 0.06, 0.04]]
    >>> fast_inputs([Sample("e", "u", "i", "cart", 1.0)], ["click", "cart"])
    []
    """
    if not samples or any(c not in CLASSES for c in classes) or \
            any(len(s.fast) != len(CLASSES) for s in samples):
        return []
    order = [CLASSES.index(c) for c in classes]
    return [np.asarray([s.fast for s in samples], dtype=float)[:, order]]


def _decide(current: Mapping[str, float], candidate: Mapping[str, float], gate: GateConfig
            ) -> GateDecision:
    # With moved thresholds the class recalls trade against each other by design: the gate
    # then holds the decision objective (a G-mean falls with any class that collapses)
    # instead of every class's recall.
    # (macro-F1 at the stream's mix falls whenever moved thresholds predict rare classes
    # at all, so with moved decisions the lists, the objectives and the probabilities'
    # log-loss are held: the decision layer stacks and corrects those probabilities.)
    if gate.move_to:
        quality: tuple[str, ...] = ("hit_at_10", objective_metric(gate.objective),
                                    objective_metric(gate.move_to), "neg_log_loss")
    else:
        quality = (*QUALITY_METRICS, objective_metric(gate.objective))
    return decide(current, candidate, () if gate.move_to else gate.classes,
                  recall_tolerance=gate.recall_tolerance,
                  quality_tolerance=gate.quality_tolerance,
                  quality_metrics=tuple(dict.fromkeys(quality)), noise_z=gate.noise_z)


def _select(served: ServedModel, vectors: TextVectors, data: TrainData, *,
            cfg: FineTuneConfig, class_weight: Mapping[str, float], device: torch.device,
            gate: GateConfig, on_step: StepHook | None, selector: PolicySelector,
            policy: Policy, counts: Mapping[str, float]) -> Candidate:
    """Policy selection at one trigger (module docstring): train every planned policy,
    send the best on the held-out objective to the gate, let the selector learn."""
    served_proba: list[np.ndarray] = []
    current = _evaluate(served.model, vectors, data, cfg, gate, keep=served_proba)
    key = objective_metric(gate.objective)
    trials: list[Trial] = []
    best: Candidate | None = None
    for arm in selector.plan(policy.name):
        arm_cfg, arm_policy = arm_config(cfg, arm, policy, selector.synthetic_share)
        weights = (class_weight if arm_policy == policy
                   else class_weights(arm_policy, counts))
        try:
            cand = _train(served, vectors, data, arm_cfg, weights, device, on_step)
        except (NonFiniteLoss, torch.cuda.OutOfMemoryError) as exc:
            if best is None:  # the current policy's own run: the whole run fails, as before
                raise
            # A challenger's failure costs it the trigger (reward −1), not the others.
            trials.append(Trial(arm, 0.0, current.get(key, 0.0),
                                failed=f"{type(exc).__name__}: {exc}"[:200]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        cand.policy = arm
        cand.metrics = _evaluate(cand.model, cand.vectors, data, arm_cfg, gate, cand)
        trials.append(Trial(arm, cand.metrics.get(key, 0.0), current.get(key, 0.0),
                            cand.run.steps, cand.run.seconds, cand.metrics,
                            se=cand.metrics.get(key + "_se", 0.0)))
        if best is None or choose(trials, selector.margin_se) == len(trials) - 1:
            best = cand
        del cand  # a losing candidate goes now: the best and the one training, at most
    assert best is not None
    decision = _decide(current, best.metrics, gate)
    selector.record({t.policy: t.lift for t in trials},
                    best.policy if decision.promote else None)  # failed ones: −1
    return dataclasses.replace(
        best, decision=decision, current=current, trials=trials,
        decisions=fit_decisions(best, data, gate) if decision.promote else None,
        served_decisions=refresh_decisions(served_proba, best, data, gate))


def remember(memory: Sequence[Sample], trained_on: Sequence[Sample], capacity: int,
             rng: random.Random) -> list[Sample]:
    """The replay memory after a promotion: a random quarter of ``capacity`` (at most) of
    what the promoted run trained on is appended, and only the newest ``capacity`` kept
    (experience replay against forgetting; Rolnick et al., NeurIPS 2019).

    >>> s = [Sample(f"e{i}", "u", "i", "click", float(i)) for i in range(10)]
    >>> len(remember([], s, 8, random.Random(0))), len(remember(s, s, 8, random.Random(0)))
    (2, 8)
    """
    if capacity <= 0 or not trained_on:
        return list(memory)[-capacity:] if capacity > 0 else []
    chosen = rng.sample(list(trained_on), min(len(trained_on), max(1, capacity // 4)))
    return (list(memory) + chosen)[-capacity:]
