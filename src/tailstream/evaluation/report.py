"""The evaluation report: a markdown table and PNG charts from ``tailstream eval`` JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TABLE_METRICS = (
    ("macro_f1", "macro-F1"), ("minority_macro_recall", "minority macro-recall"),
    ("recall_cart", "recall cart"), ("recall_fav", "recall fav"),
    ("recall_purchase", "recall purchase"), ("purchase_pr_auc", "PR-AUC purchase"),
    ("hit_at_20", "HitRate@20"), ("hit_at_20_tail", "HitRate@20 tail"),
    ("ndcg_at_20", "NDCG@20"), ("mrr", "MRR@20"), ("coverage", "coverage"),
    ("tail_exposure_share", "tail share"), ("exposure_gini", "Gini"),
    ("ms_per_event", "ms/event"),
)


CLASSES = ("click", "cart", "fav", "purchase")
TIERS = ("head", "torso", "tail")

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


def charts(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """class shares & loop weights over time, recall over time, head/tail HitRate, Lorenz."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tab20 = plt.get_cmap("tab20")  # 12 strategies: tab10 would repeat colours
    shades = [2 * k for k in range(10)] + [2 * k + 1 for k in range(10)]  # dark, then light
    style: dict[str, dict[str, Any]] = {
        n: {"color": tab20(shades[i % 20]), "linestyle": ("-", "--", "-.", ":")[i % 4]}
        for i, n in enumerate(result["strategies"])}
    over = result["over_time"]
    classes = ["click", "cart", "fav", "purchase"]
    name = result["dataset"].split()[0].replace("/", "_")

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for c in classes:
        a.plot([s.get(c, 0.0) for s in over["class_shares"]], label=c)
        b.plot([w.get(c, 0.0) for w in over["loop_weights"]], label=c)
    a.set_title("class shares (decayed counts)")
    a.set_yscale("log")
    b.set_title("loss weights in force (imbalance loop)")
    for ax in (a, b):
        ax.set_xlabel("block")
        ax.legend()
    paths.append(_save(fig, out_dir / f"{name}-shares-weights.png"))

    recall = over["recall_by_block"]
    first = int(result.get("config", {}).get("warm_blocks", 0))  # earlier blocks: unscored
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, c in zip(axes, ("cart", "fav", "purchase"), strict=True):
        for strategy, per_class in recall.items():
            ax.plot(range(first, len(per_class[c])), per_class[c][first:], label=strategy,
                    **style.get(strategy, {}))
        ax.set_title(f"recall {c} per block")
        ax.set_xlabel("block (predicted before training on it)")
    axes[-1].legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out_dir / f"{name}-recall-over-time.png"))

    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(result["strategies"])
    width = 0.27
    for k, tier in enumerate(("head", "torso", "tail")):
        ax.bar([i + (k - 1) * width for i in range(len(names))],
               [result["strategies"][n][f"hit_at_20_{tier}"] for n in names], width,
               label=tier)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_title("HitRate@20 by tier of the interacted item")
    ax.legend()
    paths.append(_save(fig, out_dir / f"{name}-hitrate-by-tier.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    for strategy, (x, y) in over["lorenz"].items():
        ax.plot(x, y, label=strategy, **style.get(strategy, {}))
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_title("exposure Lorenz curve")
    ax.set_xlabel("share of items (least shown first)")
    ax.set_ylabel("share of exposure")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / f"{name}-lorenz.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    """PNG at 90 dpi, quantised to a 256-colour palette: about a third of the bytes, no visible
    change for line and bar charts (the charts are committed under docs/eval/)."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path
