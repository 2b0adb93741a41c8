"""``tailstream tune``: Bayesian search over the loop's knobs on a replay, written as a
settings file that ``up``, ``demo`` and ``eval`` take (``--settings FILE``).

Each trial replays the log (or the synthetic shop) through the worker's state with the
trial's settings and runs one strategy of ``tailstream eval`` (``adaptive`` by default:
the production loop), test-then-train as the evaluation always does; its score is one
metric of ``eval.json`` (HitRate@20 by default). optuna's TPE sampler (Bergstra et al.,
"Algorithms for Hyper-Parameter Optimization", NeurIPS 2011) proposes the next trial
from the ones so far. The frozen encoder's text vectors are computed once and shared by
every trial.

The search space (:data:`SPACE`) is the loop's own knobs: the loss policies' parameters
(β, γ, τ), the tail quota, the fine-tune's learning rate and steps, the blender's step and
the live prior's half-life. Tuning on the log you will serve is the point; the report
says how much of the gain is noise (the best trial's standard error).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tailstream.evaluation.results import summarise
from tailstream.evaluation.run import Source
from tailstream.evaluation.specs import STRATEGIES, EvalConfig
from tailstream.evaluation.strategies import Harness
from tailstream.evaluation.stream import collect
from tailstream.settings import ENV_PREFIX, Settings


@dataclass(frozen=True)
class Knob:
    low: float
    high: float
    log: bool = False
    integer: bool = False


SPACE: dict[str, Knob] = {
    "weight_beta": Knob(0.9, 0.99999),
    "weight_gamma": Knob(0.5, 4.0),
    "weight_tau": Knob(0.25, 2.0),
    "tail_share": Knob(0.0, 0.5),
    "finetune_lr": Knob(1e-4, 1e-2, log=True),
    "finetune_max_steps": Knob(30, 300, log=True, integer=True),
    "rank_blend_lr": Knob(0.03, 1.0, log=True),
    "decision_prior_half_life": Knob(300.0, 20_000.0, log=True),
}
"""Settings field → range searched."""
LOWER_IS_BETTER = frozenset({"exposure_gini", "ms_per_event"})


@dataclass
class TuneResult:
    best: dict[str, Any]
    value: float
    se: float | None
    trials: list[dict[str, Any]]
    seconds: float


def suggest(trial: Any) -> dict[str, Any]:
    """The trial's settings overrides (one value per :data:`SPACE` knob)."""
    out: dict[str, Any] = {}
    for name, k in SPACE.items():
        if k.integer:
            out[name] = trial.suggest_int(name, int(k.low), int(k.high), log=k.log)
        else:
            out[name] = trial.suggest_float(name, k.low, k.high, log=k.log)
    return out


def tune(settings: Settings, source: Source, cfg: EvalConfig, *, trials: int,
         metric: str = "hit_at_20", strategy: str = "adaptive", events: int | None = None,
         seed: int = 0, say: Callable[[str], None] = print) -> TuneResult:
    """Run ``trials`` trials; returns the best settings and every trial's value."""
    import optuna

    if strategy not in STRATEGIES:
        raise SystemExit(f"unknown strategy {strategy!r}; known: {list(STRATEGIES)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize" if metric in LOWER_IS_BETTER
                                else "maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    shared: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    started = time.monotonic()

    def objective(trial: Any) -> float:
        values = suggest(trial)
        trial_settings = settings.replace(**values)
        run_cfg = replace(cfg, strategies=[strategy], steps=int(values["finetune_max_steps"]))
        metrics = _run_one(trial_settings, source, run_cfg, events, shared, strategy)
        value = metrics.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise SystemExit(f"metric {metric!r} is not in the result (known: "
                             f"{sorted(k for k, v in metrics.items() if v is not None)})")
        history.append({"trial": trial.number, "value": float(value),
                        "se": metrics.get(f"{metric}_se"), **values})
        say(f"trial {trial.number}: {metric} = {float(value):.4f}")
        return float(value)

    study.optimize(objective, n_trials=trials)
    best = history[study.best_trial.number]
    return TuneResult({k: best[k] for k in SPACE}, best["value"], best.get("se"), history,
                      time.monotonic() - started)


def _run_one(settings: Settings, source: Source, cfg: EvalConfig, events: int | None,
             shared: dict[str, Any], strategy: str) -> dict[str, Any]:
    records, dataset = source.records()
    stream = collect(records, settings, blocks=cfg.blocks, rank_every=cfg.rank_every,
                     max_events=events or (None if source.log else 60_000))
    harness = Harness(stream, settings, cfg, Path(shared.setdefault("dir", _tmpdir())))
    if STRATEGIES[strategy].kind == "transformer":
        if "base" in shared:  # the frozen encoder and its vectors, from the first trial
            harness.share_base(*shared["base"])
        harness.encode_all()  # cached texts are not encoded again
        shared["base"] = harness.base()
    result = summarise(stream, {strategy: harness.run(strategy)}, dataset, cfg, {})
    metrics: dict[str, Any] = result["strategies"][strategy]
    return metrics


def _tmpdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="tailstream-tune-")


def write_settings(path: Path, result: TuneResult, *, metric: str, command: str) -> None:
    """The best trial as ``TAILSTREAM_X=value`` lines, with how they were found."""
    se = f" ± {result.se:.4f}" if result.se is not None else ""
    lines = [f"# tailstream tune: best of {len(result.trials)} trials, {metric} = "
             f"{result.value:.4f}{se} ({result.seconds:.0f} s)",
             f"# {command}"]
    for name, value in result.best.items():
        text = str(int(value)) if SPACE[name].integer else f"{value:.6g}"
        lines.append(f"{ENV_PREFIX}{name.upper()}={text}")
    path.write_text("\n".join(lines) + "\n")
