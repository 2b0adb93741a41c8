"""PNG charts of a ``tailstream eval`` result: class shares and loss weights over time,
recall per block, HitRate@20 by tier, and the exposure Lorenz curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tailstream.contract import CLASSES, RARE_CLASSES, TIERS


def charts(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the four charts under ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    tab20 = plt.get_cmap("tab20")  # 12 strategies: tab10 would repeat colours
    shades = [2 * k for k in range(10)] + [2 * k + 1 for k in range(10)]  # dark, then light
    style: dict[str, dict[str, Any]] = {
        n: {"color": tab20(shades[i % 20]), "linestyle": ("-", "--", "-.", ":")[i % 4]}
        for i, n in enumerate(result["strategies"])}
    name = result["dataset"].split()[0].replace("/", "_")
    return [_shares_weights(plt, result, out_dir / f"{name}-shares-weights.png"),
            _recall(plt, result, style, out_dir / f"{name}-recall-over-time.png"),
            _hit_by_tier(plt, result, out_dir / f"{name}-hitrate-by-tier.png"),
            _lorenz(plt, result, style, out_dir / f"{name}-lorenz.png")]


def _shares_weights(plt: Any, result: dict[str, Any], path: Path) -> Path:
    over = result["over_time"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for c in CLASSES:
        a.plot([s.get(c, 0.0) for s in over["class_shares"]], label=c)
        b.plot([w.get(c, 0.0) for w in over["loop_weights"]], label=c)
    a.set_title("class shares (decayed counts)")
    a.set_yscale("log")
    b.set_title("loss weights in force (imbalance loop)")
    for ax in (a, b):
        ax.set_xlabel("block")
        ax.legend()
    return _save(fig, path)


def _recall(plt: Any, result: dict[str, Any], style: dict[str, dict[str, Any]],
            path: Path) -> Path:
    recall = result["over_time"]["recall_by_block"]
    first = int(result.get("config", {}).get("warm_blocks", 0))  # earlier blocks: unscored
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, c in zip(axes, RARE_CLASSES, strict=True):
        for strategy, per_class in recall.items():
            ax.plot(range(first, len(per_class[c])), per_class[c][first:], label=strategy,
                    **style.get(strategy, {}))
        ax.set_title(f"recall {c} per block")
        ax.set_xlabel("block (predicted before training on it)")
    axes[-1].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _hit_by_tier(plt: Any, result: dict[str, Any], path: Path) -> Path:
    names = list(result["strategies"])
    fig, ax = plt.subplots(figsize=(max(10.0, 0.65 * len(names)), 4))
    width = 0.27
    for k, tier in enumerate(TIERS):
        ax.bar([i + (k - 1) * width for i in range(len(names))],
               [result["strategies"][n].get(f"hit_at_20_{tier}") or 0.0 for n in names], width,
               label=tier)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_title("HitRate@20 by tier of the interacted item")
    ax.legend()
    return _save(fig, path)


def _lorenz(plt: Any, result: dict[str, Any], style: dict[str, dict[str, Any]],
            path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for strategy, (x, y) in result["over_time"]["lorenz"].items():
        ax.plot(x, y, label=strategy, **style.get(strategy, {}))
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_title("exposure Lorenz curve")
    ax.set_xlabel("share of items (least shown first)")
    ax.set_ylabel("share of exposure")
    ax.legend(fontsize=7)
    return _save(fig, path)


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
