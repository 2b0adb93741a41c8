"""What a strategy did in ``tailstream eval``, and the metrics and summary made from it.

Per interaction a strategy records its outcome prediction (class, p(purchase), p(cart));
per ranked interaction, the rank of the interacted item in the list it would have
published and what that list exposed. :meth:`StrategyResult.metrics` turns that into
per-class precision/recall/F1, macro-F1, minority macro-recall, PR-AUC of p(purchase) and
p(cart), HitRate@K / NDCG@K / MRR@20 overall and by the item's tier, catalogue coverage,
the tail's share of exposure and the Gini coefficient of exposure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tailstream.contract import CLASSES, RARE_CLASSES, TIERS
from tailstream.evaluation.stream import Stream
from tailstream.models.training.metrics import (
    average_precision,
    classification_report,
    coverage,
    gini,
    lorenz_curve,
    macro_recall,
    rank_metrics,
)

if TYPE_CHECKING:
    from tailstream.evaluation.specs import EvalConfig


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
        out["minority_macro_recall"] = round(macro_recall(report, RARE_CLASSES), 6)
        out["purchase_pr_auc"] = round(average_precision(
            [y == "purchase" for y in self.y_true], self.p_purchase), 6)
        out["cart_pr_auc"] = round(average_precision(
            [y == "cart" for y in self.y_true], self.p_cart), 6)
        ranked = rank_metrics(self.ranks, (10, 20))
        out.update({k: round(v, 6) for k, v in ranked.items()})
        out["ranked"] = len(self.ranks)
        for tier in TIERS:
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
