"""Incremental fine-tuning of the two-tower recommender on buffered samples.

A plain training loop (in the spirit of nanoGPT's ``train.py``): :func:`prepare_data`
splits the buffer into a training pool and a held-out recent window and :class:`FineTuner`
runs a bounded number of steps (or seconds); :mod:`~tailstream.models.training.evaluation`
scores a model on the held-out window for the promotion gate, and
:mod:`~tailstream.models.training.routine` is the one routine that puts them together.

**What a batch is.** ``(1 − r)·B`` samples drawn from the pool (minority FIFO + tail +
majority reservoir) by the configured batch builder (``none``: the pool's own mix,
``oversample`` / ``undersample``: a target mix), plus ``r·B`` drawn uniformly from the
*replay* memory of samples earlier fine-tunes trained on, so a run on new minority data
does not erase what the model knew (experience replay against catastrophic forgetting;
Rolnick et al., "Experience Replay for Continual Learning", NeurIPS 2019).

**Which distribution the loss sees.** The buffer over-keeps rare classes to have enough of
them, which is a storage decision, not a training objective. Each sample of class ``c``
is therefore weighted by ``π_ref(c) / π_batch(c)``, where ``π_batch`` is the expected class
mix of the batches and ``π_ref`` the *stream's* mix (builder ``none``) or the builder's
target mix (re-sampling builders). The outcome loss of the configured policy
(:data:`~tailstream.models.imbalance.policies.LOSS_MAPPING`) then applies its class weights on top:
unweighted cross-entropy learns the stream as it is, class-balanced or focal losses
re-balance it, and re-sampling builders re-balance by drawing.

**Retrieval.** In-batch sampled softmax over the batch's distinct items with logQ
correction, where ``q(i)`` is the exact probability that item ``i`` is drawn into a batch
under the sampling above (:func:`item_sampling_probability`).

**Speed.** On CUDA: bf16 autocast, fused AdamW, pinned host memory, optional
``torch.compile`` of the encoder. With a frozen encoder (the CPU default), text vectors
come from a cache and a step costs only the towers and the head.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from tailstream.configs import FineTuneConfig
from tailstream.contract import TAIL
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.towers.adapters import encoder_trains
from tailstream.models.towers.context import kind_codes, split_context
from tailstream.models.towers.text_vectors import TextVectors, autocast_for
from tailstream.models.towers.two_tower import (
    TextBatch,
    TwoTowerRecommender,
    pack_contexts,
    tokenize,
)
from tailstream.models.training.losses import LossInputs, outcome_loss, sampled_softmax_loss
from tailstream.models.training.sampling import augment_sample, build_batch, synthetic_embeddings


class Forward(NamedTuple):
    """One batch through the towers (:meth:`FineTuner.forward_batch`)."""

    users: torch.Tensor  # [B, d]
    items: torch.Tensor  # [I, d], the distinct items
    cols: torch.Tensor  # [B], each row's item column
    item_ids: list[str]  # the distinct items' ids
    ctx_items: torch.Tensor  # [B, C, d], the context in the item space
    mask: torch.Tensor  # [B, C]
    kinds: torch.Tensor  # [B, C], kind codes
    memory: torch.Tensor | None = None  # [I, d], the distinct items' id memory (or none)


class NonFiniteLoss(RuntimeError):
    """A training step produced a NaN or infinite loss; the run is abandoned."""


# --------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """Samples of one run: the pool to draw from, the held-out window, the replay memory."""

    pool: list[Sample]
    holdout: list[Sample]
    replay: list[Sample]
    stream_mix: dict[str, float]
    """Class shares of the stream (from the imbalance loop's counts): the reference mix."""

    @property
    def window(self) -> dict[str, float]:
        ts = [s.ts for s in self.pool] or [0.0]
        hold = [s.ts for s in self.holdout] or [0.0]
        return {"from_ts": min(ts), "to_ts": max(ts), "holdout_from_ts": min(hold),
                "holdout_to_ts": max(hold)}


def prepare_data(samples: Sequence[Sample], stream_counts: Mapping[str, float],
                 holdout_share: float, replay: Sequence[Sample] = ()) -> TrainData:
    """Split off the newest ``holdout_share`` of each class (by event time) as the held-out
    window, so the gate judges on events the candidate never trained on, and every class
    with at least two samples is represented there.

    Within a class the split is stratified by the buffer's strata: tail-item samples and
    the rest each give their own newest share. The buffer keeps a majority class's tail
    items in a FIFO of recent ones and its other samples in a reservoir over all time, so
    the newest share of the class as a whole would be mostly tail items: the candidate
    would lose the newest of the interactions that teach it the tail, and the window
    (which the decision layer is fitted on) would over-represent them.

    >>> s = [Sample(f"e{i}", "u", f"i{i}", "click" if i % 2 else "cart", float(i))
    ...      for i in range(10)]
    >>> d = prepare_data(s, {"click": 9, "cart": 1}, 0.2)
    >>> sorted(x.event_id for x in d.holdout), len(d.pool), d.stream_mix["cart"]
    (['e8', 'e9'], 8, 0.1)
    """
    by_stratum: dict[tuple[str, bool], list[Sample]] = defaultdict(list)
    seen: set[str] = set()
    for s in samples:
        if s.event_id in seen:  # a sample can sit in two buffer routes (never twice here)
            continue
        seen.add(s.event_id)
        by_stratum[(s.label, s.tier == TAIL)].append(s)
    pool: list[Sample] = []
    holdout: list[Sample] = []
    for group in by_stratum.values():
        group.sort(key=lambda s: (s.ts, s.event_id))
        n_hold = int(round(holdout_share * len(group)))
        if holdout_share > 0 and len(group) >= 2:
            n_hold = min(max(n_hold, 1), len(group) - 1)
        else:
            n_hold = 0
        pool.extend(group[:len(group) - n_hold])
        holdout.extend(group[len(group) - n_hold:])
    total = sum(max(v, 0.0) for v in stream_counts.values())
    mix = ({c: max(v, 0.0) / total for c, v in stream_counts.items()} if total
           else _mix(pool))
    held = {s.event_id for s in holdout}
    return TrainData(pool, holdout, [s for s in replay if s.event_id not in held], mix)


def _mix(samples: Sequence[Sample]) -> dict[str, float]:
    n = len(samples)
    return {c: k / n for c, k in Counter(s.label for s in samples).items()} if n else {}


def target_mix(kind: str, stream_mix: Mapping[str, float], classes: Sequence[str]
               ) -> dict[str, float]:
    """The mix re-sampling builders aim for.

    >>> target_mix("sqrt", {"a": 0.81, "b": 0.09, "c": 0.1}, ["a", "b"])
    {'a': 0.75, 'b': 0.25}
    """
    if kind == "balanced":
        return {c: 1.0 / len(classes) for c in classes}
    if kind == "sqrt":
        raw = {c: math.sqrt(max(stream_mix.get(c, 0.0), 0.0)) for c in classes}
        total = sum(raw.values()) or 1.0
        return {c: v / total for c, v in raw.items()}
    raise ValueError(f"unknown target mix {kind!r} (balanced or sqrt)")


@dataclass(frozen=True)
class SamplingPlan:
    """How batches are drawn, and the two quantities that follow from it."""

    main_mix: dict[str, float]
    """Expected class mix of the builder's part of a batch."""
    reference_mix: dict[str, float]
    """The mix the loss should see (stream, or the builder's target)."""
    batch_mix: dict[str, float]
    """Expected class mix of whole batches (builder part + replay part)."""
    sample_weight: dict[str, float]
    """``π_ref(c) / π_batch(c)``: per-class multiplier; mean 1 over the batch mix."""
    log_q: dict[str, float]
    """``log q(i)``: log probability of item ``i`` being drawn into a batch."""


def sampling_plan(data: TrainData, cfg: FineTuneConfig, classes: Sequence[str]) -> SamplingPlan:
    pool_mix = _mix(data.pool)
    present = [c for c in classes if pool_mix.get(c, 0.0) > 0]
    if cfg.builder == "none":
        main_mix, ref = pool_mix, {c: data.stream_mix.get(c, 0.0) for c in present}
    else:
        main_mix = target_mix(cfg.target_mix, data.stream_mix, present)
        ref = dict(main_mix)
    ref_total = sum(ref.values()) or 1.0
    ref = {c: v / ref_total for c, v in ref.items()}
    r = cfg.replay_share if data.replay else 0.0
    replay_mix = _mix(data.replay)
    batch_mix = {c: (1 - r) * main_mix.get(c, 0.0) + r * replay_mix.get(c, 0.0)
                 for c in set(main_mix) | set(replay_mix)}
    weight = {c: (ref.get(c, 0.0) / p if p > 0 else 0.0) for c, p in batch_mix.items()}
    return SamplingPlan(main_mix, ref, batch_mix, weight,
                        item_sampling_probability(data.pool, main_mix, data.replay, r))


def item_sampling_probability(pool: Sequence[Sample], main_mix: Mapping[str, float],
                              replay: Sequence[Sample], replay_share: float
                              ) -> dict[str, float]:
    """``log q(i)`` with ``q(i) = Σ_{s: item(s) = i} P(s is drawn)`` for one draw, where a
    pool sample of class c is drawn with ``(1 − r) · π_main(c) / n_c`` and a replay sample
    with ``r / |replay|``. This is the exact in-batch sampling distribution the logQ
    correction of Yi et al. (2019) asks for (they estimate it from a stream; here it is
    known).

    >>> pool = [Sample("a", "u", "x", "click", 0.0), Sample("b", "u", "y", "click", 0.0),
    ...         Sample("c", "u", "x", "cart", 0.0)]
    >>> q = item_sampling_probability(pool, {"click": 0.5, "cart": 0.5}, [], 0.0)
    >>> {i: round(math.exp(v), 3) for i, v in sorted(q.items())}
    {'x': 0.75, 'y': 0.25}
    """
    n = Counter(s.label for s in pool)
    q: dict[str, float] = defaultdict(float)
    for s in pool:
        q[s.item_id] += (1 - replay_share) * main_mix.get(s.label, 0.0) / n[s.label]
    if replay:
        for s in replay:
            q[s.item_id] += replay_share / len(replay)
    return {i: math.log(max(v, 1e-12)) for i, v in q.items()}


# --------------------------------------------------------------------------- training
@dataclass
class RunResult:
    steps: int = 0
    seconds: float = 0.0
    pairs: int = 0
    synthetic_pairs: int = 0
    loss: float = 0.0
    loss_first: float = 0.0
    loss_by_class: dict[str, float] = field(default_factory=dict)
    trained_on: list[Sample] = field(default_factory=list)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else 0.0


class FineTuner:
    """Trains one model on one :class:`TrainData` under one :class:`FineTuneConfig`."""

    def __init__(self, model: TwoTowerRecommender, tokenizer: Any, cfg: FineTuneConfig, *,
                 device: torch.device, text_vectors: TextVectors | None,
                 class_weight: Mapping[str, float], max_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.classes = list(model.config.classes)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.text_vectors = text_vectors
        self.max_len = max_len
        self.encoder_trains = encoder_trains(model.encoder)
        if not self.encoder_trains and text_vectors is None:
            raise ValueError("a frozen encoder needs a TextVectors cache")
        self.class_weight = torch.tensor([float(class_weight.get(c, 1.0)) for c in self.classes],
                                         device=device)
        self.rng = random.Random(cfg.seed)
        self.torch_gen = torch.Generator().manual_seed(cfg.seed)
        self.optimizer = self.configure_optimizers()
        self._encode: Callable[..., torch.Tensor] = model.encode_tokens
        if cfg.compile and self.encoder_trains:
            self._encode = torch.compile(model.encode_tokens, dynamic=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; the towers, the id table and the head at ``lr``, the head's linear parts
        (wide, typed matches) at ``wide_lr``, trainable encoder weights at
        ``encoder_lr``; no weight decay on biases and norms. Fused kernels on CUDA."""
        groups: list[dict[str, Any]] = []
        enc = [p for p in self.model.encoder.parameters() if p.requires_grad]
        linear = [*self.model.wide.parameters(), *self.model.typed.parameters()]
        heads = [p for p in self.model.head_parameters()
                 if p.requires_grad and all(p is not q for q in linear)]
        for params, lr in ((heads, self.cfg.lr), (enc, self.cfg.encoder_lr),
                           (linear, self.cfg.wide_lr)):
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            if decay:
                groups.append({"params": decay, "lr": lr, "weight_decay": self.cfg.weight_decay})
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, fused=fused) if fused else torch.optim.AdamW(groups)

    # ------------------------------------------------------------------ batches
    def draw(self, data: TrainData, plan: SamplingPlan) -> list[Sample]:
        cfg = self.cfg
        n_replay = int(round(cfg.replay_share * cfg.batch_size)) if data.replay else 0
        main = build_batch(cfg.builder, data.pool, plan.main_mix, cfg.batch_size - n_replay,
                           self.rng)
        batch = main + (self.rng.choices(data.replay, k=n_replay) if n_replay else [])
        if cfg.augment_share > 0:
            batch = [augment_sample(s, self.rng)
                     if s.label in cfg.minority_classes and self.rng.random() < cfg.augment_share
                     else s for s in batch]
        return batch

    def text_matrix(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled vectors of distinct texts: through the encoder (with gradients) when it
        trains, from the cache otherwise."""
        if not self.encoder_trains:
            assert self.text_vectors is not None
            return self.text_vectors.vectors(texts)
        enc = tokenize(self.tokenizer, texts, self.max_len,
                       fixed_length=self.cfg.pad_to_max_len)
        pin = self.device.type == "cuda"
        ids = (enc["input_ids"].pin_memory() if pin else enc["input_ids"]).to(
            self.device, non_blocking=True)
        mask = (enc["attention_mask"].pin_memory() if pin else enc["attention_mask"]).to(
            self.device, non_blocking=True)
        with autocast_for(self.device, self.cfg.bf16):
            return self._encode(ids, mask).float()

    def forward_batch(self, batch: Sequence[Sample]) -> Forward:
        """User vectors, distinct item vectors, each row's item column, the distinct item
        ids, and each row's context in the item space with its mask and kinds."""
        c = self.model.config.max_context
        contexts = [split_context(s.user_text, c) for s in batch]
        items = list(dict.fromkeys(s.item_id for s in batch))
        item_col = {i: k for k, i in enumerate(items)}
        item_text = {s.item_id: s.item_text or f"item {s.item_id}" for s in batch}
        texts = TextBatch([item_text[i] for i in items] + [t for ctx in contexts for t in ctx])
        vecs = self.text_matrix(texts.texts)
        ctx, mask, kinds, at = pack_contexts(contexts, vecs, texts, c, vecs.shape[1],
                                             self.device,
                                             [kind_codes(s.user_kinds, c) for s in batch])
        with autocast_for(self.device, self.cfg.bf16):
            users = self.model.user_vectors(ctx, mask, kinds)
            ctx_items = self.model.context_items_at(vecs, at)
            item_vecs = self.model.item_vectors(vecs[torch.tensor(
                texts.rows([item_text[i] for i in items]), device=self.device)])
            memory = self.model.item_memory(items)
        cols = torch.tensor([item_col[s.item_id] for s in batch], device=self.device)
        return Forward(users.float(), item_vecs.float(), cols, items, ctx_items.float(), mask,
                       kinds, None if memory is None else memory.float())

    def step(self, batch: Sequence[Sample], plan: SamplingPlan) -> tuple[float, torch.Tensor,
                                                                       torch.Tensor, int]:
        """One optimisation step; returns the loss, per-sample outcome losses, targets and
        the number of synthetic (SMOTE / ADASYN) pairs used."""
        cfg = self.cfg
        # Set once, not at every step: each switch walks the encoder's ~250 modules twice.
        if not self.model.training or self.model.encoder.training != self.encoder_trains:
            self.model.train()
            if not self.encoder_trains:
                # A frozen encoder feeds the text-vector cache (shared with the served
                # model): with dropout on, a vector would depend on when its text was
                # first encoded.
                self.model.encoder.eval()
        users, items, cols, item_ids, ctx_items, mask, kinds, memory = self.forward_batch(batch)
        target = torch.tensor([self.class_index[s.label] for s in batch], device=self.device)
        weights = torch.tensor([plan.sample_weight.get(s.label, 0.0) for s in batch],
                               device=self.device)
        counts = self.model.count_rows([s.features for s in batch], self.device)
        f = self.model.config.wide_features
        known = [i for i, s in enumerate(batch) if len(s.features) == f]
        if known:
            self.model.observe_counts(counts[known])
        features = self.model.pair_features(users, items[cols], ctx_items, mask, counts, kinds)
        logits = self.model.head(features)
        n_syn = 0
        if cfg.smote_share > 0:
            logits, target, weights, n_syn = self._with_smote(features, logits, target, weights)
        prior = torch.tensor([max(plan.reference_mix.get(c, 0.0), 1e-6) for c in self.classes],
                             device=self.device).log()
        inputs = LossInputs(self.class_weight, weights, prior, cfg.gamma, cfg.tau)
        loss = outcome_loss(cfg.policy, logits, target, inputs)
        if cfg.retrieval_weight > 0 and len(item_ids) > 1:
            log_q = torch.tensor([plan.log_q.get(i, math.log(1e-6)) for i in item_ids],
                                 device=self.device)
            scores = self.model.retrieval_scores(users, items, memory)
            loss = loss + cfg.retrieval_weight * sampled_softmax_loss(scores, cols, log_q)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            per_class = torch.nn.functional.cross_entropy(logits.detach().float(), target,
                                                          reduction="none")
        return float(loss.item()), per_class, target, n_syn

    def _with_smote(self, features: torch.Tensor, logits: torch.Tensor,
                    target: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Append synthetic pairs (``cfg.sampler``: SMOTE or ADASYN, imbalanced-learn's):
        interpolate the head's input features (user, item and their interaction; never
        text) within each minority class, run the head on them, give them their class's
        sample weight."""
        labels = [self.classes[int(t)] for t in target]
        n_new = int(round(self.cfg.smote_share * len(labels)))
        new, new_labels = synthetic_embeddings(features, labels, set(self.cfg.minority_classes),
                                               n_new, rng=self.rng, sampler=self.cfg.sampler)
        if not new_labels:
            return logits, target, weights, 0
        syn_logits = self.model.head(new)
        syn_target = torch.tensor([self.class_index[c] for c in new_labels], device=self.device)
        by_class = {self.classes[int(t)]: float(w) for t, w in zip(target, weights, strict=True)}
        syn_w = torch.tensor([by_class.get(c, 1.0) for c in new_labels], device=self.device)
        return (torch.cat([logits, syn_logits]), torch.cat([target, syn_target]),
                torch.cat([weights, syn_w]), len(new_labels))

    def train(self, data: TrainData, on_step: Callable[[int, float], None] | None = None
              ) -> RunResult:
        """Run until ``max_steps`` or ``max_seconds``; raises :class:`NonFiniteLoss`."""
        cfg = self.cfg
        result = RunResult()
        if not data.pool:
            return result
        plan = sampling_plan(data, cfg, self.classes)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        used: dict[str, Sample] = {}
        started = time.perf_counter()
        losses: list[float] = []
        for step in range(cfg.max_steps):
            if time.perf_counter() - started >= cfg.max_seconds:
                break
            batch = self.draw(data, plan)
            if not batch:
                break
            loss, per_sample, target, n_syn = self.step(batch, plan)
            losses.append(loss)
            result.pairs += len(batch)
            result.synthetic_pairs += n_syn
            for t, value in zip(target.tolist(), per_sample.tolist(), strict=True):
                c = self.classes[t]
                sums[c] += value
                counts[c] += 1
            for s in batch:
                used.setdefault(s.event_id, s)
            if on_step is not None:
                on_step(step, loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.seconds = time.perf_counter() - started
        result.steps = len(losses)
        result.loss = float(np.mean(losses[-10:])) if losses else 0.0
        result.loss_first = losses[0] if losses else 0.0
        result.loss_by_class = {c: sums[c] / counts[c] for c in counts}
        result.trained_on = list(used.values())
        return result
