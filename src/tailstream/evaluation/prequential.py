"""``tailstream eval``: prequential (test-then-train) comparison of imbalance strategies.

The event log is replayed in time order through the same per-event state as the worker
(:class:`~tailstream.streams.worker.state.StreamState`: profiles, contexts, popularity tiers,
the imbalance loop and its minority buffer), once. The stream is cut into ``blocks`` of
equal numbers of interactions. Every strategy then walks the blocks: it first **predicts**
every interaction of block *b* with the model it has so far, then **learns** from what
the buffer held at the end of block *b* (Dawid 1984; Gama et al., Machine Learning 2013).
All strategies see the same data in the same order with the same seeds.

Strategies:

* ``popularity``: outcome = the class prior so far; lists = the most popular items.
* ``river``: the imbalance loop's river fast path (prequential, weighted by the live
  class weights) for outcomes; lists from the category-affinity × popularity baseline.
* transformer strategies, all from the same pretrained encoder and seeds, fine-tuned after
  each block on that block's buffer: ``ce`` (unweighted cross-entropy), ``inverse``,
  ``class_balanced`` (β), ``focal`` (class-balanced α and γ), ``logit_adjusted`` (τ),
  ``oversample`` / ``undersample`` (builders, unweighted loss), ``smote`` (SMOTE pairs in
  embedding space, unweighted loss), ``importance`` (p(y|x)/p(y) sample weights);
* ``adaptive``: the full loop as it runs in production: fine-tunes only when the loop's
  triggers fired (buffer growth, drift, interval), with the loop's live weights and
  policy, replay memory, and the promotion gate deciding whether the candidate replaces
  the model.

Metrics: per-class precision/recall/F1, macro-F1, minority macro-recall, PR-AUC of
p(purchase) and p(cart) on every interaction; HitRate@K / NDCG@K / MRR@20 of the
interacted item in the list the strategy would have published (every ``rank_every``-th
interaction), split by the item's head/torso/tail tier; catalogue coverage, tail share of
exposure and the Gini coefficient of exposure over those lists; seconds per event.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tailstream.contract import Limits, validate_event, validate_item
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.policies import Policy, class_weights
from tailstream.models.serving.baseline import new_profile, recommend
from tailstream.models.serving.scorer import Scorer, UserRequest, context_entries
from tailstream.models.towers.adapters import configure_trainable
from tailstream.models.towers.encoder import load_encoder, write_tiny_encoder
from tailstream.models.towers.loading import ServedModel, build_model
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.models.towers.two_tower import CLASSES, TowerConfig
from tailstream.models.training.finetune import FineTuneConfig, FineTuner, evaluate, prepare_data
from tailstream.models.training.gate import decide
from tailstream.models.training.metrics import (
    average_precision,
    classification_report,
    coverage,
    gini,
    lorenz_curve,
    macro_recall,
    rank_metrics,
)
from tailstream.producers.records import ProducedRecord
from tailstream.settings import Settings
from tailstream.streams.worker.scoring import ranking_config
from tailstream.streams.worker.state import StreamState

log = logging.getLogger(__name__)

MINORITY = ("cart", "fav", "purchase")


@dataclass(frozen=True)
class StrategySpec:
    kind: str  # popularity | river | transformer
    policy: str = "none"
    builder: str = "none"
    smote_share: float = 0.0
    adaptive: bool = False


STRATEGIES: dict[str, StrategySpec] = {
    "popularity": StrategySpec("popularity"),
    "river": StrategySpec("river"),
    "ce": StrategySpec("transformer", "none"),
    "inverse": StrategySpec("transformer", "inverse"),
    "class_balanced": StrategySpec("transformer", "class_balanced"),
    "focal": StrategySpec("transformer", "focal"),
    "logit_adjusted": StrategySpec("transformer", "logit_adjusted"),
    "oversample": StrategySpec("transformer", "none", builder="oversample"),
    "undersample": StrategySpec("transformer", "none", builder="undersample"),
    "smote": StrategySpec("transformer", "none", smote_share=0.25),
    "importance": StrategySpec("transformer", "importance"),
    "adaptive": StrategySpec("transformer", adaptive=True),
}


# --------------------------------------------------------------------------- the stream
@dataclass
class Interaction:
    sample: Sample
    block: int
    tier: str
    category: str | None
    online: dict[str, float] | None  # the river fast path's prediction before learning
    baseline_list: list[str] | None  # the baseline recommender's list (ranked events)
    profile: dict[str, Any] | None  # the profile before the event (ranked events)
    ranked: bool


@dataclass
class BlockState:
    """The loop's state at the end of a block: what strategies train on."""

    buffer: list[Sample]
    decayed_counts: dict[str, float]
    weights: dict[str, float]
    shares: dict[str, float]
    tiers: dict[str, str]
    item_counts: dict[str, float]
    requests: list[dict[str, Any]]


@dataclass
class Stream:
    interactions: list[Interaction]
    blocks: list[BlockState]
    item_text: dict[str, str]
    categories: dict[str, str | None]
    items_by_block: list[list[str]]  # items first seen in each block (catalogue growth)
    catalogue: list[str]  # catalogue records known before the first event

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


def collect(records: Iterable[ProducedRecord], settings: Settings, *, blocks: int,
            rank_every: int, max_events: int | None = None,
            progress: Callable[[int], None] | None = None) -> Stream:
    """Replay ``records`` through the worker's state once; cut into ``blocks``."""
    limits = Limits(max_event_bytes=settings.max_event_bytes,
                             max_envelope_bytes=settings.max_envelope_bytes,
                             max_envelope_events=settings.max_envelope_events,
                    max_string_chars=settings.max_string_chars,
                    max_future_skew_s=float("inf"))
    events: list[Any] = []
    items: list[Any] = []
    for rec in records:
        if rec.malformed:
            continue
        value = json.loads(rec.value)
        if rec.kind == "item":
            items.append((len(events), validate_item(value, limits)))
            continue
        events.append(validate_event(rec.kind, value, limits))
        if max_events is not None and len(events) >= max_events:
            break
    # Every event gets a fast-path prediction (the worker subsamples clicks to save CPU).
    settings = settings.replace(online_majority_rate=1.0)
    n_inter = sum(e.kind != "search" for e in events)
    per_block = max(1, math.ceil(n_inter / blocks))

    clock = {"now": 0.0}
    profiles: dict[str, Any] = {}
    state = StreamState(settings, profiles)
    state.imbalance.clock = lambda: clock["now"]  # cooldowns in event time: replays agree
    item_iter = iter(items)
    pending = next(item_iter, None)
    catalogue: list[str] = []
    interactions: list[Interaction] = []
    out_blocks: list[BlockState] = []
    seen: set[str] = set()
    items_by_block: list[list[str]] = [[]]
    requests: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    k = 0
    for i, event in enumerate(events):
        while pending is not None and pending[0] <= i:
            state.apply_item(pending[1])
            if not interactions:
                catalogue.append(pending[1].item_id)
            pending = next(item_iter, None)
        clock["now"] = event.ts
        block = min(k // per_block, blocks - 1)
        before = profiles.get(event.user_id) or new_profile()
        # Lists leave out what the user just interacted with, so repeat interactions are
        # not ranking targets (they are counted, not scored).
        repeat = event.item_id in before.get("items", [])[:5]
        ranked = event.kind != "search" and k % rank_every == 0 and not repeat
        base_list = None
        if ranked:
            base_list = [r.item_id for r in recommend(before, state.popularity,
                                                     k=settings.recs_k,
                                                     tail_share=settings.tail_share)]
        tier = state.imbalance.tiers.get(event.item_id or "", "tail")
        sample = state.apply_event(event, partition=0)
        if sample is not None:
            if sample.item_id not in seen:
                seen.add(sample.item_id)
                items_by_block[-1].append(sample.item_id)
            counts[sample.item_id] += 1
            interactions.append(Interaction(
                sample, block, tier, state.popularity.category(sample.item_id),
                state.imbalance.last_proba, base_list, before if ranked else None, ranked))
            k += 1
            if progress is not None:
                progress(1)
        if i % settings.batch_size == settings.batch_size - 1:
            state.popularity.refresh(event.ts)
            request = state.imbalance.end_batch()
            if request is not None:
                requests.append(request)
        if sample is not None and k % per_block == 0 and len(out_blocks) < blocks:
            out_blocks.append(_close_block(state, counts, requests))
            requests = []
            items_by_block.append([])
    if k % per_block and len(out_blocks) < blocks:
        out_blocks.append(_close_block(state, counts, requests))
    return Stream(interactions, out_blocks, dict(state.item_text),
                  {i: state.popularity.category(i) for i in state.item_text},
                  items_by_block[:len(out_blocks)], catalogue)


def _close_block(state: StreamState, counts: Counter[str],
                 requests: list[dict[str, Any]]) -> BlockState:
    request = state.imbalance.end_batch()
    if request is not None:
        requests.append(request)
    loop = state.imbalance
    return BlockState(buffer=loop.buffer.all(), decayed_counts=loop.decayed_counts(),
                      weights=dict(loop.weights), shares=loop.shares, tiers=dict(loop.tiers),
                      item_counts=dict(counts), requests=list(requests))


# --------------------------------------------------------------------------- results
@dataclass
class StrategyResult:
    name: str
    y_true: list[str] = field(default_factory=list)
    y_pred: list[str] = field(default_factory=list)
    p_purchase: list[float] = field(default_factory=list)
    p_cart: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)  # 0: not in the list
    rank_tiers: list[str] = field(default_factory=list)
    exposure: Counter[str] = field(default_factory=Counter)
    exposure_tiers: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    finetunes: int = 0
    promotions: int = 0
    weights_over_time: list[dict[str, float]] = field(default_factory=list)
    gate: list[dict[str, Any]] = field(default_factory=list)
    """The promotion gate's decisions (``adaptive``): block, triggers, promote, reason."""

    def add_list(self, items: Sequence[str], tiers: Sequence[str], target: str,
                 target_tier: str) -> None:
        rank = items.index(target) + 1 if target in items else 0
        self.ranks.append(rank)
        self.rank_tiers.append(target_tier)
        self.exposure.update(items)
        self.exposure_tiers.update(tiers)

    def metrics(self, catalogue_size: int, events: int) -> dict[str, Any]:
        report = classification_report(self.y_true, self.y_pred, CLASSES)
        out: dict[str, Any] = {k: round(v, 6) for k, v in report.items()
                               if not k.startswith("support")}
        out["minority_macro_recall"] = round(macro_recall(report, MINORITY), 6)
        out["purchase_pr_auc"] = round(average_precision(
            [y == "purchase" for y in self.y_true], self.p_purchase), 6)
        out["cart_pr_auc"] = round(average_precision(
            [y == "cart" for y in self.y_true], self.p_cart), 6)
        ranked = rank_metrics(self.ranks, (10, 20))
        out.update({k: round(v, 6) for k, v in ranked.items()})
        out["ranked"] = len(self.ranks)
        for tier in ("head", "torso", "tail"):
            sel = [r for r, t in zip(self.ranks, self.rank_tiers, strict=True) if t == tier]
            sub = rank_metrics(sel, (10, 20))
            out.update({f"{k}_{tier}": round(v, 6) for k, v in sub.items()})
            out[f"ranked_{tier}"] = len(sel)
        shown = sum(self.exposure_tiers.values())
        out["coverage"] = round(coverage(self.exposure, catalogue_size), 6)
        out["tail_exposure_share"] = round(self.exposure_tiers.get("tail", 0) / shown, 6) \
            if shown else 0.0
        counts = list(self.exposure.values()) + [0] * max(0, catalogue_size - len(self.exposure))
        out["exposure_gini"] = round(gini(counts), 6)
        out["ms_per_event"] = round(1000 * self.seconds / max(events, 1), 4)
        out["finetunes"] = self.finetunes
        out["promotions"] = self.promotions
        return out

    def recall_by_block(self, n_blocks: int) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {c: [] for c in CLASSES}
        for b in range(n_blocks):
            idx = [i for i, x in enumerate(self.blocks) if x == b]
            rep = classification_report([self.y_true[i] for i in idx],
                                        [self.y_pred[i] for i in idx], CLASSES)
            for c in CLASSES:
                out[c].append(rep[f"recall_{c}"])
        return out


# --------------------------------------------------------------------------- runners
@dataclass
class EvalConfig:
    strategies: Sequence[str] = tuple(STRATEGIES)
    blocks: int = 12
    rank_every: int = 5
    steps: int = 150
    batch_size: int = 256
    tiny: bool = False
    seed: int = 0
    warm_blocks: int = 1
    """Blocks before the first prediction counts (models have seen nothing yet)."""


class Harness:
    def __init__(self, stream: Stream, settings: Settings, cfg: EvalConfig,
                 work_dir: Path) -> None:
        self.stream = stream
        self.settings = settings
        self.cfg = cfg
        self.device = torch.device("cpu")
        self.encoder_path: Path | None = None
        if cfg.tiny:
            self.encoder_path = write_tiny_encoder(work_dir / "tiny-encoder", hidden_size=64,
                                                   layers=2, heads=4)
        elif settings.encoder_path:
            self.encoder_path = Path(settings.encoder_path)
        self.tower = TowerConfig(embed_dim=settings.embed_dim,
                                 max_context=settings.max_context,
                                 max_len=settings.text_max_len, seed=cfg.seed)
        self._base: ServedModel | None = None
        self._vectors: TextVectors | None = None

    # ------------------------------------------------------------------ shared encoder
    def base(self) -> tuple[ServedModel, TextVectors]:
        if self._base is None:
            enc = load_encoder(self.encoder_path)
            model = build_model(enc, self.tower)
            configure_trainable(model.encoder, 0)
            model.eval()
            self._base = ServedModel("base", model, enc.tokenizer, enc.fingerprint,
                                     {"version": "base"})
            self._vectors = TextVectors(model, enc.tokenizer, device=self.device,
                                        max_len=self.tower.max_len,
                                        fingerprint=enc.fingerprint, cache_size=10**7,
                                        chunk=128)
        assert self._vectors is not None
        return self._base, self._vectors

    def encode_all(self, progress: Callable[[int], None] | None = None) -> None:
        """Encode every item text and context text once (the encoder is frozen: every
        transformer strategy reuses the vectors)."""
        _, vectors = self.base()
        texts = set(self.stream.item_text.values())
        for it in self.stream.interactions:
            texts.update(t for t in it.sample.user_text.split(" ; ") if t)
        todo = sorted(texts)
        for start in range(0, len(todo), 512):
            part = todo[start:start + 512]
            vectors.vectors(part)
            if progress is not None:
                progress(len(part))

    # ------------------------------------------------------------------ strategies
    def run(self, name: str) -> StrategyResult:
        spec = STRATEGIES[name]
        started = time.perf_counter()
        if spec.kind == "popularity":
            result = self._popularity(name)
        elif spec.kind == "river":
            result = self._river(name)
        else:
            result = self._transformer(name, spec)
        result.seconds = time.perf_counter() - started
        return result

    def _counted(self, it: Interaction) -> bool:
        return it.block >= self.cfg.warm_blocks

    def _popularity(self, name: str) -> StrategyResult:
        res = StrategyResult(name)
        counts: Counter[str] = Counter()
        prior: Counter[str] = Counter()
        top: list[str] = []
        current = -1
        for it in self.stream.interactions:
            if it.block != current:  # the popular list is refreshed per block
                current = it.block
                top = [i for i, _ in counts.most_common(self.settings.recs_k)]
            if self._counted(it):
                total = sum(prior.values()) or 1
                res.y_true.append(it.sample.label)
                res.y_pred.append(max(CLASSES, key=lambda c: prior.get(c, 0)))
                res.p_purchase.append(prior.get("purchase", 0) / total)
                res.p_cart.append(prior.get("cart", 0) / total)
                res.blocks.append(it.block)
                if it.ranked:
                    tiers = self._tiers_at(it.block)
                    res.add_list(top, [tiers.get(i, "tail") for i in top], it.sample.item_id,
                                 it.tier)
            counts[it.sample.item_id] += 1
            prior[it.sample.label] += 1
        return res

    def _river(self, name: str) -> StrategyResult:
        res = StrategyResult(name)
        for it in self.stream.interactions:
            if not self._counted(it):
                continue
            proba = it.online or {c: 1.0 / len(CLASSES) for c in CLASSES}
            res.y_true.append(it.sample.label)
            res.y_pred.append(max(CLASSES, key=lambda c: proba.get(c, 0.0)))
            res.p_purchase.append(proba.get("purchase", 0.0))
            res.p_cart.append(proba.get("cart", 0.0))
            res.blocks.append(it.block)
            if it.ranked and it.baseline_list is not None:
                tiers = self._tiers_at(it.block)
                res.add_list(it.baseline_list, [tiers.get(i, "tail") for i in it.baseline_list],
                             it.sample.item_id, it.tier)
        return res

    def _tiers_at(self, block: int) -> dict[str, str]:
        return self.stream.blocks[max(block - 1, 0)].tiers if block else {}

    def _transformer(self, name: str, spec: StrategySpec) -> StrategyResult:
        base, vectors = self.base()
        res = StrategyResult(name)
        memo = {id(base.model.encoder): base.model.encoder}
        model = copy.deepcopy(base.model, memo)
        served = ServedModel(name, model, base.tokenizer, base.text_fingerprint, {})
        scorer = Scorer(served, device=self.device, max_len=self.tower.max_len,
                        cache_size=10**7, ranking=ranking_config(self.settings))
        scorer.texts = vectors  # the frozen encoder's vectors are shared by every strategy
        replay: list[Sample] = []
        rng = random.Random(self.cfg.seed)
        s = self.settings
        by_block: dict[int, list[Interaction]] = {}
        for it in self.stream.interactions:
            by_block.setdefault(it.block, []).append(it)
        self._index(scorer, self.stream.catalogue)
        for b in range(self.stream.n_blocks):
            block = by_block.get(b, [])
            self._index(scorer, self.stream.items_by_block[b])
            if b >= self.cfg.warm_blocks:
                self._predict(scorer, block, res, b)
            if b == self.stream.n_blocks - 1:
                break  # nothing left to predict: a fine-tune here could never be scored
            # Learn from the buffer as it stood at the end of the block.
            state = self.stream.blocks[b]
            if spec.adaptive and not state.requests:
                res.weights_over_time.append(dict(state.weights))
                continue
            policy_name = s.weight_policy if spec.adaptive else spec.policy
            counts = state.decayed_counts
            weights = (state.weights if spec.adaptive else class_weights(
                Policy(policy_name, beta=s.weight_beta, gamma=s.weight_gamma, tau=s.weight_tau,
                       min_weight=s.weight_min, max_weight=s.weight_max), counts))
            res.weights_over_time.append(weights)
            cfg = FineTuneConfig(policy=policy_name, gamma=s.weight_gamma, tau=s.weight_tau,
                                 builder=spec.builder, batch_size=self.cfg.batch_size,
                                 max_steps=self.cfg.steps, max_seconds=1e9, lr=s.finetune_lr,
                                 replay_share=s.finetune_replay_share,
                                 holdout_share=s.finetune_holdout_share if spec.adaptive else 0,
                                 smote_share=spec.smote_share, seed=self.cfg.seed + b)
            data = prepare_data(state.buffer, counts, cfg.holdout_share, replay)
            candidate = copy.deepcopy(model, memo)
            for p in candidate.head_parameters():
                p.requires_grad_(True)
            tuner = FineTuner(candidate, base.tokenizer, cfg, device=self.device,
                              text_vectors=vectors, class_weight=weights,
                              max_len=self.tower.max_len)
            run = tuner.train(data)
            res.finetunes += 1
            promote = True
            if spec.adaptive:
                cur = evaluate(model, vectors.vectors, data.holdout, data.stream_mix)
                cand = evaluate(candidate, vectors.vectors, data.holdout, data.stream_mix)
                decision = decide(cur, cand, s.gated_classes,
                                  recall_tolerance=s.gate_recall_tolerance,
                                  quality_tolerance=s.gate_quality_tolerance)
                promote = decision.promote
                res.gate.append({"block": b, "promote": promote, "reason": decision.reason,
                                 "triggers": sorted({str(r.get("reason"))
                                                     for r in state.requests})})
            if promote:
                for p in candidate.parameters():
                    p.requires_grad_(False)
                candidate.eval()
                model = candidate
                scorer.swap_model(ServedModel(name, model, base.tokenizer,
                                              base.text_fingerprint, {}))
                res.promotions += 1
                if run.trained_on:
                    replay = (replay + rng.sample(run.trained_on, min(len(run.trained_on),
                                                                      2000)))[-20_000:]
        return res

    def _index(self, scorer: Scorer, items: Sequence[str]) -> None:
        ids = [i for i in items if i not in scorer.index]
        for start in range(0, len(ids), 4096):
            part = ids[start:start + 4096]
            scorer.add_items(part, [self.stream.item_text.get(i, f"item {i}") for i in part])

    @torch.inference_mode()
    def _predict(self, scorer: Scorer, block: Sequence[Interaction], res: StrategyResult,
                 b: int) -> None:
        model = scorer.served.model
        samples = [it.sample for it in block]
        for start in range(0, len(samples), 1024):
            chunk = samples[start:start + 1024]
            probs = _outcome_probs(model, scorer, chunk)
            for s, p in zip(chunk, probs, strict=True):
                res.y_true.append(s.label)
                res.y_pred.append(CLASSES[int(p.argmax())])
                res.p_purchase.append(float(p[CLASSES.index("purchase")]))
                res.p_cart.append(float(p[CLASSES.index("cart")]))
                res.blocks.append(b)
        ranked = [it for it in block if it.ranked and it.profile is not None]
        tiers = self._tiers_at(b)
        counts = self.stream.blocks[max(b - 1, 0)].item_counts
        total = sum(counts.values()) or 1.0

        n_items = len(scorer.index)

        def item_info(ids: Sequence[str]) -> tuple[list[str], list[str | None], list[float]]:
            return ([tiers.get(i, "tail") for i in ids],
                    [self.stream.categories.get(i) for i in ids],
                    [math.log((counts.get(i, 0.0) + 1.0) / (total + n_items)) for i in ids])

        for start in range(0, len(ranked), 256):
            part = ranked[start:start + 256]
            requests = [UserRequest(it.sample.user_id,
                                    context_entries(it.profile or {}, self.stream.item_text,
                                                    self.settings.max_context),
                                    set((it.profile or {}).get("items", [])[:5]))
                        for it in part]
            lists = scorer.recommend(requests, item_info)
            for it, lst in zip(part, lists, strict=True):
                res.add_list([r.item_id for r in lst], [r.tier for r in lst],
                             it.sample.item_id, it.tier)


def _outcome_probs(model: Any, scorer: Scorer, samples: Sequence[Sample]) -> np.ndarray:
    from tailstream.models.towers.two_tower import TextBatch, pack_contexts, split_context

    c = model.config.max_context
    contexts = [split_context(s.user_text, c) for s in samples]
    flat = TextBatch([t for ctx in contexts for t in ctx] + [s.item_text for s in samples])
    vecs = scorer.texts.vectors(flat.texts)
    ctx, mask = pack_contexts(contexts, vecs, flat, c, vecs.shape[1], scorer.device)
    users = model.user_vectors(ctx, mask)
    items = model.item_vectors(vecs[torch.tensor(flat.rows([s.item_text for s in samples]))])
    logits = model.outcome_logits(users, items, model.context_items(ctx), mask)
    return torch.softmax(logits, dim=-1).cpu().numpy()


# --------------------------------------------------------------------------- the report
def summarise(stream: Stream, results: dict[str, StrategyResult], dataset: str,
              cfg: EvalConfig, extra: dict[str, Any]) -> dict[str, Any]:
    catalogue = len(stream.item_text)
    events = len(stream.interactions)
    return {
        "dataset": dataset,
        "events": events,
        "catalogue_items": catalogue,
        "blocks": stream.n_blocks,
        "config": {"strategies": list(cfg.strategies), "blocks": cfg.blocks,
                   "rank_every": cfg.rank_every, "steps_per_finetune": cfg.steps,
                   "batch_size": cfg.batch_size, "tiny_encoder": cfg.tiny, "seed": cfg.seed,
                   "warm_blocks": cfg.warm_blocks, **extra},
        "class_shares": {c: round(v, 6) for c, v in
                         _shares(Counter(it.sample.label for it in stream.interactions)).items()},
        "strategies": {n: r.metrics(catalogue, events) for n, r in results.items()},
        "gate": {n: r.gate for n, r in results.items() if r.gate},
        "over_time": {
            "class_shares": [b.shares for b in stream.blocks],
            "loop_weights": [b.weights for b in stream.blocks],
            "recall_by_block": {n: r.recall_by_block(stream.n_blocks)
                                for n, r in results.items()},
            "lorenz": {n: thin_curve(*lorenz_curve(list(r.exposure.values())
                                                   + [0] * max(0, catalogue - len(r.exposure))))
                       for n, r in results.items()},
        },
    }


def thin_curve(x: Sequence[float], y: Sequence[float],
               points: int = 201) -> tuple[list[float], list[float]]:
    """At most ``points`` points of a curve, first and last kept (a Lorenz curve over a
    75k-item catalogue would otherwise put 150k numbers per strategy into eval.json).

    >>> thin_curve([0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.1, 0.2, 0.5, 1.0], points=3)
    ([0.0, 0.5, 1.0], [0.0, 0.2, 1.0])
    """
    if len(x) <= points:
        return [round(v, 6) for v in x], [round(v, 6) for v in y]
    idx = sorted({int(round(v)) for v in np.linspace(0, len(x) - 1, points)})
    return [round(x[i], 6) for i in idx], [round(y[i], 6) for i in idx]


def _shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values()) or 1
    return {c: counts.get(c, 0) / total for c in CLASSES}
