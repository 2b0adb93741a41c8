"""What a strategy did in ``tailstream eval``, and the metrics and summary made from it.

Per interaction a strategy records its outcome prediction (class, p(purchase), p(cart));
peers that make lists only record none. Per ranked interaction it records the rank of
the interacted item in the list it would have published, what that list exposed, and
the target's facts (tier, event class, whether it was known before, whether the list
followed a search). :meth:`StrategyResult.metrics` turns that into:

* classification (strategies that predict outcomes): per-class precision/recall/F1,
  macro-F1, minority macro-recall and the G-mean over the classes the log has (classes
  it lacks are ``None``, shown as "—"), PR-AUC of p(purchase) and p(cart), ROC-AUC of
  p(purchase);
* ranking: HitRate@K / NDCG@K / MRR@20 overall, by the item's tier and (HitRate@20) by
  the target's event class, each HitRate with its binomial standard error (``…_se``);
  ``hit_at_20_warm`` over targets known before, ``cold_target_hits`` (hits on targets
  nobody could know: 0 by construction, checked), ``unknown_shown`` (list slots given to
  items not yet known: 0 by construction, checked), ``map_at_5_search`` over lists that
  follow a search;
* exposure: catalogue coverage, the tail's share of exposure, the Gini coefficient.

Beside them, :func:`counterfactual` gives each strategy's inverse-propensity estimate of
its *online* HitRate@20 from the lists one strategy (the logging policy, ``adaptive``
when it ran) showed, positions as propensities (``summary["counterfactual"]``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tailstream.contract import CLASSES, RARE_CLASSES, TIERS
from tailstream.evaluation.measures import (
    average_precision_at_k,
    average_precision_se,
    binomial_se,
    g_mean,
    g_mean_se,
    ips_hit_rate,
    macro_recall_se,
    mean_se,
    roc_auc,
)
from tailstream.evaluation.stream import Interaction, Stream
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
    rank_labels: list[str] = field(default_factory=list)  # the target's event class
    rank_known: list[bool] = field(default_factory=list)  # target known before
    rank_search: list[bool] = field(default_factory=list)  # the list follows a search
    unknown_shown: int = 0  # list slots given to items not known yet (must stay 0)
    exposure: Counter[str] = field(default_factory=Counter)
    exposure_tiers: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    finetunes: int = 0
    promotions: int = 0
    weights_over_time: list[dict[str, float]] = field(default_factory=list)
    gate: list[dict[str, Any]] = field(default_factory=list)
    """The promotion gate's decisions (``adaptive``): block, triggers, promote, reason."""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    """The decision layer after each block (``adaptive``): offsets, stack weights."""
    blend: dict[str, float] = field(default_factory=dict)
    """The online blender's weights at the end (hybrid lists)."""

    def add_list(self, items: Sequence[str], tiers: Sequence[str], target: str,
                 target_tier: str, *, label: str = "", known: bool = True,
                 after_search: bool = False) -> None:
        rank = items.index(target) + 1 if target in items else 0
        self.ranks.append(rank)
        self.rank_tiers.append(target_tier)
        self.rank_labels.append(label)
        self.rank_known.append(known)
        self.rank_search.append(after_search)
        self.exposure.update(items)
        self.exposure_tiers.update(tiers)

    def add_ranked(self, it: Interaction, items: Sequence[str], tiers: Sequence[str],
                   order: dict[str, int]) -> None:
        """The list made for ranked interaction ``it``; ``order`` numbers the known items
        (:meth:`Stream.known_order`), to count slots given to items not yet known."""
        self.unknown_shown += sum(1 for i in items if order.get(i, len(order)) >= it.known)
        self.add_list(items, tiers, it.sample.item_id, it.tier, label=it.sample.label,
                      known=it.target_known, after_search=it.query is not None)

    @property
    def predicts_outcomes(self) -> bool:
        return bool(self.y_pred)

    def metrics(self, catalogue_size: int, events: int) -> dict[str, Any]:
        out: dict[str, Any] = self.outcome_metrics() if self.predicts_outcomes else {}
        out.update(self.ranking_metrics())
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

    def outcome_metrics(self) -> dict[str, Any]:
        """Classification metrics; ``None`` for the classes the scored events lack."""
        report = classification_report(self.y_true, self.y_pred, CLASSES)
        present = [c for c in CLASSES if report[f"support_{c}"] > 0]
        out: dict[str, Any] = {}
        for k, v in report.items():
            if k.startswith("support"):
                continue
            cls = k.rsplit("_", 1)[-1]
            out[k] = None if cls in CLASSES and cls not in present else round(v, 6)
        rare = [c for c in RARE_CLASSES if c in present]
        out["minority_macro_recall"] = round(macro_recall(report, rare), 6) if rare else None
        out["minority_macro_recall_se"] = round(macro_recall_se(
            [report[f"recall_{c}"] for c in rare],
            [int(report[f"support_{c}"]) for c in rare]), 6) if rare else None
        recalls = [report[f"recall_{c}"] for c in present]
        supports = [int(report[f"support_{c}"]) for c in present]
        out["g_mean"] = round(g_mean(recalls), 6)
        out["g_mean_se"] = round(g_mean_se(recalls, supports), 6)
        for c, scores in (("purchase", self.p_purchase), ("cart", self.p_cart)):
            truth = [y == c for y in self.y_true]
            out[f"{c}_pr_auc"] = round(average_precision(truth, scores), 6) \
                if c in present else None
        truth = [y == "purchase" for y in self.y_true]
        out["purchase_pr_auc_se"] = round(average_precision_se(truth, self.p_purchase), 6) \
            if "purchase" in present else None
        auc = roc_auc([y == "purchase" for y in self.y_true], self.p_purchase)
        out["purchase_roc_auc"] = None if auc is None else round(auc, 6)
        return out

    def ranking_metrics(self) -> dict[str, Any]:
        """HitRate/NDCG/MRR with standard errors, by tier and class, warm and cold,
        MAP@5 after a search."""
        out = _rank_block(self.ranks, "")
        out["ranked"] = len(self.ranks)
        for tier in TIERS:
            sel = [r for r, t in zip(self.ranks, self.rank_tiers, strict=True) if t == tier]
            out.update(_rank_block(sel, f"_{tier}"))
            out[f"ranked_{tier}"] = len(sel)
        for c in CLASSES:
            sel = [r for r, y in zip(self.ranks, self.rank_labels, strict=True) if y == c]
            hit = _hit_at_20(sel)
            out[f"hit_at_20_{c}"] = hit
            out[f"hit_at_20_{c}_se"] = None if hit is None else round(
                binomial_se(hit, len(sel)), 6)
            out[f"ranked_{c}"] = len(sel)
        warm = [r for r, k in zip(self.ranks, self.rank_known, strict=True) if k]
        out["hit_at_20_warm"] = _hit_at_20(warm)
        out["hit_at_20_warm_se"] = round(binomial_se(out["hit_at_20_warm"] or 0.0, len(warm)), 6)
        out["ranked_warm"] = len(warm)
        out["ranked_cold"] = len(self.ranks) - len(warm)
        out["cold_target_hits"] = sum(1 for r, k in zip(self.ranks, self.rank_known, strict=True)
                                      if not k and 0 < r <= 20)
        out["unknown_shown"] = self.unknown_shown
        aps = [average_precision_at_k(r, 5)
               for r, q in zip(self.ranks, self.rank_search, strict=True) if q]
        out["map_at_5_search"] = round(float(np.mean(aps)), 6) if aps else None
        out["map_at_5_search_se"] = round(mean_se(aps), 6) if aps else None
        out["ranked_search"] = len(aps)
        after = [r for r, q in zip(self.ranks, self.rank_search, strict=True) if q]
        out["hit_at_20_search"] = _hit_at_20(after)
        out["hit_at_20_search_se"] = (round(binomial_se(out["hit_at_20_search"], len(after)), 6)
                                      if after else None)
        return out

    def recall_by_block(self, n_blocks: int) -> dict[str, list[float]]:
        if not self.predicts_outcomes:
            return {}
        out: dict[str, list[float]] = {c: [] for c in CLASSES}
        for b in range(n_blocks):
            idx = [i for i, x in enumerate(self.blocks) if x == b]
            rep = classification_report([self.y_true[i] for i in idx],
                                        [self.y_pred[i] for i in idx], CLASSES)
            for c in CLASSES:
                out[c].append(rep[f"recall_{c}"])
        return out


def _hit_at_20(ranks: Sequence[int]) -> float | None:
    """HitRate@20 of ``ranks`` (None when there are none).

    >>> _hit_at_20([1, 21, 0, 20]), _hit_at_20([])
    (0.5, None)
    """
    if not ranks:
        return None
    return round(sum(1 for r in ranks if 0 < r <= 20) / len(ranks), 6)


def _rank_block(ranks: Sequence[int], suffix: str) -> dict[str, Any]:
    """HitRate@10/20 (with standard errors), NDCG@10/20 and MRR of ``ranks``, keys with
    ``suffix``; ``None`` everywhere when there are no ranks."""
    m = rank_metrics(ranks, (10, 20))
    out: dict[str, Any] = {f"{k}{suffix}": (round(v, 6) if ranks else None)
                           for k, v in m.items()}
    for k in (10, 20):
        out[f"hit_at_{k}{suffix}_se"] = (round(binomial_se(m[f"hit_at_{k}"], len(ranks)), 6)
                                         if ranks else None)
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
                   "warm_blocks": cfg.warm_blocks, "peers": dataclasses.asdict(cfg.peers),
                   **extra},
        "class_shares": {c: round(v, 6) for c, v in
                         _shares(Counter(it.sample.label for it in stream.interactions)).items()},
        "known": {"items": len(stream.known_ids), "searches": len(stream.searches),
                  "ranked_cold_targets": sum(1 for it in stream.interactions
                                             if it.ranked and not it.target_known)},
        "strategies": {n: r.metrics(catalogue, events) for n, r in results.items()},
        "gate": {n: r.gate for n, r in results.items() if r.gate},
        "decisions": {n: r.decisions for n, r in results.items() if r.decisions},
        "blend": {n: r.blend for n, r in results.items() if r.blend},
        "counterfactual": counterfactual(results),
        "over_time": {
            "class_shares": [b.shares for b in stream.blocks],
            "block_shares": block_shares(stream),
            "loop_weights": [b.weights for b in stream.blocks],
            "recall_by_block": {n: r.recall_by_block(stream.n_blocks)
                                for n, r in results.items() if r.predicts_outcomes},
            "lorenz": {n: thin_curve(*lorenz_curve(list(r.exposure.values())
                                                   + [0] * max(0, catalogue - len(r.exposure))))
                       for n, r in results.items()},
        },
    }


def counterfactual(results: dict[str, StrategyResult], logging: str = "adaptive",
                   k: int = 20) -> dict[str, Any]:
    """Each strategy's IPS estimate of its online HitRate@k from the lists ``logging`` (or,
    when it did not run, the first strategy) showed on the same scored interactions,
    positions as propensities (:func:`~tailstream.evaluation.measures.ips_hit_rate`),
    with its standard error and support. Strategies whose lists were scored on other
    interactions are left out. The replayed log did not react to any list: its next
    interaction stands in for the click the logged list got, under the position model.

    >>> a, b = StrategyResult("a"), StrategyResult("b")
    >>> for r, ranks in ((a, [1, 2, 0]), (b, [2, 1, 1])):
    ...     for rank in ranks:
    ...         r.ranks.append(rank); r.rank_tiers.append("tail"); r.rank_labels.append("click")
    >>> out = counterfactual({"a": a, "b": b}, logging="a")
    >>> out["logging_policy"], out["estimates"]["b"]["ips_hit_rate"]
    ('a', 0.833333)
    """
    if not results:
        return {}
    name = logging if logging in results else next(iter(results))
    base = results[name]
    estimates: dict[str, dict[str, Any]] = {}
    for n, r in results.items():
        if r.rank_tiers != base.rank_tiers or r.rank_labels != base.rank_labels:
            continue  # not the same interactions: not comparable
        value, se, support = ips_hit_rate(base.ranks, r.ranks, k)
        estimates[n] = {"ips_hit_rate": value, "ips_hit_rate_se": se, "support": support}
    return {"logging_policy": name, "k": k, "propensity": "1/position",
            "estimates": estimates}


def block_shares(stream: Stream) -> list[dict[str, float]]:
    """Each block's own class mix (the interactions in it, not the loop's decayed view)."""
    counts: list[Counter[str]] = [Counter() for _ in range(stream.n_blocks)]
    for it in stream.interactions:
        counts[min(it.block, stream.n_blocks - 1)][it.sample.label] += 1
    return [{c: round(v, 6) for c, v in _shares(c).items()} for c in counts]


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
