"""The event-loop watch (streams/worker/loop_watch.py): a loop held past the stall length
is counted and logged with the stack that held it, taken while it was held; a loop that
keeps up only observes its lag."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import CollectorRegistry

from tailstream.metrics import Metrics
from tailstream.streams.worker.loop_watch import LoopWatch


def value(metrics: Metrics, name: str) -> float:
    got = metrics.registry.get_sample_value(name, {})
    return 0.0 if got is None else got


def hold_the_loop_in_a_recognisable_place(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # busy, on the loop's thread, holding it
        pass


def test_a_stall_is_counted_and_logged_with_the_stack_that_held_the_loop(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(CollectorRegistry())
    watch = LoopWatch(metrics, stall_s=0.1, tick_s=0.01)

    async def scenario() -> None:
        task = asyncio.ensure_future(watch.run())
        await asyncio.sleep(0.1)  # some ticks on a loop that keeps up
        hold_the_loop_in_a_recognisable_place(0.4)
        await asyncio.sleep(0.1)  # the loop runs again: the stall is closed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING, logger="tailstream.streams.worker.loop_watch"):
        asyncio.run(scenario())
    assert watch.stalls == 1
    assert value(metrics, "tailstream_event_loop_stalls_total") == 1
    assert value(metrics, "tailstream_event_loop_lag_seconds_count") >= 5
    assert value(metrics, "tailstream_event_loop_lag_seconds_sum") >= 0.3
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "stalled for" in warning and "hold_the_loop_in_a_recognisable_place" in warning


def test_a_loop_that_keeps_up_has_no_stalls_and_zero_turns_the_watch_off() -> None:
    metrics = Metrics(CollectorRegistry())
    watch = LoopWatch(metrics, stall_s=1.0, tick_s=0.01)  # 1 s: a busy CI machine

    async def scenario(w: LoopWatch, seconds: float) -> None:
        task = asyncio.ensure_future(w.run())
        await asyncio.sleep(seconds)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario(watch, 0.15))
    assert watch.stalls == 0 and value(metrics, "tailstream_event_loop_stalls_total") == 0
    assert value(metrics, "tailstream_event_loop_lag_seconds_count") >= 3
    off = LoopWatch(Metrics(CollectorRegistry()), stall_s=0.0)
    asyncio.run(scenario(off, 0.05))
    assert value(off.metrics, "tailstream_event_loop_lag_seconds_count") == 0
