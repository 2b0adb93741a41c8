"""One transformer strategy of ``tailstream eval``: predict a block, then learn from the
buffer at its end — through the trainer's own routine
(:func:`~tailstream.models.training.routine.fine_tune`), so the evaluation runs the code
production runs.

Every item that ever becomes known is indexed once, in the order it became known
(:attr:`~tailstream.evaluation.stream.Stream.known_ids`), and each list may retrieve only
the rows known when its interaction happened (``Scorer.recommend(known=...)``): the
leak-free protocol. Per block *b*: every interaction of *b* is predicted (outcome
probabilities; lists for the ranked ones, scored with the production
:class:`~tailstream.models.serving.scorer.Scorer`), then — unless *b* is the last block —
a fine-tune on the block's buffer:

* fixed strategies train every block with their own policy (the loop's counts, their
  weights) and serve every candidate;
* ``adaptive`` trains only when the loop's triggers fired, with the policy and weights the
  loop published (:attr:`~tailstream.evaluation.stream.BlockState.live`), holds out the
  newest share of each class, and serves a candidate only if the gate promotes it — what
  the trainer does with a training request.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from tailstream import configs
from tailstream.configs import FineTuneConfig
from tailstream.contract import CLASSES
from tailstream.evaluation.hybrid_walk import HybridWalk
from tailstream.evaluation.results import StrategyResult
from tailstream.evaluation.specs import parse_variant
from tailstream.evaluation.stream import BlockState, Interaction
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.decisions import RunningPrior
from tailstream.models.imbalance.policies import class_weights
from tailstream.models.serving.scorer import ItemInfo, Scorer
from tailstream.models.towers.context import (
    UserRequest,
    context_entries,
    kind_codes,
    split_context,
)
from tailstream.models.towers.loading import ServedModel
from tailstream.models.towers.two_tower import TextBatch, pack_contexts
from tailstream.models.training.finetune import prepare_data
from tailstream.models.training.routine import Candidate, fine_tune, remember
from tailstream.models.training.selection import PolicySelector
from tailstream.streams.stores.buffer_store import LiveWeights

if TYPE_CHECKING:
    from tailstream.evaluation.specs import StrategySpec
    from tailstream.evaluation.strategies import Harness


class TransformerStrategy:
    def __init__(self, harness: Harness, name: str, spec: StrategySpec) -> None:
        self.h = harness
        self.name = name
        self.spec = spec
        # A variant (``adaptive[tail_share=0]``) runs with its overrides; nothing else does.
        self.settings = harness.settings.replace(**parse_variant(name)[1])
        base, self.vectors = harness.base()
        self.base = base
        # A copy of the base whose frozen encoder (and its cached vectors) is shared.
        model = copy.deepcopy(base.model, {id(base.model.encoder): base.model.encoder})
        self.served = ServedModel(name, model, base.tokenizer, base.text_fingerprint, {})
        self.scorer = Scorer(self.served, device=harness.device, max_len=harness.tower.max_len,
                             cache_size=10**7, ranking=configs.ranking_config(self.settings))
        self.scorer.texts = self.vectors  # the frozen encoder's vectors, shared
        self.replay: list[Sample] = []
        self.rng = random.Random(harness.cfg.seed)
        self.walk = HybridWalk(harness) if self.scorer.ranking.mode == "hybrid" else None
        # The production loop (adaptive) also selects policies at each trigger and decides
        # outcomes with the served version's decision layer, as a worker does; the fixed
        # strategies take the head's argmax.
        sel = configs.selection_config(self.settings)
        self.selector = (PolicySelector.from_config(sel)
                         if spec.adaptive and sel.enabled else None)
        dec = configs.decision_config(self.settings)
        self.prior = RunningPrior(len(CLASSES), dec.prior_half_life)
        self._prior_events = 0
        self.result = StrategyResult(name)

    # ------------------------------------------------------------------ the walk
    def run(self) -> StrategyResult:
        stream, cfg = self.h.stream, self.h.cfg
        by_block: dict[int, list[Interaction]] = {}
        for it in stream.interactions:
            by_block.setdefault(it.block, []).append(it)
        self._index(stream.known_ids)
        if self.scorer.index.ids[:len(stream.known_ids)] != stream.known_ids:
            raise RuntimeError("index rows must follow the order items became known")
        for b in range(stream.n_blocks):
            if b >= cfg.warm_blocks:
                self._predict(by_block.get(b, []), b)
            else:  # not scored; the running prior counts it, as a worker's counts would
                self._observe_prior([it.sample.label for it in by_block.get(b, [])])
            if b < cfg.warm_blocks and self.walk is not None:  # the sources learn too
                self.walk.block(self.scorer, by_block.get(b, []), self._item_info(b, 1),
                                predict=False)
            if b == stream.n_blocks - 1:
                break  # nothing left to predict: a fine-tune here could never be scored
            self.learn(stream.blocks[b], b)
        if self.walk is not None:
            self.result.blend = self.walk.blender.weights()
        return self.result

    # ------------------------------------------------------------------ learning
    def live(self, state: BlockState) -> LiveWeights:
        """The policy and weights this strategy trains with after ``state``'s block."""
        if self.spec.adaptive:
            return state.live
        policy = dataclasses.replace(configs.policy(self.settings), name=self.spec.policy)
        counts = state.decayed_counts
        return LiveWeights(policy, class_weights(policy, counts), dict(counts), 0.0)

    def finetune_config(self, live: LiveWeights, block: int) -> FineTuneConfig:
        """The trainer's config (same settings, same policy source), with the evaluation's
        steps, batch size and seed per block, and no wall-clock bound (runs must be
        repeatable); fixed strategies add their builder and hold nothing out."""
        cfg = dataclasses.replace(
            configs.finetune_config(self.settings, live.policy), max_steps=self.h.cfg.steps,
            batch_size=self.h.cfg.batch_size, max_seconds=math.inf,
            seed=self.h.cfg.seed + block)
        if self.spec.adaptive:
            return cfg
        return dataclasses.replace(cfg, builder=self.spec.builder,
                                   smote_share=self.spec.smote_share, holdout_share=0.0)

    def learn(self, state: BlockState, block: int) -> Candidate | None:
        """Fine-tune on ``state``'s buffer (adaptive: only if a trigger fired); serve the
        candidate if adopted. Returns it (None when no fine-tune ran)."""
        res = self.result
        if self.spec.adaptive and not state.requests:
            res.weights_over_time.append(dict(state.weights))
            return None
        live = self.live(state)
        res.weights_over_time.append(live.weights)
        cfg = self.finetune_config(live, block)
        data = prepare_data(state.buffer, live.counts, cfg.holdout_share, self.replay)
        cand = fine_tune(self.served, self.vectors, data, cfg=cfg, class_weight=live.weights,
                         device=self.h.device,
                         gate=configs.gate_config(self.settings) if self.spec.adaptive else None,
                         selector=self.selector, policy=live.policy, counts=live.counts)
        res.finetunes += 1
        if self.spec.adaptive:
            res.gate.append({"block": block, "promote": cand.decision.promote,
                             "reason": cand.decision.reason, "policy": cand.policy,
                             "tried": [t.to_dict() for t in cand.trials],
                             "triggers": sorted({str(r.get("reason")) for r in state.requests}),
                             "decisions_refreshed": (not cand.decision.promote
                                                     and cand.served_decisions is not None)})
        if not cand.decision.promote and cand.served_decisions is not None:
            # As the trainer does: the served weights stay, their thresholds are refitted
            # on the window the gate just scored them on.
            self.scorer.set_decisions(cand.served_decisions)
            self.served = self.scorer.served
        if cand.decision.promote:
            self._serve(cand, block)
            self.replay = remember(self.replay, cand.run.trained_on, cfg.replay_capacity,
                                   self.rng)
        return cand

    def _serve(self, cand: Candidate, block: int) -> None:
        for p in cand.model.parameters():
            p.requires_grad_(False)
        cand.model.eval()
        fingerprint = (self.base.text_fingerprint if cand.layers == 0
                       else f"{self.name}-block{block}")
        # The manifest carries the decision layer the trainer fitted, as a version does.
        self.served = ServedModel(self.name, cand.model, self.base.tokenizer, fingerprint,
                                  {"decisions": cand.decisions} if self.spec.adaptive else {})
        self.scorer.swap_model(self.served, self._texts)
        self.vectors = self.scorer.texts
        self.result.promotions += 1

    # ------------------------------------------------------------------ predicting
    def _texts(self, ids: Sequence[str]) -> list[str]:
        return [self.h.stream.item_text.get(i, f"item {i}") for i in ids]

    def _index(self, items: Sequence[str]) -> None:
        ids = [i for i in items if i not in self.scorer.index]
        for start in range(0, len(ids), 4096):
            part = ids[start:start + 4096]
            self.scorer.add_items(part, self._texts(part))

    @torch.inference_mode()
    def _predict(self, block: Sequence[Interaction], b: int) -> None:
        res = self.result
        samples = [it.sample for it in block]
        probs, preds = self._decide(block, self._head(samples))
        for s, p, k in zip(samples, probs, preds, strict=True):
            res.y_true.append(s.label)
            res.y_pred.append(CLASSES[int(k)])
            res.p_purchase.append(float(p[CLASSES.index("purchase")]))
            res.p_cart.append(float(p[CLASSES.index("cart")]))
            res.blocks.append(b)
        ranked = [it for it in block if it.ranked and it.profile is not None]
        if self.walk is not None:
            info = self._item_info(b, ranked[0].known if ranked else 1)
            for it, lst in self.walk.block(self.scorer, block, info, predict=True):
                self.h.add_list(res, it, [r.item_id for r in lst], [r.tier for r in lst])
            return
        for start in range(0, len(ranked), 256):
            part = ranked[start:start + 256]
            requests = [UserRequest(it.sample.user_id,
                                    context_entries(it.profile or {}, self.h.stream.item_text,
                                                    self.settings.max_context),
                                    set((it.profile or {}).get("items", [])[:5]))
                        for it in part]
            lists = self.scorer.recommend(requests, self._item_info(b, ranked[0].known),
                                          known=[it.known for it in part])
            for it, lst in zip(part, lists, strict=True):
                self.h.add_list(res, it, [r.item_id for r in lst], [r.tier for r in lst])

    def _head(self, samples: Sequence[Sample]) -> np.ndarray:
        """The served head's class probabilities ``[N, K]`` for ``samples``, 1,024 at a
        time."""
        if not samples:
            return np.zeros((0, len(CLASSES)))
        return np.concatenate([outcome_probs(self.scorer, samples[i:i + 1024])
                               for i in range(0, len(samples), 1024)])

    def _observe_prior(self, labels: Sequence[str]) -> None:
        self.prior.observe_many([CLASSES.index(y) for y in labels])
        self._prior_events += len(labels)

    def _decide(self, block: Sequence[Interaction], head: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and decisions for a block: the head's argmax (fixed strategies),
        or — ``adaptive``, as a worker decides — the served version's decision layer
        (fitted by the trainer on the gate's held-out window: none for the base model,
        which takes the argmax; stacking the river fast path's prediction when it chose
        to) corrected to the running class prior as it was just before each interaction
        (the mix it was fitted for until ``mix_warmup_events`` interactions were
        counted)."""
        labels = [it.sample.label for it in block]
        layer = self.scorer.decisions if self.spec.adaptive else None
        if layer is None:
            self._observe_prior(labels)
            return head, head.argmax(axis=1)
        warmup = self.settings.mix_warmup_events
        priors = np.empty((len(block), len(CLASSES)))
        for n, y in enumerate(labels):
            live = self.prior.prior() if self._prior_events >= warmup else None
            prior = layer.serving_prior(live)
            priors[n] = prior if prior is not None else self.prior.prior()
            self._observe_prior([y])
        models = [head]
        if layer.reads(1):  # the river fast path's prediction before each interaction
            k = len(CLASSES)
            models.append(np.array([[it.online.get(c, 0.0) for c in CLASSES] if it.online
                                    else [1.0 / k] * k for it in block]))
        probs, preds = layer.predict(models, priors)
        self.result.decisions.append(layer.report())
        return probs, preds

    def _item_info(self, b: int, n_items: int) -> ItemInfo:
        """Tiers, categories and smoothed log q of items as known before block ``b``
        (``n_items`` known items: the smoothing's catalogue size)."""
        tiers = self.h.tiers_at(b)
        counts = self.h.stream.blocks[max(b - 1, 0)].item_counts
        total = sum(counts.values()) or 1.0
        n_items = max(n_items, 1)
        categories = self.h.stream.categories

        def item_info(ids: Sequence[str]) -> tuple[list[str], list[str | None], list[float]]:
            return ([tiers.get(i, "tail") for i in ids], [categories.get(i) for i in ids],
                    [math.log((counts.get(i, 0.0) + 1.0) / (total + n_items)) for i in ids])

        return item_info


def outcome_probs(scorer: Scorer, samples: Sequence[Sample]) -> np.ndarray:
    """Class probabilities ``[N, K]`` of the scorer's model for each sample's (user
    context, item) pair."""
    model = scorer.served.model
    c = model.config.max_context
    contexts = [split_context(s.user_text, c) for s in samples]
    flat = TextBatch([t for ctx in contexts for t in ctx] + [s.item_text for s in samples])
    vecs = scorer.texts.vectors(flat.texts)
    ctx, mask, kinds, at = pack_contexts(contexts, vecs, flat, c, vecs.shape[1],
                                         scorer.device,
                                         [kind_codes(s.user_kinds, c) for s in samples])
    users = model.user_vectors(ctx, mask, kinds)
    items = model.item_vectors(vecs[torch.tensor(flat.rows([s.item_text for s in samples]))])
    counts = model.count_rows([s.features for s in samples], scorer.device)
    logits = model.outcome_logits(users, items, model.context_items_at(vecs, at), mask, counts,
                                  kinds)
    return torch.softmax(logits, dim=-1).cpu().numpy()
