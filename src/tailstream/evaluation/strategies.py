"""The strategies ``tailstream eval`` compares, and the harness that runs each over the
replayed stream (:mod:`~tailstream.evaluation.stream`).

Prequential (test-then-train; Dawid 1984; Gama et al., Machine Learning 2013): every
strategy walks the blocks, first **predicting** every interaction of block *b* with the
model it has so far, then **learning** from what the buffer held at the end of block *b*.
All strategies see the same data in the same order with the same seeds.

Leak-free: a list may hold only items known when its interaction happened (see
:mod:`~tailstream.evaluation.stream`); every list goes through :meth:`Harness.add_list`,
which counts any slot given to an item not yet known (``unknown_shown``, must be 0).

* ``popularity``: outcome = the class prior so far; lists = the most popular items
  (refreshed per block), without the user's 5 most recent items.
* ``river``: the imbalance loop's river fast path (prequential, weighted by the live class
  weights) for outcomes; lists from the category-affinity × popularity baseline.
* peers (:mod:`~tailstream.evaluation.peers`): ``trending``, ``covisitation``, ``als``,
  ``bpr``, ``query_lookup`` — well-known recommenders on the same lists, no outcome
  prediction.
* transformer strategies (:mod:`~tailstream.evaluation.transformer`), all from the same
  pretrained encoder and seeds, fine-tuned after each block on that block's buffer through
  the trainer's own routine: ``ce`` (unweighted cross-entropy), ``inverse``,
  ``class_balanced`` (β), ``focal`` (class-balanced α and γ), ``logit_adjusted`` (τ),
  ``oversample`` / ``undersample`` (builders, unweighted loss), ``smote`` (SMOTE pairs in
  embedding space, unweighted loss), ``importance`` (p(y|x)/p(y) sample weights);
* ``adaptive``: the loop as production runs it: fine-tunes only when the loop's triggers
  fired, with the policy and weights the loop published, replay memory, and the promotion
  gate deciding whether the candidate replaces the model.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tailstream import configs
from tailstream.contract import CLASSES
from tailstream.evaluation.results import StrategyResult
from tailstream.evaluation.specs import EvalConfig, spec_of
from tailstream.evaluation.stream import Interaction, Stream
from tailstream.models.towers.adapters import configure_trainable
from tailstream.models.towers.context import CONTEXT_SEPARATOR
from tailstream.models.towers.encoder import load_encoder, write_tiny_encoder
from tailstream.models.towers.loading import ServedModel, build_model, pick_device
from tailstream.models.towers.text_vectors import TextVectors
from tailstream.settings import Settings


class Harness:
    """Runs strategies over one replayed :class:`~tailstream.evaluation.stream.Stream`."""

    def __init__(self, stream: Stream, settings: Settings, cfg: EvalConfig,
                 work_dir: Path) -> None:
        self.stream = stream
        self.settings = settings
        self.cfg = cfg
        # TAILSTREAM_DEVICE as the trainer reads it: on a GPU the fine-tunes train the
        # whole encoder (FineTuneConfig.layers "auto"), on a CPU the towers and the head.
        self.device = torch.device("cpu") if cfg.tiny else pick_device(settings.device)
        self.encoder_path: Path | None = None
        if cfg.tiny:
            self.encoder_path = write_tiny_encoder(work_dir / "tiny-encoder", hidden_size=64,
                                                   layers=2, heads=4)
        elif settings.encoder_path:
            self.encoder_path = Path(settings.encoder_path)
        self.tower = configs.tower_config(settings, seed=cfg.seed)
        self._base: ServedModel | None = None
        self._vectors: TextVectors | None = None
        self.order = stream.known_order()

    # ------------------------------------------------------------------ shared encoder
    def base(self) -> tuple[ServedModel, TextVectors]:
        """The base model (pretrained encoder, seeded towers) and its text vectors."""
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

    def share_base(self, base: ServedModel, vectors: TextVectors) -> None:
        """Use another harness's base model and text vectors (``tailstream tune``: every
        trial replays the same log with the same frozen encoder)."""
        self._base, self._vectors = base, vectors

    def encode_all(self, progress: Callable[[int], None] | None = None) -> None:
        """Encode every item text and context text once (the encoder is frozen: every
        transformer strategy reuses the vectors)."""
        _, vectors = self.base()
        texts = set(self.stream.item_text.values())
        for it in self.stream.interactions:
            texts.update(t for t in it.sample.user_text.split(CONTEXT_SEPARATOR) if t)
        todo = sorted(texts)
        for start in range(0, len(todo), 512):
            part = todo[start:start + 512]
            vectors.vectors(part)
            if progress is not None:
                progress(len(part))

    # ------------------------------------------------------------------ strategies
    def run(self, name: str) -> StrategyResult:
        from tailstream.evaluation.peers import run_peer
        from tailstream.evaluation.transformer import TransformerStrategy

        spec = spec_of(name)
        started = time.perf_counter()
        if spec.kind == "popularity":
            result = self._popularity(name)
        elif spec.kind == "river":
            result = self._river(name)
        elif spec.kind == "peer":
            result = run_peer(self, name, spec)
        else:
            result = TransformerStrategy(self, name, spec).run()
        result.seconds = time.perf_counter() - started
        return result

    def counted(self, it: Interaction) -> bool:
        return it.block >= self.cfg.warm_blocks

    def add_list(self, res: StrategyResult, it: Interaction, items: Sequence[str],
                 tiers: Sequence[str] | None = None) -> None:
        """Record the list a strategy made for ranked interaction ``it`` (tiers as known
        before its block when not given)."""
        if tiers is None:
            known_tiers = self.tiers_at(it.block)
            tiers = [known_tiers.get(i, "tail") for i in items]
        res.add_ranked(it, items, tiers, self.order)

    def tiers_at(self, block: int) -> dict[str, str]:
        """Item tiers as known when block ``block`` is predicted (end of the one before)."""
        return self.stream.blocks[max(block - 1, 0)].tiers if block else {}

    def _popularity(self, name: str) -> StrategyResult:
        res = StrategyResult(name)
        counts: Counter[str] = Counter()
        prior: Counter[str] = Counter()
        top: list[str] = []
        current = -1
        k = self.settings.recs_k
        for it in self.stream.interactions:
            if it.block != current:  # the popular list is refreshed per block
                current = it.block
                top = [i for i, _ in counts.most_common(k + 5)]
            if self.counted(it):
                total = sum(prior.values()) or 1
                res.y_true.append(it.sample.label)
                res.y_pred.append(max(CLASSES, key=lambda c: prior.get(c, 0)))
                res.p_purchase.append(prior.get("purchase", 0) / total)
                res.p_cart.append(prior.get("cart", 0) / total)
                res.blocks.append(it.block)
                if it.ranked:
                    recent = set((it.profile or {}).get("items", [])[:5])
                    self.add_list(res, it, [i for i in top if i not in recent][:k])
            counts[it.sample.item_id] += 1
            prior[it.sample.label] += 1
        return res

    def _river(self, name: str) -> StrategyResult:
        res = StrategyResult(name)
        for it in self.stream.interactions:
            if not self.counted(it):
                continue
            proba = it.online or {c: 1.0 / len(CLASSES) for c in CLASSES}
            res.y_true.append(it.sample.label)
            res.y_pred.append(max(CLASSES, key=lambda c: proba.get(c, 0.0)))
            res.p_purchase.append(proba.get("purchase", 0.0))
            res.p_cart.append(proba.get("cart", 0.0))
            res.blocks.append(it.block)
            if it.ranked and it.baseline_list is not None:
                self.add_list(res, it, it.baseline_list)
        return res
