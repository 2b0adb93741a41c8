"""A group member that holds partitions but answers nothing: seen, and its partitions
end up read by a live worker.

Two workers share the input partitions; one is frozen (SIGSTOP: alive to the OS, silent
to the group). The live worker's stuck-partition watch must see the frozen member's
partitions stand still while events wait (warning, ``tailstream_stuck_partitions``),
ask for a rebalance, and in the end hold and read every partition. (Tansu completes that
rebalance only once the frozen member's session expires; the watch's value there is the
alarm, and the rebalance for a member the broker does not expire.)
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import metrics_url, scrape, start_worker, wait_ready

pytestmark = pytest.mark.integration

SESSION_S = 30.0  # the broker expires the frozen member after this
STUCK_S = 4.0


def held(ws: Settings) -> float:
    return scrape(metrics_url(ws)).get("tailstream_assigned_partitions", 0)


def test_a_frozen_member_loses_its_partitions_to_a_live_worker(topics: Settings) -> None:
    base = topics.replace(scorer="baseline", kafka_session_timeout_s=SESSION_S,
                          stuck_partition_s=STUCK_S)
    live, ws1 = start_worker(base, 0)
    procs: list[ManagedProcess] = [live]
    stop = threading.Event()
    sim = ShopSimulator(n_users=200, n_items=300, seed=3)

    def produce() -> None:
        send_records(sim.events(), base, rate=100.0, stop=stop)

    try:
        wait_ready(live, ws1, partitions=base.input_partitions)
        frozen, ws2 = start_worker(base, 1)
        procs.append(frozen)
        wait_ready(frozen, ws2)  # the group is split between the two
        deadline = time.monotonic() + 60
        while held(ws1) + held(ws2) < base.input_partitions:
            assert time.monotonic() < deadline, "the two workers never shared the inputs"
            time.sleep(0.5)
        split = (held(ws1), held(ws2))
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        time.sleep(2.0)
        os.kill(frozen.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        while scrape(metrics_url(ws1)).get("tailstream_group_rejoins_total", 0) < 1:
            assert time.monotonic() - t0 < STUCK_S * 4, "the stuck partitions went unseen"
            time.sleep(0.5)
        seen = time.monotonic() - t0
        while held(ws1) < base.input_partitions:
            assert time.monotonic() - t0 < SESSION_S * 3, (
                f"the live worker still holds {held(ws1)} of {base.input_partitions} "
                f"partitions after {SESSION_S * 3:.0f}s")
            time.sleep(0.5)
        took = time.monotonic() - t0
        stop.set()
        producer.join(timeout=30)
        print(f"\nsplit {split}; stuck partitions seen {seen:.1f}s after the freeze, taken "
              f"over after {took:.1f}s (session timeout {SESSION_S:.0f}s)")
        # Every partition is read to its end by the live worker.
        deadline = time.monotonic() + 60
        while (lag := scrape(metrics_url(ws1)).get("tailstream_consumer_lag", 0)) > 0:
            assert time.monotonic() < deadline, f"{lag} events left unread"
            time.sleep(0.5)
    finally:
        stop.set()
        for p in procs:
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)
            p.stop()
