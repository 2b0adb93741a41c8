"""The worker's hybrid lists alone: CPU milliseconds per list, in one process.

``tailstream bench serve`` times the real worker behind a broker on a shared machine; its
lists/s moved from 141 to 178 between runs of one build (stop 40). A serve worker is bound
by its one interpreter: the Python around the model — each user's stateful sources, the
union, the facts, the selection, the list dicts — runs on the event loop or holds the
interpreter on the torch thread. This script times :meth:`Refresher.score` (what a
scoring turn runs: requests and sources on the loop, then
:func:`~tailstream.models.serving.hybrid.hybrid_recommend`) over the users the synthetic
shop's events make wait, with the real encoder (all-MiniLM-L6-v2) and the unit tests'
in-memory fakes for Kafka and Redis (``tests/unit/test_pipeline.py``), every turn inline
on one thread, under the worker's garbage-collector settings. CPU time
(``time.process_time``; with ``--beside-busy``, that thread's), the best of ``--repeats``
passes over the same turns; the first pass, which encodes the users' queries, is
reported apart. ``--beside-busy`` adds a thread busy in Python (the event loop's part)
and reports the wall time per list, waits for the interpreter included::

    .venv/bin/python tests/perf/scoring_cpu.py --events 20000 --turn 40

To compare two builds, run it alternately on each. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_pipeline import Feed, make  # type: ignore[import-not-found]  # noqa: E402

from tailstream.metrics import Metrics  # noqa: E402
from tailstream.producers.synthetic import ShopSimulator  # noqa: E402
from tailstream.settings import Settings  # noqa: E402
from tailstream.streams.worker.app import GC_THRESHOLDS, SWITCH_INTERVAL_S  # noqa: E402
from tailstream.streams.worker.scoring import ScoringService  # noqa: E402

# The CPU time of this process: encodes stay in it (the worker's encoder process would
# take the first pass's query encodes out of the count).
SETTINGS: dict[str, Any] = {"scorer": "transformer", "device": "cpu",
                            "text_vectors_shared": False, "scoring_catchup_s": 0.0,
                            "refresh_rate": 500.0, "encoder_process": False}


async def prepared(settings: Settings, events: int, items: int
                   ) -> tuple[Any, ScoringService, list[str]]:
    """A pipeline with a loaded scorer that has read the catalogue and ``events`` events;
    the users they made wait, in queue order (the lists themselves not made)."""
    scoring = ScoringService(settings, Metrics())
    h = make(scoring=scoring, data_dir=settings.data_dir, **SETTINGS)
    h.pipeline.refresh_every_s = 1.0
    h.pipeline.gauges_every_s = 1.0
    waiting: dict[str, None] = {}

    async def remember(acted: Any) -> None:  # who would wait; the lists are timed later
        for user in acted:
            waiting.pop(user, None)
            waiting[user] = None

    h.pipeline.refresh.enqueue = remember
    await scoring.start()
    feed = Feed(h.settings)
    sim = ShopSimulator(n_users=20_000, n_items=items, seed=0)
    now = time.time()
    catalogue = [feed.msg("item", r.value, timestamp=now) for r in sim.catalogue()]
    for start in range(0, len(catalogue), 500):
        await h.pipeline.apply_catalogue(catalogue[start:start + 500])
    while await scoring.embed_pending(512):
        pass
    msgs = [feed.msg(r.kind, r.value, timestamp=now)
            for r in itertools.islice(sim.events(), events)]
    for start in range(0, len(msgs), 200):
        await h.pipeline.process(msgs[start:start + 200])
    return h.pipeline, scoring, list(waiting)


async def timed(pipeline: Any, users: list[str], turn: int, repeats: int,
                cpu: Callable[[], float] = time.process_time
                ) -> tuple[list[float], list[float]]:
    """CPU (``cpu``) and wall seconds of each pass of :meth:`Refresher.score` over
    ``users``, ``turn`` at a time, inline (as a turn the latency budget fits runs)."""
    passes, walls = [], []
    for _ in range(repeats):
        began, wall = cpu(), time.perf_counter()
        for start in range(0, len(users), turn):
            await pipeline.refresh.score(users[start:start + turn], inline=True)
        passes.append(cpu() - began)
        walls.append(time.perf_counter() - wall)
    return passes, walls


def busy_thread() -> threading.Event:
    """A thread that runs Python until the event is set: in a worker the event loop keeps
    the interpreter busy beside the torch thread, so every call that gives the
    interpreter up (a torch operation, a numpy sort or copy) waits up to the switch
    interval to get it back; the wall time then counts those waits."""
    stop = threading.Event()

    def run() -> None:
        d: dict[int, int] = {}
        while not stop.is_set():
            for i in range(1000):
                d[i % 97] = i

    threading.Thread(target=run, daemon=True).start()
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--users", type=int, default=2000, help="lists per pass")
    parser.add_argument("--turn", type=int, default=40, help="users per scoring turn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beside-busy", action="store_true",
                        help="a thread busy in Python beside the turns, at the worker's "
                             "switch interval: the wall time per list then counts the "
                             "waits for the interpreter")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings().replace(data_dir=tmp, **SETTINGS)
        pipeline, scoring, waiting = asyncio.run(prepared(settings, args.events, args.items))
        users = waiting[-args.users:]
        gc.freeze()  # as the worker does (streams/worker/app.py: tune_gc)
        gc.set_threshold(*GC_THRESHOLDS)
        stop = None
        if args.beside_busy:
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            stop = busy_thread()
        try:
            # Beside the busy thread, this thread's CPU only (the turns run inline on it).
            cpu = time.thread_time if args.beside_busy else time.process_time
            passes, walls = asyncio.run(timed(pipeline, users, args.turn, args.repeats + 1,
                                              cpu))
        finally:
            if stop is not None:
                stop.set()
            scoring.close()
    best = min(passes[1:])
    print(json.dumps({
        "events": args.events, "items": args.items, "lists": len(users), "turn": args.turn,
        "ms_per_list": round(best / len(users) * 1e3, 3),
        "lists_per_cpu_s": round(len(users) / best, 1),
        "first_pass_ms_per_list": round(passes[0] / len(users) * 1e3, 3),
        "passes_ms_per_list": [round(p / len(users) * 1e3, 3) for p in passes[1:]],
        "beside_busy": args.beside_busy,
        "wall_ms_per_list": [round(w / len(users) * 1e3, 3) for w in walls[1:]]}))


if __name__ == "__main__":
    main()
