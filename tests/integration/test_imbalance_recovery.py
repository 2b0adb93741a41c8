"""Class counts and the minority buffer survive `kill -9` of the worker (changelog + Redis)."""

from __future__ import annotations

import itertools
import json

import pytest

from tailstream.contract import INTERACTION_KINDS
from tailstream.kafka_io import iter_messages, reader
from tailstream.producers.sender import SendStats, send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import start_worker, wait_ready

from .conftest import (
    imbalance,
    metric,
    metrics,
    poll,
    producer,
    read_until,
    wait_committed,
    wait_metric,
)

pytestmark = pytest.mark.integration


def wait_processed(ws: Settings, n: int, timeout: float = 90) -> None:
    wait_metric(ws, "tailstream_events_in_total", n, timeout, f"the worker to read {n} events")


def send_settled(ws: Settings, sim: ShopSimulator, n: int, read_before: int = 0) -> SendStats:
    """Send ``n`` events and wait until the worker read them and committed their offsets
    (Faust flushes the changelog first: a restart recovers all of it)."""
    stats = send_records(itertools.islice(sim.events(), n), ws)
    wait_processed(ws, read_before + stats.sent)
    wait_committed(ws)
    return stats


def test_counts_and_buffer_recovered_after_kill_9(
        worker: tuple[ManagedProcess, Settings]) -> None:
    proc, ws = worker
    sim = ShopSimulator(n_users=300, n_items=500, seed=11)
    send_settled(ws, sim, 4000)
    before = imbalance(ws)
    assert sum(before["class_counts"].values()) > 3000
    assert before["buffer_sizes"]["purchase"] > 0

    proc.kill()  # SIGKILL: no shutdown code runs
    again, ws2 = start_worker(ws)
    try:
        wait_ready(again, ws2)
        after = read_until(lambda: imbalance(ws2),
                           lambda a: a["class_counts"] == before["class_counts"], timeout=30)
        print("\nbefore kill:", before["class_counts"], before["buffer_sizes"],
              "\nafter restart:", after["class_counts"], after["buffer_sizes"])
        assert after["class_counts"] == before["class_counts"]
        assert after["buffer_sizes"] == before["buffer_sizes"]

        # And it keeps counting from there, not from zero: until the new events' classes
        # are in the counts.
        more = send_records(itertools.islice(sim.events(), 500), ws2)
        wait_processed(ws2, more.sent)
        counted = sum(before["class_counts"].values()) + sum(
            n for kind, n in more.by_kind.items() if kind in INTERACTION_KINDS)

        def total() -> int:
            return int(sum(imbalance(ws2)["class_counts"].values()))

        poll(lambda: total() >= counted, 30, f"class counts to reach {counted}",
             detail=lambda: f"class counts {imbalance(ws2)['class_counts']}")
        assert total() == counted > sum(before["class_counts"].values())
    finally:
        again.stop()


def test_weights_are_readable_by_the_trainer_from_redis(
        worker: tuple[ManagedProcess, Settings]) -> None:
    import redis

    _, ws = worker
    sim = ShopSimulator(n_users=100, n_items=200, seed=12)
    stats = send_records(itertools.islice(sim.events(), 1500), ws)
    wait_processed(ws, stats.sent)
    m = metrics(ws)
    interactions = sum(m.get(f"tailstream_events_processed_total{{kind={k}}}", 0)
                       for k in ("click", "cart", "fav", "purchase"))
    r = redis.Redis.from_url(ws.redis_url.reveal(), decode_responses=True)

    def stored_counts() -> float:
        raw = r.hget(f"{ws.redis_prefix}:weights", "counts")
        return sum(json.loads(raw).values()) if raw else 0.0

    # The stored weights trail the last batch by at most a second (timer): wait for the
    # ones computed from every event (decayed counts: a hair under the raw total).
    read_until(stored_counts, lambda n: n >= 0.99 * interactions, timeout=10, interval=0.2)
    stored = r.hgetall(f"{ws.redis_prefix}:weights")
    r.close()
    assert sum(json.loads(stored["counts"]).values()) >= 0.99 * interactions
    weights = json.loads(stored["weights"])
    assert json.loads(stored["policy"])["policy"] == ws.weight_policy
    assert weights["purchase"] > weights["click"]
    assert set(json.loads(stored["counts"])) == {"click", "cart", "fav", "purchase"}


def last_counts_records(ws: Settings) -> dict[int, tuple[bytes, bytes]]:
    """The newest record of each partition of the counts' changelog."""
    consumer = reader(ws, [f"{ws.app_id}-imbalance-counts-changelog"])
    try:
        return {m.partition: (m.key, m.value)
                for m in iter_messages(consumer, idle_timeout=1.5)}
    finally:
        consumer.close()


def append_counts_records(ws: Settings, records: dict[int, tuple[bytes, bytes]]) -> None:
    out = producer(ws)
    try:
        for partition, (key, value) in records.items():
            out.send(f"{ws.app_id}-imbalance-counts-changelog", key=key, value=value,
                     partition=partition)
        out.flush()
    finally:
        out.close()


def test_counts_resume_where_they_end_when_the_commit_is_ahead(
        worker: tuple[ManagedProcess, Settings]) -> None:
    """The group's committed offsets are past messages the recovered counts do not hold
    (the changelog's last record of the counts behind the commit: a commit that did not
    wait for it, then a crash): the restarted worker reads again from where the counts
    end and counts every message once — not from the committed offset."""
    proc, ws = worker
    sim = ShopSimulator(n_users=200, n_items=300, seed=12)
    first = send_settled(ws, sim, 1500)
    older = last_counts_records(ws)
    assert older, "no counts in the changelog"
    send_settled(ws, sim, 800, read_before=first.sent)
    counted = sum(imbalance(ws)["class_counts"].values())
    proc.stop()
    # The changelog's newest counts are the older ones again: its records of the last
    # 800 events never arrived, while the offsets committed cover them.
    append_counts_records(ws, older)

    again, ws2 = start_worker(ws)
    try:
        wait_ready(again, ws2)

        def total() -> int:
            return int(sum(imbalance(ws2)["class_counts"].values()))

        poll(lambda: total() >= counted, 60, f"class counts to reach {counted}",
             detail=lambda: f"class counts {imbalance(ws2)['class_counts']}")
        assert total() == counted
        assert metric(ws2, "tailstream_inputs_behind_commit_total") >= 1
    finally:
        again.stop()
