"""The evaluation report: markdown tables from ``tailstream eval`` JSON (the charts are in
:mod:`~tailstream.evaluation.charts`).

The first table ranks every strategy and peer by HitRate@20, with standard errors;
then the outcome metrics, per class, by tier and by the target's class. A metric a
strategy lacks (peers predict no class) or a class the log lacks shows as "—" and is
never bolded."""

from __future__ import annotations

from typing import Any

from tailstream.contract import CLASSES, TIERS
from tailstream.evaluation.specs import parse_variant

MISSING = "—"

TABLE_METRICS = (
    ("macro_f1", "macro-F1"), ("minority_macro_recall", "minority macro-recall"),
    ("g_mean", "G-mean"),
    ("recall_cart", "recall cart"), ("recall_fav", "recall fav"),
    ("recall_purchase", "recall purchase"), ("purchase_pr_auc", "PR-AUC purchase"),
    ("purchase_roc_auc", "ROC-AUC purchase"),
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

CLASS_HIT_METRICS = tuple((f"hit_at_20_{c}", f"Hit@20 {c}") for c in CLASSES)

LOWER_BETTER = {"exposure_gini", "ms_per_event"}


def table(strategies: dict[str, dict[str, Any]],
          metrics: tuple[tuple[str, str], ...]) -> list[str]:
    """One markdown table, a row per strategy, the best value of each column in bold
    (lower is better for Gini and time). Metrics a result lacks or holds as None (a class
    the log does not have) show as "—" and are never bold; a column of equal values has no
    bold either.

    >>> print("\\n".join(table({"a": {"x": 0.5, "y": None}, "b": {"x": 0.25, "y": 1.0}},
    ...                         (("x", "X"), ("y", "Y")))))
    | strategy | X | Y |
    |---|---:|---:|
    | a | **0.500** | — |
    | b | 0.250 | 1.000 |
    """
    best: dict[str, float] = {}
    for key, _ in metrics:
        values = [m[key] for m in strategies.values() if m.get(key) is not None]
        if len(set(values)) > 1:
            best[key] = min(values) if key in LOWER_BETTER else max(values)
    head = "| strategy | " + " | ".join(label for _, label in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    rows = []
    for name, m in strategies.items():
        cells = []
        for key, _ in metrics:
            v = m.get(key)
            if v is None:
                cells.append(MISSING)
                continue
            text = f"{v:.2f}" if key == "ms_per_event" else f"{v:.3f}"
            cells.append(f"**{text}**" if key in best and v == best[key] else text)
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return [head, rule, *rows]


def with_se(m: dict[str, Any], key: str) -> str:
    """``value ± standard error`` of a HitRate (or "—").

    >>> with_se({"h": 0.25, "h_se": 0.0125}, "h"), with_se({"h": None}, "h")
    ('0.250 ± 0.013', '—')
    """
    v = m.get(key)
    if v is None:
        return MISSING
    se = m.get(f"{key}_se")
    d = 4 if 0 < abs(v) < 0.01 else 3  # a rare target's HitRate needs the 4th decimal
    return f"{v:.{d}f} ± {se:.{d}f}" if se is not None else f"{v:.{d}f}"


def leaderboard(strategies: dict[str, dict[str, Any]]) -> list[str]:
    """Every strategy and peer ranked by HitRate@20 (± standard error), with warm and
    tail HitRate@20, hits on cold targets (must be 0), MAP@5 after a search.

    >>> print("\\n".join(leaderboard({
    ...     "a": {"hit_at_20": 0.1, "hit_at_20_se": 0.01, "cold_target_hits": 0},
    ...     "b": {"hit_at_20": 0.3, "hit_at_20_se": 0.02, "cold_target_hits": 0}})))
    | # | strategy | HitRate@20 | warm | tail | cold-target hits | MAP@5 after search |
    |---:|---|---:|---:|---:|---:|---:|
    | 1 | b | 0.300 ± 0.020 | — | — | 0 | — |
    | 2 | a | 0.100 ± 0.010 | — | — | 0 | — |
    """
    ranked = sorted(strategies.items(), key=lambda kv: (-(kv[1].get("hit_at_20") or 0.0),
                                                        kv[0]))
    out = ["| # | strategy | HitRate@20 | warm | tail | cold-target hits | MAP@5 after search |",
           "|---:|---|---:|---:|---:|---:|---:|"]
    for n, (name, m) in enumerate(ranked, 1):
        cold = m.get("cold_target_hits")
        out.append(f"| {n} | {name} | {with_se(m, 'hit_at_20')} | "
                   f"{with_se(m, 'hit_at_20_warm')} | {with_se(m, 'hit_at_20_tail')} | "
                   f"{MISSING if cold is None else cold} | {with_se(m, 'map_at_5_search')} |")
    return out


PEERS = ("trending", "covisitation", "als", "bpr", "query_lookup")


def versus_peers(strategies: dict[str, dict[str, Any]], name: str = "adaptive") -> list[str]:
    """``name``'s HitRate@20, overall and on tail targets, over the best peer's.

    >>> print("\\n".join(versus_peers({
    ...     "adaptive": {"hit_at_20": 0.55, "hit_at_20_se": 0.01, "hit_at_20_tail": 0.1},
    ...     "covisitation": {"hit_at_20": 0.5, "hit_at_20_se": 0.01, "hit_at_20_tail": 0.05},
    ...     "trending": {"hit_at_20": 0.1, "hit_at_20_tail": 0.0}})))
    * adaptive vs the best peer, HitRate@20: 0.550 ± 0.010 vs covisitation 0.500 ± 0.010 (× 1.10)
    * adaptive vs the best peer, HitRate@20 tail: 0.100 vs covisitation 0.050 (× 2.00)
    """
    me = strategies.get(name)
    peers = {n: m for n, m in strategies.items() if n in PEERS}
    if me is None or not peers:
        return []
    out = []
    for key, label in (("hit_at_20", "HitRate@20"), ("hit_at_20_tail", "HitRate@20 tail"),
                       ("hit_at_20_search", "HitRate@20 after a search"),
                       ("map_at_5_search", "MAP@5 after a search")):
        best = max(peers, key=lambda n: peers[n].get(key) or 0.0)
        mine, theirs = me.get(key), peers[best].get(key)
        if mine is None or theirs is None:
            continue
        ratio = f"× {mine / theirs:.2f}" if theirs else "the peers score 0"
        out.append(f"* {name} vs the best peer, {label}: {with_se(me, key)} vs {best} "
                   f"{with_se(peers[best], key)} ({ratio})")
    return out


def versus_first(strategies: dict[str, dict[str, Any]], name: str = "adaptive") -> list[str]:
    """``name`` against the first of all strategies on the imbalance measures (minority
    macro-recall, G-mean, tail HitRate@20) and against ``river`` on PR-AUC of
    p(purchase), each with its standard error; "within one SE" means the gap is at most
    the leader's own standard error.

    >>> print("\\n".join(versus_first({
    ...     "adaptive": {"g_mean": 0.5, "g_mean_se": 0.01},
    ...     "ce": {"g_mean": 0.505, "g_mean_se": 0.01}})))
    * adaptive vs the first, G-mean: 0.500 ± 0.010 vs ce 0.505 ± 0.010 (gap 0.0050: within one SE)
    """
    me = strategies.get(name)
    if me is None:
        return []
    out = []
    for key, label in (("minority_macro_recall", "minority macro-recall"),
                       ("g_mean", "G-mean"), ("hit_at_20_tail", "HitRate@20 tail"),
                       ("purchase_pr_auc", "PR-AUC purchase")):
        if me.get(key) is None:
            continue
        if key == "purchase_pr_auc":
            rivals = {n: m for n, m in strategies.items() if n == "river" and n != name}
            role = "river"
        else:  # its own ablations (``adaptive[...]``) are reported apart, not rivals
            rivals = {n: m for n, m in strategies.items()
                      if n != name and not n.startswith(f"{name}[") and m.get(key) is not None}
            role = "the first"
        if not rivals:
            continue
        best = max(rivals, key=lambda n: rivals[n][key])
        gap = rivals[best][key] - me[key]
        se = rivals[best].get(f"{key}_se") or 0.0
        if gap <= 0:
            verdict = "first" if role == "the first" else "ahead"
        elif gap <= se:
            verdict = f"gap {gap:.4f}: within one SE"
        else:
            verdict = f"gap {gap:.4f}: outside one SE" + (f", {gap / se:.1f} SE" if se else "")
        out.append(f"* {name} vs {role}, {label}: {with_se(me, key)} vs {best} "
                   f"{with_se(rivals[best], key)} ({verdict})")
    return out


def minority_by_block(result: dict[str, Any], names: tuple[str, ...] = (
        "adaptive", "river", "ce", "logit_adjusted")) -> list[str]:
    """Per block: its purchase share and each strategy's minority macro-recall (a shift in
    the mix, e.g. ``--sale-at``, shows here block by block)."""
    over = result.get("over_time", {})
    shares, recall = over.get("block_shares", []), over.get("recall_by_block", {})
    names = tuple(n for n in names if recall.get(n))
    if not shares or not names:
        return []
    head = "| block | purchase share | " + " | ".join(names) + " |"
    out = [head, "|---:|---:|" + "---:|" * len(names)]
    for b, mix in enumerate(shares):
        if b < result["config"].get("warm_blocks", 1):
            continue
        cells = []
        for n in names:
            minority = [recall[n][c][b] for c in CLASSES[1:] if mix.get(c)]
            cells.append(f"{sum(minority) / len(minority):.3f}" if minority else MISSING)
        out.append(f"| {b} | {100 * mix.get('purchase', 0.0):.2f} % | " + " | ".join(cells)
                   + " |")
    return out


def counterfactual_lines(result: dict[str, Any]) -> list[str]:
    """Each strategy's IPS estimate of its online HitRate@20 from the logging policy's
    lists (positions as propensities), beside its replay HitRate@20.

    >>> print("\\n".join(counterfactual_lines({"strategies": {"a": {"hit_at_20": 0.5}},
    ...     "counterfactual": {"logging_policy": "a", "estimates": {"a": {
    ...         "ips_hit_rate": 0.5, "ips_hit_rate_se": 0.01, "support": 1.0}}}})))
    Counterfactual online HitRate@20 (IPS from the lists of a, propensity 1/position):
    <BLANKLINE>
    | strategy | IPS HitRate@20 | support | replay HitRate@20 |
    |---|---:|---:|---:|
    | a | 0.500 ± 0.010 | 1.00 | 0.500 |
    """
    cf = result.get("counterfactual") or {}
    estimates = cf.get("estimates") or {}
    if not estimates:
        return []
    out = [f"Counterfactual online HitRate@20 (IPS from the lists of {cf['logging_policy']}, "
           f"propensity 1/position):", "",
           "| strategy | IPS HitRate@20 | support | replay HitRate@20 |", "|---|---:|---:|---:|"]
    for name, e in estimates.items():
        support = e.get("support")
        replay = result["strategies"].get(name, {}).get("hit_at_20")
        out.append(f"| {name} | {e['ips_hit_rate']:.3f} ± {e['ips_hit_rate_se']:.3f} | "
                   f"{MISSING if support is None else f'{support:.2f}'} | "
                   f"{MISSING if replay is None else f'{replay:.3f}'} |")
    return out


def blend_summary(result: dict[str, Any], name: str = "adaptive") -> list[str]:
    """What the online blender learned: a rank-1 and a rank-10 candidate's weight from
    each source (reciprocal rank × its weight + that rank's bucket)."""
    w = result.get("blend", {}).get(name)
    if not w:
        return []
    sources = [k[3:] for k in w if k.startswith("rr_")]
    cells = [f"{s} {w[f'rr_{s}'] + w.get(f'{s}@0', 0.0):.2f} / "
             f"{w[f'rr_{s}'] / 10 + w.get(f'{s}@3', 0.0):.2f}" for s in sources]
    return [f"* {name}'s blender, rank-1 / rank-10 weight by source: " + ", ".join(cells)
            + f"; cosine {w.get('cosine', 0.0):.2f}, engagement "
              f"{w.get('engagement', 0.0):.2f}, tail {w.get('tail', 0.0):.2f}"]


ABLATED = (("hit_at_20", "HitRate@20"), ("hit_at_20_tail", "tail HitRate@20"),
           ("g_mean", "G-mean"), ("minority_macro_recall", "minority macro-recall"),
           ("purchase_pr_auc", "PR-AUC purchase"), ("coverage", "coverage"))


def ablations(strategies: dict[str, dict[str, Any]]) -> list[str]:
    """Each variant (``adaptive[tail_share=0]``) beside the strategy it varies: the
    variant's value and its difference from the base, in the base's standard errors.

    >>> print("\\n".join(ablations({
    ...     "adaptive": {"hit_at_20": 0.5, "hit_at_20_se": 0.01},
    ...     "adaptive[tail_share=0]": {"hit_at_20": 0.52, "hit_at_20_se": 0.01}})))
    | variant | HitRate@20 |
    |---|---:|
    | adaptive (base) | 0.500 ± 0.010 |
    | adaptive[tail_share=0] | 0.520 (+0.020, +2.0 SE) |
    """
    variants = [n for n in strategies if parse_variant(n)[1]]
    if not variants:
        return []
    keys = [(k, label) for k, label in ABLATED
            if any(strategies[n].get(k) is not None for n in variants)]
    out = ["| variant | " + " | ".join(label for _, label in keys) + " |",
           "|---|" + "---:|" * len(keys)]
    for base in dict.fromkeys(parse_variant(n)[0] for n in variants):
        ref = strategies.get(base, {})
        if ref:
            out.append(f"| {base} (base) | "
                       + " | ".join(with_se(ref, k) for k, _ in keys) + " |")
        for name in (n for n in variants if parse_variant(n)[0] == base):
            cells = []
            for k, _ in keys:
                v, b, se = strategies[name].get(k), ref.get(k), ref.get(f"{k}_se")
                if v is None or b is None:
                    cells.append(with_se(strategies[name], k))
                    continue
                d = 4 if 0 < abs(v) < 0.01 else 3
                z = f", {(v - b) / se:+.1f} SE" if se else ""
                cells.append(f"{v:.{d}f} ({v - b:+.{d}f}{z})")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    """The report: the HitRate@20 leaderboard, the headline metrics, per-class
    precision/recall/F1 with PR-AUC, ranking by tier and by the target's class; best per
    column in bold."""
    strategies: dict[str, dict[str, Any]] = result["strategies"]
    runs = " | ".join(f"{n}: {m.get('finetunes', 0)}/{m.get('promotions', 0)}"
                      for n, m in strategies.items() if m.get("finetunes"))
    cfg = result["config"]
    shares = ", ".join(f"{c} {100 * v:.2f} %" for c, v in result["class_shares"].items())
    known = result.get("known", {})
    first = next(iter(strategies.values()), {})
    ablated = ablations(strategies)
    return "\n".join([
        f"### {result['dataset']}",
        "",
        f"{result['events']:,} interactions, {result['catalogue_items']:,} items, "
        f"{known.get('searches', 0):,} searches, "
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
        f"Leak-free: each list may hold only the items known at its moment. Scored lists: "
        f"{first.get('ranked', 0):,}, of which {first.get('ranked_cold', 0):,} have a target "
        f"nobody had interacted with or announced before (no strategy can hit those; "
        f"*warm* is HitRate@20 without them, *tail* on tail-tier targets) and "
        f"{first.get('ranked_search', 0):,} directly follow a search (MAP@5). Every "
        f"HitRate is ± one standard error.",
        "",
        *leaderboard(strategies), "",
        *versus_peers(strategies), *versus_first(strategies), *blend_summary(result), "",
        *counterfactual_lines(result), "",
        *(["Ablations: each variant ran the same replay with the settings in its name "
           "(difference from the base, in the base's standard errors):", "",
           *ablated, ""] if ablated else []),
        *table(strategies, TABLE_METRICS), "",
        "Per class (precision P, recall R, F1) and PR-AUC of p(cart), p(purchase):",
        "",
        *table(strategies, CLASS_METRICS), "",
        "Ranking (MRR within the 20-item list) overall and by tier of the interacted item:",
        "",
        *table(strategies, RANK_METRICS), "",
        "HitRate@20 by the event class of the interacted item:",
        "",
        *table(strategies, CLASS_HIT_METRICS), "",
        "Minority macro-recall by block (the block's own purchase share beside it):",
        "",
        *minority_by_block(result), "",
        f"Fine-tunes / promotions: {runs or 'none'}. Wall time "
        f"{cfg.get('seconds', 0.0):.0f} s.",
        "",
        *(f"* promotion gate ({name}), after block {d['block']} "
          f"({', '.join(d.get('triggers', [])) or 'no trigger'}): {d['reason']}"
          + ("; the served model's decision thresholds refitted on the window"
             if d.get("decisions_refreshed") else "")
          for name, decisions in result.get("gate", {}).items() for d in decisions),
        "",
    ])
