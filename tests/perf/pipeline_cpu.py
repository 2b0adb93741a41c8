"""The worker's per-batch pipeline alone: CPU microseconds per event, in one process.

``tailstream bench ingest`` times the real worker behind a broker on a shared machine:
its ratios move by a third between two runs of the same build. This script times only
:meth:`Pipeline.process` — decode, validate, de-duplicate, state, the hybrid sources,
the imbalance loop and its buffer, per-batch closing — over the synthetic shop's events,
with the unit tests' in-memory fakes for Kafka and Redis (``tests/unit/test_pipeline.py``)
and no lists made (the refresh queue is not fed), under the worker's garbage-collector
settings. CPU time (``time.process_time``), the best of ``--repeats`` runs::

    .venv/bin/python tests/perf/pipeline_cpu.py --events 50000 --envelope 100
    .venv/bin/python tests/perf/pipeline_cpu.py --events 20000 --envelope 1

To compare two builds, run it alternately on each (the spread of one build is ~10 %).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_pipeline import Feed, make  # type: ignore[import-not-found]  # noqa: E402

from tailstream import configs  # noqa: E402
from tailstream.models.serving.signals import Signals  # noqa: E402
from tailstream.producers.synthetic import ShopSimulator  # noqa: E402
from tailstream.streams.worker import pipeline as pipeline_module  # noqa: E402
from tailstream.streams.worker.app import GC_THRESHOLDS  # noqa: E402
from tailstream.streams.worker.pipeline import RawMessage  # noqa: E402


def messages(feed: Feed, events: int, envelope: int) -> tuple[list[RawMessage],
                                                               list[RawMessage], int]:
    """The catalogue's messages, the events' messages (``envelope`` events of one kind
    per message when > 1, as ``bench ingest`` sends them) and the number of events."""
    sim = ShopSimulator(n_users=20_000, n_items=5000, seed=0)
    now = time.time()
    catalogue = [feed.msg("item", r.value, timestamp=now) for r in sim.catalogue()]
    pending: dict[str, list[bytes]] = {}
    out: list[RawMessage] = []
    sent = 0
    for rec in itertools.islice(sim.events(), events):
        values = pending.setdefault(rec.kind, [])
        values.append(rec.value)
        if len(values) >= envelope:
            value = values[0] if envelope == 1 else b"[" + b",".join(values) + b"]"
            out.append(feed.msg(rec.kind, value, timestamp=now))
            sent += len(values)
            del pending[rec.kind]
    return catalogue, out, sent


def once(events: int, envelope: int, batch: int) -> dict[str, Any]:
    """One run on a fresh pipeline: CPU seconds of ``process`` over all the batches."""
    h = make(scoring_catchup_s=2.0, refresh_rate=500.0)
    pipeline = h.pipeline
    pipeline.refresh_every_s = 1.0  # the worker's intervals, not the unit tests' zeros
    pipeline.gauges_every_s = 1.0
    pipeline.recompute_share = getattr(pipeline_module, "RECOMPUTE_SHARE", None)
    # A transformer worker feeds the hybrid lists' sources with every event.
    pipeline.state.signals = Signals(configs.signals_config(h.settings),
                                     pipeline.state.popularity)

    async def no_lists(acted: Any) -> None:  # the lists' cost is not the pipeline's
        return None

    pipeline.refresh.enqueue = no_lists
    catalogue, msgs, sent = messages(Feed(h.settings), events, envelope)

    async def main() -> float:
        for start in range(0, len(catalogue), 500):
            await pipeline.apply_catalogue(catalogue[start:start + 500])
        began = time.process_time()
        for start in range(0, len(msgs), batch):
            await pipeline.process(msgs[start:start + batch])
        return time.process_time() - began

    seconds = asyncio.run(main())
    return {"events": sent, "cpu_s": seconds, "dlq": len(h.dlq.letters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--envelope", type=int, default=100, help="events per message")
    parser.add_argument("--batch", type=int, default=None,
                        help="messages per batch (default: 200 single, 20 envelopes, "
                             "about what the worker takes from a backlog)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch = args.batch or (200 if args.envelope == 1 else 20)
    gc.freeze()  # as the worker does (streams/worker/app.py: tune_gc)
    gc.set_threshold(*GC_THRESHOLDS)
    runs = [once(args.events, args.envelope, batch) for _ in range(args.repeats)]
    best = min(r["cpu_s"] for r in runs)
    sent = runs[0]["events"]
    print(json.dumps({
        "events": sent, "envelope": args.envelope, "messages_per_batch": batch,
        "us_per_event": round(best / sent * 1e6, 2),
        "events_per_cpu_s": round(sent / best),
        "runs_us_per_event": [round(r["cpu_s"] / sent * 1e6, 2) for r in runs],
        "dlq": runs[0]["dlq"]}))


if __name__ == "__main__":
    main()
