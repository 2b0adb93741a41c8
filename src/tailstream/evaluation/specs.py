"""Which strategies ``tailstream eval`` knows, and its run config (torch-free, so the
command line can list them without loading the model; what each strategy does is in
:mod:`~tailstream.evaluation.strategies`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
