"""Which strategies ``tailstream eval`` knows, and its run config (torch-free, so the
command line can list them without loading the model; what each strategy does is in
:mod:`~tailstream.evaluation.strategies`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StrategySpec:
    kind: str  # popularity | river | transformer | peer
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
    # Well-known peers (evaluation/peers.py, evaluation/factors.py): lists only.
    "trending": StrategySpec("peer"),
    "covisitation": StrategySpec("peer"),
    "als": StrategySpec("peer"),
    "bpr": StrategySpec("peer"),
    "query_lookup": StrategySpec("peer"),
}


def split_strategies(text: str) -> list[str]:
    """Names from ``--strategies``: commas split, except inside a variant's brackets.

    >>> split_strategies("ce, adaptive[tail_share=0,weight_gamma=1],river")
    ['ce', 'adaptive[tail_share=0,weight_gamma=1]', 'river']
    """
    out, depth, part = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(part)
            part = ""
        else:
            part += ch
    out.append(part)
    return [p.strip() for p in out if p.strip()]


def parse_variant(name: str) -> tuple[str, dict[str, str]]:
    """A strategy name and its settings overrides: ``adaptive[tail_share=0]`` is the
    ``adaptive`` strategy with ``TAILSTREAM_TAIL_SHARE=0`` for its own run only — an
    ablation in the same replay, scored beside the others. The overrides reach what the
    strategy does itself (its ranking, fine-tune, decision layer, policy selector); the
    shared replay of the worker state (class counts, triggers, the loop's published
    policy, the river path) runs once with the command's settings: vary those with a
    separate run.

    >>> parse_variant("adaptive[tail_share=0, weight_gamma=1]")
    ('adaptive', {'tail_share': '0', 'weight_gamma': '1'})
    >>> parse_variant("ce")
    ('ce', {})
    """
    if not name.endswith("]") or "[" not in name:
        return name, {}
    base, _, body = name[:-1].partition("[")
    pairs = [p.partition("=") for p in body.split(",") if p.strip()]
    if any(not eq or not k.strip() for k, eq, _ in pairs):
        raise ValueError(f"{name!r}: overrides are KEY=VALUE, comma-separated")
    return base.strip(), {k.strip(): v.strip() for k, _, v in pairs}


def spec_of(name: str) -> StrategySpec:
    """The spec behind a name or a variant of it (KeyError when unknown)."""
    return STRATEGIES[parse_variant(name)[0]]


@dataclass(frozen=True)
class PeerConfig:
    """The peers' settings, the same for every log (clocks count interactions, so a
    window does not depend on a log's event rate). Chosen by a small sweep on the Taobao
    subset and the synthetic shop (docs/evaluation.md): tuned on the data they are scored
    on, which can only flatter the peers."""

    trending_half_life: float = 10000.0
    """Interactions after which an interaction counts half in ``trending`` (about 12
    minutes of the Taobao log, a sixth of the synthetic shop's 60,000 events)."""
    covis_window: int = 5
    """How many of the user's most recent distinct items pair with a new interaction."""
    covis_half_life: float = 20000.0
    """Interactions after which a co-visit counts half."""
    covis_backward: float = 0.5
    """Weight of "j was preceded by i" relative to "i was followed by j"."""
    covis_neighbours: int = 50
    factors: int = 64
    als_iterations: int = 15
    als_regularization: float = 0.05
    alpha: float = 10.0
    """Confidence per unit of event-class weight (click 1, fav 2, cart 3, purchase 4)."""
    bpr_iterations: int = 50
    bpr_learning_rate: float = 0.05
    bpr_regularization: float = 0.01
    fold_in_regularization: float = 0.1
    query_follow: int = 5
    """Interactions after a search that count for its query (until the next search)."""
    query_ngram: int = 3
    query_neighbours: int = 10
    query_min_similarity: float = 0.3


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
    peers: PeerConfig = field(default_factory=PeerConfig)
