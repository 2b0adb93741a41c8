"""The evaluation report: markdown tables from ``tailstream eval`` JSON (the charts are in
:mod:`~tailstream.evaluation.charts`)."""

from __future__ import annotations

from typing import Any

from tailstream.contract import CLASSES, TIERS

TABLE_METRICS = (
    ("macro_f1", "macro-F1"), ("minority_macro_recall", "minority macro-recall"),
    ("recall_cart", "recall cart"), ("recall_fav", "recall fav"),
    ("recall_purchase", "recall purchase"), ("purchase_pr_auc", "PR-AUC purchase"),
    ("hit_at_20", "HitRate@20"), ("hit_at_20_tail", "HitRate@20 tail"),
    ("ndcg_at_20", "NDCG@20"), ("mrr", "MRR@20"), ("coverage", "coverage"),
    ("tail_exposure_share", "tail share"), ("exposure_gini", "Gini"),
    ("ms_per_event", "ms/event"),
)


CLASS_METRICS = (
    *((f"{m}_{c}", f"{m[0].upper()} {c}") for c in CLASSES
      for m in ("precision", "recall", "f1")),
    ("cart_pr_auc", "PR-AUC cart"), ("purchase_pr_auc", "PR-AUC purchase"),
)

RANK_METRICS = (
    ("hit_at_10", "Hit@10"), ("hit_at_20", "Hit@20"), ("ndcg_at_10", "NDCG@10"),
    ("ndcg_at_20", "NDCG@20"), ("mrr", "MRR@20"),
    *((f"{m}_{t}", f"{label} {t}") for t in TIERS
      for m, label in (("hit_at_10", "Hit@10"), ("hit_at_20", "Hit@20"),
                       ("ndcg_at_20", "NDCG@20"), ("mrr", "MRR@20"))),
)

LOWER_BETTER = {"exposure_gini", "ms_per_event"}


def table(strategies: dict[str, dict[str, Any]],
          metrics: tuple[tuple[str, str], ...]) -> list[str]:
    """One markdown table, a row per strategy, the best value of each column in bold
    (lower is better for Gini and time). Metrics a result lacks show as "–".

    >>> print("\\n".join(table({"a": {"x": 0.5}, "b": {"x": 0.25, "y": 1.0}},
    ...                         (("x", "X"), ("y", "Y")))))
    | strategy | X | Y |
    |---|---:|---:|
    | a | **0.500** | – |
    | b | 0.250 | **1.000** |
    """
    best: dict[str, float] = {}
    for key, _ in metrics:
        values = [m[key] for m in strategies.values() if key in m]
        if values:
            best[key] = min(values) if key in LOWER_BETTER else max(values)
    head = "| strategy | " + " | ".join(label for _, label in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    rows = []
    for name, m in strategies.items():
        cells = []
        for key, _ in metrics:
            if key not in m:
                cells.append("–")
                continue
            v = m[key]
            text = f"{v:.3f}" if key != "ms_per_event" else f"{v:.2f}"
            cells.append(f"**{text}**" if v == best[key] and len(strategies) > 1 else text)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return [head, rule, *rows]


def markdown(result: dict[str, Any], command: str) -> str:
    """The strategy tables: the headline metrics, then per-class precision/recall/F1 with
    PR-AUC, then ranking quality by tier of the interacted item; best per column in bold."""
    strategies: dict[str, dict[str, Any]] = result["strategies"]
    runs = " | ".join(f"{n}: {m.get('finetunes', 0)}/{m.get('promotions', 0)}"
                      for n, m in strategies.items() if m.get("finetunes"))
    cfg = result["config"]
    shares = ", ".join(f"{c} {100 * v:.2f} %" for c, v in result["class_shares"].items())
    return "\n".join([
        f"### {result['dataset']}",
        "",
        f"{result['events']:,} interactions, {result['catalogue_items']:,} items, "
        f"{result['blocks']} prequential blocks (first {cfg['warm_blocks']} not scored); "
        f"class shares: {shares}. Encoder: "
        f"{'tiny random BERT (--tiny)' if cfg['tiny_encoder'] else 'all-MiniLM-L6-v2'}, "
        f"{cfg['steps_per_finetune']} steps × {cfg['batch_size']} per fine-tune; lists "
        f"scored on every {cfg['rank_every']}th interaction.",
        "",
        "```bash",
        command,
        "```",
        "",
        *table(strategies, TABLE_METRICS), "",
        "Per class (precision P, recall R, F1) and PR-AUC of p(cart), p(purchase):",
        "",
        *table(strategies, CLASS_METRICS), "",
        "Ranking (MRR within the 20-item list) overall and by tier of the interacted item:",
        "",
        *table(strategies, RANK_METRICS), "",
        f"Fine-tunes / promotions: {runs or 'none'}. Wall time "
        f"{cfg.get('seconds', 0.0):.0f} s.",
        "",
        *(f"* promotion gate ({name}), after block {d['block']} "
          f"({', '.join(d.get('triggers', [])) or 'no trigger'}): {d['reason']}"
          for name, decisions in result.get("gate", {}).items() for d in decisions),
        "",
    ])
