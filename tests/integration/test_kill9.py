"""Nothing lost, nothing counted twice: `kill -9` the worker several times under load.

A producer thread sends a steady stream (with deliberate producer-retry duplicates) while
the worker is killed with SIGKILL at random points and restarted. A verifier then reads
the audit topic (the event_ids whose effects are in the state, per batch) and the
recovered class counts: every produced event_id must be there, and the counts must equal
the number of *distinct* interaction events exactly — no loss from unsaved state, no
double count from replayed offsets or duplicates.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from kafka.partitioner.default import murmur2

from tailstream.contract import INTERACTION_KINDS
from tailstream.producers.records import ProducedRecord
from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import start_worker, wait_ready

from .conftest import audit, imbalance, metrics, read_until, wait_metric

pytestmark = pytest.mark.integration

KILLS = 3
RATE = 300.0  # events/s, for as long as the kills and restarts take
DUPLICATE_EVERY = 40  # a producer retry: the same record (same event_id) sent again


def class_counts(ws: Settings) -> dict[str, int]:
    return {k: int(v) for k, v in imbalance(ws)["class_counts"].items()}


def wait_processing(ws: Settings, timeout: float = 60) -> None:
    """Until this worker process has processed events itself (it is mid-stream)."""
    wait_metric(ws, "tailstream_events_processed_total", 50, timeout,
                "the restarted worker to process events")


class Workload:
    """An endless shop stream with producer retries (every ``DUPLICATE_EVERY``-th record
    sent twice), remembering every record it hands out, in order."""

    def __init__(self, seed: int) -> None:
        self.sim = ShopSimulator(n_users=400, n_items=800, seed=seed)
        self.pulled: list[ProducedRecord] = []

    def __iter__(self) -> Iterator[ProducedRecord]:
        for n, rec in enumerate(self.sim.events()):
            self.pulled.append(rec)
            yield rec
            if n % DUPLICATE_EVERY == DUPLICATE_EVERY - 1:
                self.pulled.append(rec)
                yield rec

    def partition_of(self, n: int, partitions: int) -> dict[str, str]:
        """``kind[partition]`` of each event_id among the first ``n`` records (as the
        producer's default partitioner places its key): where a loss happened."""
        return {json.loads(rec.value)["event_id"]:
                f"{rec.kind}[{(murmur2(rec.key.encode()) & 0x7FFFFFFF) % partitions}]"
                for rec in self.pulled[:n]}

    def sent(self, n: int) -> tuple[list[str], Counter[str]]:
        """Distinct event_ids of the first ``n`` records (the ones sent, in order) and the
        class counts they must produce."""
        ids: dict[str, str] = {}
        for rec in self.pulled[:n]:
            ids[json.loads(rec.value)["event_id"]] = rec.kind
        return list(ids), Counter(k for k in ids.values() if k in INTERACTION_KINDS)


def test_kill_9_under_load_loses_nothing_and_counts_once(topics: Settings) -> None:
    ws = topics.replace(scorer="baseline", audit_processed=True)
    load = Workload(seed=5)
    rng = random.Random(9)

    proc, ws = start_worker(ws)
    procs: list[ManagedProcess] = [proc]
    stop = threading.Event()
    sent: dict[str, Any] = {}

    def produce() -> None:
        sent["stats"] = send_records(load, ws, rate=RATE, stop=stop)

    try:
        wait_ready(proc, ws, partitions=ws.input_partitions)
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        kills: list[dict[str, float]] = []
        skipped: Counter[str] = Counter()  # summed over the killed processes
        for _ in range(KILLS):
            wait_processing(ws)
            # Not a wait for a condition: the kill falls at a random point in the stream.
            time.sleep(rng.uniform(1.0, 4.0))
            last = metrics(ws)
            procs[-1].kill()  # SIGKILL: no shutdown code, no final commit or flush
            t0 = time.monotonic()
            proc, ws = start_worker(ws)
            procs.append(proc)
            # A lone worker must hold every input partition: one left to the killed
            # member would have its events silently never read.
            wait_ready(proc, ws, partitions=ws.input_partitions)
            for name in ("tailstream_replayed_messages_total", "tailstream_duplicates_total"):
                skipped[name] += int(last.get(name, 0))
            kills.append({"processed_by_killed_worker":
                          last.get("tailstream_events_processed_total", 0.0),
                          "restart_s": round(time.monotonic() - t0, 2)})
        # The load runs until the last restarted worker has processed some of it, so
        # every kill falls inside it however long the restarts take.
        wait_processing(ws)
        # Not a wait for a condition: the load runs on for 2 s more (scenario time), so
        # the last worker reads live traffic, not only the backlog of the kills.
        time.sleep(2.0)
        stop.set()
        producer.join(timeout=60)
        assert not producer.is_alive(), "producer did not stop"
        stats = sent["stats"]
        event_ids, expected = load.sent(stats.sent)
        assert len(event_ids) >= 5000, "too little load to mean anything"
        records_sent = stats.sent
        assert stats.failed == 0

        # Until the counts are the distinct events' (the report below says how they are
        # not, if they never get there).
        counts = read_until(lambda: class_counts(ws),
                            lambda c: c == {k: expected.get(k, 0) for k in c}, timeout=90)
        final = metrics(ws)

        # The verifier: every distinct event_id must be in the audit (applied, or held by
        # the recovered state when its message was replayed).
        applied, replayed = audit(ws, idle_timeout=3.0)
        seen = set(applied) | replayed
        lost = [e for e in event_ids if e not in seen]
        reapplied = sum(1 for n in applied.values() if n > 1)
        where = load.partition_of(stats.sent, ws.partitions)
        report = {
            "kills": kills, "records_sent": records_sent, "distinct_events": len(event_ids),
            "producer_duplicates": records_sent - len(event_ids),
            "expected_counts": dict(expected), "recovered_counts": counts,
            "lost_event_ids": len(lost),
            "double_counts": sum(counts.values()) - sum(expected.values()),
            "ids_reapplied_after_lost_state": reapplied,
            "replayed_messages_skipped": skipped["tailstream_replayed_messages_total"]
            + int(final.get("tailstream_replayed_messages_total", 0)),
            "duplicates_skipped": skipped["tailstream_duplicates_total"]
            + int(final.get("tailstream_duplicates_total", 0)),
            "lost_by_partition": dict(Counter(where[e] for e in lost)),
            "final_worker_partitions": final.get("tailstream_assigned_partitions"),
            "final_worker_lag": {k: v for k, v in final.items()
                                 if k.startswith("tailstream_consumer_lag") and v},
            "worker_log": str(procs[-1].log_path),
        }
        print("\nkill -9 report:", json.dumps(report, indent=1))
        assert len(kills) == KILLS
        assert report["duplicates_skipped"] > 0  # the producer retries were seen and skipped
        assert lost == [], f"{len(lost)} event_ids never processed, e.g. {lost[:5]}"
        assert counts == {c: expected.get(c, 0) for c in counts}, "counts != distinct events"
    finally:
        stop.set()
        for p in procs:
            p.stop()
