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
   candidate on the held-out window and asks the gate
   (:func:`~tailstream.models.training.gate.decide`); without one (a fixed strategy of
   the evaluation, which serves every candidate by definition) the candidate is adopted.

What a promoted run leaves behind for replay is chosen by :func:`remember`, also shared.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tailstream.configs import FineTuneConfig, GateConfig
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.towers.adapters import configure_trainable
from tailstream.models.towers.encoder import encoder_config
from tailstream.models.towers.loading import ServedModel, resolve_finetune_layers
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.towers.two_tower import TwoTowerRecommender
from tailstream.models.training.evaluation import evaluate
from tailstream.models.training.finetune import FineTuner, RunResult, TrainData
from tailstream.models.training.gate import GateDecision, decide

ADOPTED = GateDecision(True, "adopted: a fixed strategy serves every candidate", {}, "fixed")
"""The decision when no gate is asked (the evaluation's fixed strategies)."""


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


def fine_tune(served: ServedModel, vectors: TextVectors, data: TrainData, *,
              cfg: FineTuneConfig, class_weight: Mapping[str, float], device: torch.device,
              gate: GateConfig | None,
              on_step: Callable[[int, float], None] | None = None) -> Candidate:
    """Train a candidate from ``served`` on ``data`` and decide on it (see the module
    docstring). ``on_step(step, loss)`` is called after every step (the benchmark times
    steps with it). Raises :class:`~tailstream.models.training.finetune.NonFiniteLoss` when
    a step's loss is not finite; the served model is never modified."""
    layers = resolve_finetune_layers(cfg.layers, device,
                                     encoder_config(served.model.encoder, "num_hidden_layers"))
    # A frozen encoder is shared with the served model (and so are its cached text
    # vectors); otherwise the candidate gets its own copy to train.
    memo = {id(served.model.encoder): served.model.encoder} if layers == 0 else {}
    candidate = copy.deepcopy(served.model, memo)
    for p in candidate.head_parameters():
        p.requires_grad_(True)
    configure_trainable(candidate.encoder, layers, cfg.lora_rank)
    tuner = FineTuner(candidate, served.tokenizer, cfg, device=device,
                      text_vectors=vectors if layers == 0 else None,
                      class_weight=class_weight, max_len=served.model.config.max_len)
    run = tuner.train(data, on_step)
    candidate.eval()
    cand_vectors = vectors if layers == 0 else TextVectors(
        candidate, served.tokenizer, device=device, max_len=served.model.config.max_len,
        fingerprint="candidate", cache_size=len(data.holdout) * 8 + 1024)
    if gate is None:
        return Candidate(candidate, run, layers, cand_vectors, ADOPTED)
    minority = list(cfg.minority_classes)
    cand_metrics = evaluate(candidate, cand_vectors.vectors, data.holdout, data.stream_mix,
                            minority_classes=minority)
    cur_metrics = evaluate(served.model, vectors.vectors, data.holdout, data.stream_mix,
                           minority_classes=minority)
    decision = decide(cur_metrics, cand_metrics, gate.classes,
                      recall_tolerance=gate.recall_tolerance,
                      quality_tolerance=gate.quality_tolerance)
    return Candidate(candidate, run, layers, cand_vectors, decision, cur_metrics, cand_metrics)


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
