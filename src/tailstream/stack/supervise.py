"""``tailstream up`` supervises its children: a crashed worker, trainer, redis-server or
broker is restarted on the same ports with exponential backoff, and the others keep
running; after too many crashes in a row the stack gives up with the reason.

Policy (``TAILSTREAM_SUPERVISE_*``): a child that dies is restarted after
``0.5 s · 2^(n−1)`` (at most 30 s), ``n`` its restarts within the last
``supervise_window_s``; past ``supervise_max_restarts`` restarts in that window the stack
stops and says which child and how it last ended. Each death is logged once, with how it
ended (exit code or signal) and the last lines *that run* wrote — never an earlier run's.
Restarts are counted in ``tailstream_stack_restarts_total{process}`` on ``up``'s own
``/metrics``. A worker is restarted from a *warm spare* (:class:`WarmSpare`,
``TAILSTREAM_SUPERVISE_WARM_SPARES``): a process that imported everything and waits, so the
restart skips the seconds of imports.

What a restart means for the data: a worker recovers its tables from the changelogs and
re-reads from its group's committed offsets (events are processed once: the kill -9
tests); the trainer resumes from its offsets in Redis (a run cut short is run again); an
embedded redis-server comes back empty (workers rewrite the minority buffer, lists come
back with the users' next events or the aged-list refresh, de-dup marks older than the
local window are lost — docs/reliability.md); an embedded broker comes back empty (the
workers' broker-reset recovery re-creates their changelogs).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tailstream.metrics import StackMetrics
from tailstream.stack.embedded import ManagedProcess

log = logging.getLogger("tailstream")


@dataclass
class Child:
    """A supervised process and how to start it again."""

    name: str
    proc: ManagedProcess
    restart: Callable[[], ManagedProcess]
    restarts: deque[float] = field(default_factory=deque)
    due: float | None = None
    """When the next restart is due (None: running)."""
    spare: WarmSpare | None = None


class WarmSpare:
    """A restart from a spare that has imported everything already (torch, transformers,
    river, Faust: about 4.5 s of a worker's start on this project's machines): the spare
    starts at once when told, and a new spare is made ``delay_s`` later (not at once: it
    would take the CPU the restarted worker needs)."""

    def __init__(self, fresh: Callable[[], ManagedProcess],
                 spare: Callable[[], ManagedProcess], *, delay_s: float = 20.0,
                 first_delay_s: float = 3.0, now: float = 0.0) -> None:
        self.fresh = fresh
        self.make_spare = spare
        self.delay_s = delay_s
        self.spare: ManagedProcess | None = None
        self.due: float | None = now + first_delay_s

    def __call__(self) -> ManagedProcess:
        spare, self.spare = self.spare, None
        self.due = time.monotonic() + self.delay_s
        if spare is not None and spare.alive():
            spare.send_line("go")
            return spare
        if spare is not None:
            spare.stop()
        return self.fresh()

    def maintain(self, now: float) -> None:
        """Make the spare when it is due; replace one that died."""
        if self.spare is not None and not self.spare.alive():
            log.warning("the warm spare of a worker %s; making another later",
                        self.spare.exit_description())
            self.spare.stop()
            self.spare, self.due = None, now + self.delay_s
        if self.spare is None and self.due is not None and now >= self.due:
            try:
                self.spare = self.make_spare()
            except Exception as exc:  # no spare: a restart starts from scratch
                log.warning("could not start a warm spare: %s", exc)
            self.due = None

    def stop(self) -> None:
        if self.spare is not None:
            self.spare.stop()
            self.spare = None


def backoff(recent: int, first_s: float = 0.5, max_s: float = 30.0) -> float:
    """Seconds before the ``recent``-th restart within the window.

    >>> [backoff(n) for n in (1, 2, 3, 8)]
    [0.5, 1.0, 2.0, 30.0]
    """
    return min(first_s * 2 ** max(recent - 1, 0), max_s)


class Supervisor:
    def __init__(self, children: Sequence[Child], metrics: StackMetrics | None = None, *,
                 max_restarts: int = 5, window_s: float = 300.0,
                 on_restart: Callable[[Child], None] | None = None) -> None:
        self.children = list(children)
        self.metrics = metrics
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.on_restart = on_restart
        for c in self.children:
            self._up(c, True)

    def check(self, now: float) -> str | None:
        """Look at every child once: schedule restarts of the dead, restart those due.
        Returns why the stack gives up, or None."""
        for child in self.children:
            if child.spare is not None:
                child.spare.maintain(now)
            if child.due is None and not child.proc.alive():
                reason = self._lost(child, now)
                if reason is not None:
                    return reason
            if child.due is not None and now >= child.due:
                self._restart(child, now)
        return None

    def _lost(self, child: Child, now: float) -> str | None:
        self._up(child, False)
        while child.restarts and now - child.restarts[0] > self.window_s:
            child.restarts.popleft()
        ended = child.proc.exit_description()
        tail = child.proc.tail(20)
        child.proc.stop()  # closes its log
        if len(child.restarts) >= self.max_restarts:
            return (f"{child.name} {ended} after {len(child.restarts)} restarts within "
                    f"{self.window_s:.0f}s; its last lines:\n{tail}")
        # A warm spare is there to be used at once; otherwise back off.
        delay = 0.0 if child.spare is not None and child.spare.spare is not None and \
            not child.restarts else backoff(len(child.restarts) + 1)
        child.due = now + delay
        log.error("%s (pid %d) %s; restarting it in %.1fs (restart %d within %.0fs). Its "
                  "last lines:\n%s", child.name, child.proc.pid, ended, delay,
                  len(child.restarts) + 1, self.window_s, tail or "(none)")
        return None

    def _restart(self, child: Child, now: float) -> None:
        child.restarts.append(now)
        child.due = None
        try:
            child.proc = child.restart()
        except Exception as exc:  # a start that fails is one more crash: retried
            log.error("restarting %s failed: %s", child.name, exc)
            child.due = now + backoff(len(child.restarts) + 1)
            return
        if self.metrics is not None:
            self.metrics.restarts.labels(child.name).inc()
        self._up(child, True)
        log.info("%s restarted (pid %d)", child.name, child.proc.pid)
        if self.on_restart is not None:
            self.on_restart(child)

    def _up(self, child: Child, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.up.labels(child.name).set(1 if up else 0)

    def stop(self) -> None:
        """Stop every child, the workers and the trainer before the services they use."""
        order = sorted(self.children, key=lambda c: c.name in ("tansu-broker", "redis-server"))
        for child in order:
            if child.spare is not None:
                child.spare.stop()
            child.proc.stop()
