"""The hybrid lists' stateful sources alone: CPU microseconds per event and per list.

Trending and co-visitation (``models/serving/trending.py``, ``covisitation.py``) are
updated at every interaction a worker applies and read for every list it makes. This
script replays the synthetic shop's interactions through both, as ``Signals`` does (the
interaction count as the clock, the class weights of ``EVENT_WEIGHT``), then makes the
co-visitation list (50 items, the user's recent items left out) and the trending top 50
for the first ``--users`` users, under the worker's garbage-collector settings. CPU time
(``time.process_time``), the best of ``--repeats`` runs::

    .venv/bin/python tests/perf/signals_cpu.py --events 100000

To compare two builds, run it alternately on each (``git stash push -- models/``, run,
``git stash pop``, run). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import time
from typing import Any

from tailstream.models.serving.baseline import EVENT_WEIGHT
from tailstream.models.serving.covisitation import Covisitation
from tailstream.models.serving.trending import Trending
from tailstream.producers.synthetic import ShopSimulator
from tailstream.streams.worker.app import GC_THRESHOLDS

HALF_LIFE = 20_000.0  # interactions: the worker's default co-visitation half-life


def interactions(n: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(user, item, class weight) of the interactions among the shop's first ``n`` events."""
    out = []
    for record in itertools.islice(ShopSimulator(n_users=20_000, n_items=5000,
                                                 seed=seed).events(), n):
        if record.malformed:
            continue
        event = json.loads(record.value)
        if event.get("item_id"):
            out.append((event["user_id"], event["item_id"],
                        EVENT_WEIGHT.get(record.kind, 1.0)))
    return out


def one_run(stream: list[tuple[str, str, float]], users: list[str]) -> tuple[float, float]:
    """CPU µs per interaction (updates) and per user (the two lists)."""
    trending, covisitation = Trending(HALF_LIFE), Covisitation(HALF_LIFE)
    started = time.process_time()
    for t, (user, item, weight) in enumerate(stream):
        trending.observe(item, float(t), weight)
        covisitation.observe(user, item, float(t), weight)
    updates = time.process_time() - started
    started = time.process_time()
    for user in users:
        recent = covisitation.recent(user)
        covisitation.recommend(recent, 50, recent)
        trending.top(50, recent)
    lists = time.process_time() - started
    return updates / len(stream) * 1e6, lists / len(users) * 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    gc.set_threshold(*GC_THRESHOLDS)
    stream = interactions(args.events)
    users = list(dict.fromkeys(user for user, _, _ in stream))[:args.users]
    runs = [one_run(stream, users) for _ in range(args.repeats)]
    result = {"interactions": len(stream), "users": len(users),
              "us_per_interaction": round(min(u for u, _ in runs), 2),
              "us_per_list": round(min(r for _, r in runs), 1),
              "runs": [[round(u, 2), round(r, 1)] for u, r in runs]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
