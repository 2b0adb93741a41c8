"""Event-loop stalls: how late the worker's event loop runs, and what held it when it stalled.

Every list the worker makes passes through its one event loop (the batch, the scoring
turn's hand-off, the Redis and Kafka writes), so anything that holds the loop — a long
Python pass over the state, a collection of a large heap, a bulk write — adds its length
to the latency of every list waiting then: the p99 spikes of a run that otherwise keeps its
budget. The p99 says *that* lists were late; this says *why*.

* **Lag.** A coroutine sleeps ``tick_s`` (50 ms) and observes how much later than asked it
  woke up: ``tailstream_event_loop_lag_seconds`` (a histogram; near 0 on a loop that keeps
  up, the length of a stall once).
* **Stalls.** A daemon thread watches the coroutine's last tick. When the loop has not
  ticked for ``stall_s`` (``TAILSTREAM_LOOP_STALL_MS``, 250 ms by default: the latency
  budget), it takes the main thread's stack then (``sys._current_frames``, a read of the
  interpreter's frames: no signal, no profiler), and when the loop runs again it logs the
  stall's length with that stack at WARNING and counts it in
  ``tailstream_event_loop_stalls_total``. One stack per stall, taken while it lasts, so
  the log names the code that held the loop, not the code that ran after it.

The thread wakes every ``tick_s`` and holds the interpreter for microseconds; a
``stall_s`` of 0 turns the watch off.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType

from tailstream.metrics import Metrics

log = logging.getLogger(__name__)


def lateness(asked_s: float, slept_s: float) -> float:
    """How much later than asked a sleep woke up (never negative).

    >>> lateness(0.05, 0.051), lateness(0.05, 0.3), lateness(0.05, 0.04)
    (0.001, 0.25, 0.0)
    """
    return round(max(slept_s - asked_s, 0.0), 9)


def innermost(frame: FrameType | None, depth: int = 14) -> str:
    """The ``depth`` innermost frames of a stack, outermost first, one line each."""
    if frame is None:
        return "(no frame)"
    summary = traceback.extract_stack(frame)[-depth:]
    return "\n".join(f"  {f.filename}:{f.lineno} {f.name}" for f in summary)


class LoopWatch:
    """The lag coroutine (:meth:`run`, on the loop) and the stall thread (started by it)."""

    def __init__(self, metrics: Metrics, *, stall_s: float, tick_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.stall_s = stall_s
        self.tick_s = tick_s
        self.clock = clock
        self.last_tick = clock()
        self.loop_thread = threading.get_ident()
        self.stalled_at: float | None = None
        """When the current stall was seen (None: the loop is running)."""
        self.stack = ""
        self.stalls = 0
        self._stop = threading.Event()

    async def run(self) -> None:
        """Tick on the loop until cancelled; the stall thread runs beside it."""
        if self.stall_s <= 0:
            return
        self.loop_thread = threading.get_ident()
        self.last_tick = self.clock()
        thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)
        thread.start()
        try:
            while True:
                before = self.clock()
                await asyncio.sleep(self.tick_s)
                self.tick(lateness(self.tick_s, self.clock() - before))
        finally:
            self._stop.set()

    def tick(self, late_s: float) -> None:
        """The loop ran again: observe its lag, and close the stall it ends (if any)."""
        self.metrics.loop_lag.observe(late_s)
        self.last_tick = self.clock()
        if self.stalled_at is not None:
            self.stalls += 1
            self.metrics.loop_stalls.inc()
            log.warning("the event loop stalled for %.0f ms (lists waiting then were late "
                        "by as much); it was in:\n%s", 1000 * (late_s + self.tick_s),
                        self.stack)
            self.stalled_at = None

    def check(self) -> None:
        """From the watch thread: if the loop has not ticked for ``stall_s``, keep the
        stack it is in (once per stall)."""
        if self.stalled_at is not None:
            return
        now = self.clock()
        if now - self.last_tick < self.stall_s + self.tick_s:
            return
        self.stack = innermost(sys._current_frames().get(self.loop_thread))
        self.stalled_at = now

    def _watch(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.check()
            except Exception:  # a diagnostic never takes the worker down
                log.debug("loop watch check failed", exc_info=True)
