"""Class counts and the minority buffer survive `kill -9` of the worker (changelog + Redis)."""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
from typing import Any

import pytest

from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import metrics_url, scrape, start_worker, wait_ready

pytestmark = pytest.mark.integration


def imbalance(ws: Settings) -> dict[str, Any]:
    url = f"http://{ws.web_host}:{ws.web_port}/imbalance"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return dict(json.loads(resp.read()))


def wait_processed(ws: Settings, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while scrape(metrics_url(ws)).get("tailstream_events_in_total", 0) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"worker did not read {n} events")
        time.sleep(0.2)


def test_counts_and_buffer_recovered_after_kill_9(
        worker: tuple[ManagedProcess, Settings]) -> None:
    proc, ws = worker
    sim = ShopSimulator(n_users=300, n_items=500, seed=11)
    stats = send_records(itertools.islice(sim.events(), 4000), ws)
    wait_processed(ws, stats.sent)
    time.sleep(4)  # past Faust's commit interval: offsets and changelog are flushed
    before = imbalance(ws)
    assert sum(before["class_counts"].values()) > 3000
    assert before["buffer_sizes"]["purchase"] > 0

    proc.kill()  # SIGKILL: no shutdown code runs
    again, ws2 = start_worker(ws)
    try:
        wait_ready(again, ws2)
        deadline = time.monotonic() + 30
        after = imbalance(ws2)
        while after["class_counts"] != before["class_counts"] and time.monotonic() < deadline:
            time.sleep(0.5)
            after = imbalance(ws2)
        print("\nbefore kill:", before["class_counts"], before["buffer_sizes"],
              "\nafter restart:", after["class_counts"], after["buffer_sizes"])
        assert after["class_counts"] == before["class_counts"]
        assert after["buffer_sizes"] == before["buffer_sizes"]

        # And it keeps counting from there, not from zero.
        more = send_records(itertools.islice(sim.events(), 500), ws2)
        wait_processed(ws2, more.sent)
        time.sleep(1)
        total = sum(imbalance(ws2)["class_counts"].values())
        assert total > sum(before["class_counts"].values())
    finally:
        again.stop()


def test_weights_are_readable_by_the_trainer_from_redis(
        worker: tuple[ManagedProcess, Settings]) -> None:
    import redis

    _, ws = worker
    sim = ShopSimulator(n_users=100, n_items=200, seed=12)
    stats = send_records(itertools.islice(sim.events(), 1500), ws)
    wait_processed(ws, stats.sent)
    m = scrape(metrics_url(ws))
    interactions = sum(m.get(f"tailstream_events_processed_total{{kind={k}}}", 0)
                       for k in ("click", "cart", "fav", "purchase"))
    r = redis.Redis.from_url(ws.redis_url.reveal(), decode_responses=True)

    def stored_counts() -> float:
        raw = r.hget(f"{ws.redis_prefix}:weights", "counts")
        return sum(json.loads(raw).values()) if raw else 0.0

    # The stored weights trail the last batch by at most a second (timer): wait for the
    # ones computed from every event (decayed counts: a hair under the raw total).
    deadline = time.monotonic() + 10
    while stored_counts() < 0.99 * interactions and time.monotonic() < deadline:
        time.sleep(0.2)
    stored = r.hgetall(f"{ws.redis_prefix}:weights")
    r.close()
    assert sum(json.loads(stored["counts"]).values()) >= 0.99 * interactions
    weights = json.loads(stored["weights"])
    assert json.loads(stored["policy"])["policy"] == ws.weight_policy
    assert weights["purchase"] > weights["click"]
    assert set(json.loads(stored["counts"])) == {"click", "cart", "fav", "purchase"}
