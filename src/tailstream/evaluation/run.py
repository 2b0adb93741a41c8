"""``tailstream eval``: replay a log (or the synthetic shop), run every strategy, write
``eval.json``, ``report.md`` and the charts."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailstream.evaluation import charts, report
from tailstream.evaluation.results import StrategyResult, summarise
from tailstream.evaluation.specs import STRATEGIES, EvalConfig, parse_variant, spec_of
from tailstream.evaluation.strategies import Harness
from tailstream.evaluation.stream import collect
from tailstream.producers.records import ProducedRecord
from tailstream.producers.replay import LogSpec
from tailstream.settings import Settings


@dataclass(frozen=True)
class Source:
    """Where the events come from: a log file, or the synthetic shop."""

    log: LogSpec | None = None
    users: int = 2000
    items: int = 5000
    seed: int = 0
    sale_at: int | None = None
    """Synthetic shop: carts are bought twice as often from this record on."""

    def records(self) -> tuple[Iterable[ProducedRecord], str]:
        """The records and a name for the report."""
        if self.log is not None:
            return iter(self.log.reader()), self.log.name
        from tailstream.producers.synthetic import ShopSimulator

        tick = itertools.count()
        sim = ShopSimulator(n_users=self.users, n_items=self.items, seed=self.seed,
                            clock=lambda: 1.7e9 + next(tick) / 300.0, sale_at=self.sale_at)
        sale = f", purchases doubled from record {self.sale_at:,}" if self.sale_at else ""
        return (itertools.chain(sim.catalogue(), sim.events()),
                f"synthetic shop ({self.users} users, {self.items} items, seed {self.seed}"
                f"{sale})")


def check_strategies(names: Sequence[str]) -> None:
    """Refuse unknown strategies, and variants whose overrides are not settings or that
    change a strategy without settings of its own (the peers, river, popularity)."""
    from tailstream.settings import Settings

    unknown = [s for s in names if parse_variant(s)[0] not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
    for name in names:
        base, overrides = parse_variant(name)
        if not overrides:
            continue
        if STRATEGIES[base].kind != "transformer":
            raise SystemExit(f"{name}: only the transformer strategies take overrides")
        try:
            Settings().replace(**overrides)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"{name}: {exc}") from None


def run_eval(settings: Settings, source: Source, cfg: EvalConfig, out_dir: Path, *,
             events: int | None, command: str) -> tuple[dict[str, Any], str, list[Path]]:
    """Run the evaluation; returns the result, the markdown report and the chart paths
    (all written under ``out_dir``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    check_strategies(cfg.strategies)
    records, dataset = source.records()
    if source.log is None:
        events = events or 60_000
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    columns = (*Progress.get_default_columns()[:2], BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("replaying through the worker state", total=events)
        stream = collect(records, settings, blocks=cfg.blocks, rank_every=cfg.rank_every,
                         max_events=events, progress=lambda n: bar.advance(task, n))
        bar.update(task, total=len(stream.interactions), completed=len(stream.interactions))
        harness = Harness(stream, settings, cfg, out_dir)
        if any(spec_of(s).kind == "transformer" for s in cfg.strategies):
            texts = len(set(stream.item_text.values())) + len(stream.interactions)
            task = bar.add_task("encoding texts (frozen encoder, shared)", total=texts)
            harness.encode_all(lambda n: bar.advance(task, n))
            bar.update(task, completed=texts)
        task = bar.add_task("strategies", total=len(cfg.strategies))
        results: dict[str, StrategyResult] = {}
        for name in cfg.strategies:
            bar.update(task, description=f"strategy {name}")
            results[name] = harness.run(name)
            bar.advance(task)
    result = summarise(stream, results, dataset, cfg,
                       {"seconds": round(time.monotonic() - started, 1),
                        "device": str(harness.device),
                        "finetune_layers": harness.settings.finetune_layers})
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    paths = charts.charts(result, out_dir)
    md = report.markdown(result, command)
    md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in paths) + "\n"
    (out_dir / "report.md").write_text(md)
    return result, md, paths
