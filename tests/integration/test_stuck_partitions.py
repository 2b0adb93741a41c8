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
from tailstream.stack.processes import start_worker, wait_ready

from .conftest import metric, poll, wait_metric

pytestmark = pytest.mark.integration

SESSION_S = 30.0  # the broker expires the frozen member after this
STUCK_S = 4.0


def held(ws: Settings) -> float:
    return metric(ws, "tailstream_assigned_partitions")


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
        poll(lambda: held(ws1) + held(ws2) >= base.input_partitions, 60,
             "the two workers to share the inputs", 0.5)
        split = (held(ws1), held(ws2))
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        # Both members are mid-stream (each has processed events of its partitions) when
        # one is frozen.
        for ws in (ws1, ws2):
            wait_metric(ws, "tailstream_events_processed_total", 20, 30,
                        f"worker on port {ws.web_port} to process events")
        os.kill(frozen.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        poll(lambda: metric(ws1, "tailstream_group_rejoins_total") >= 1, STUCK_S * 4,
             "the stuck partitions to be seen (a rejoin asked for)", 0.5)
        seen = time.monotonic() - t0
        poll(lambda: held(ws1) >= base.input_partitions, SESSION_S * 3 - seen,
             f"the live worker to hold all {base.input_partitions} partitions", 0.5,
             detail=lambda: f"it holds {held(ws1)}")
        took = time.monotonic() - t0
        stop.set()
        producer.join(timeout=30)
        print(f"\nsplit {split}; stuck partitions seen {seen:.1f}s after the freeze, taken "
              f"over after {took:.1f}s (session timeout {SESSION_S:.0f}s)")
        # Every partition is read to its end by the live worker.
        lag = "tailstream_consumer_lag_messages"
        poll(lambda: metric(ws1, lag, default=-1) == 0, 60, "every event read (no lag)", 0.5,
             detail=lambda: f"{metric(ws1, lag):g} events left unread")
    finally:
        stop.set()
        for p in procs:
            if p.alive():
                os.kill(p.pid, signal.SIGCONT)
            p.stop()
