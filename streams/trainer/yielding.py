"""A trainer that never starves the stream: the lowest CPU priority, capped torch threads,
and back-pressure between training steps.

* **Priority.** ``nice`` 19 (``TAILSTREAM_TRAINER_NICE``, set by the CLI) and, on Linux,
  ``SCHED_IDLE``: the kernel gives the trainer a core only when nothing else wants it.
  Torch uses ``TAILSTREAM_TORCH_THREADS`` threads (1 by default), never one per core.
* **Back-pressure.** Every worker publishes, each second, the p99 of its event → Redis
  latency over the last 10 s and its consumer lag (``{prefix}:worker-health``, see
  :class:`~tailstream.streams.worker.timers.HealthReport`). After each training step
  :meth:`Yielder.on_step` reads them (at most every ``check_s``) and, while a fresh report
  (under ``stale_s`` old) is over ``TAILSTREAM_LATENCY_BUDGET_MS`` or shows the lag
  growing, the trainer sleeps and asks again. A pause ends when the workers are back
  under the budget, or after ``TAILSTREAM_TRAINER_PAUSE_MAX_S``. Pauses are metrics:
  ``tailstream_trainer_paused_seconds_total``, ``tailstream_trainer_pauses_total{reason}``
  and ``tailstream_trainer_paused``.

* **A duty floor.** A pause that runs to its bound with the workers still over budget
  says the trainer, which held no CPU during it, is not what keeps them there (the
  machine is too small for the stream, or something else is busy). Pausing again at the
  next step would give the fine-tune one step per bound — on a machine that is always
  over budget a run then never ends and the model never updates. With
  ``TAILSTREAM_TRAINER_MIN_DUTY`` > 0, after such a pause the trainer trains
  ``pause × duty / (1 − duty)`` seconds before it asks again (0.5: a 30 s pause buys
  30 s of steps), still at the lowest CPU priority. A pause that ends because the workers
  recovered owes nothing: the next over-budget report pauses at once. The default is 0
  (the stream first, as the back-pressure promises): a model that must update on a
  saturated machine is an explicit choice (docs/benchmarks.md has the demos at 0 and 0.5).
  Metrics: ``tailstream_trainer_unhelpful_pauses_total`` (counted whatever the duty: a
  machine too small for the stream) and ``tailstream_trainer_duty_seconds_total``.

* **A trainer-free floor.** A pause that runs to its bound (15 s: longer than the
  workers' 10 s latency window) with the workers still over budget, and their p99 no
  lower than when it began, has *measured* their p99 without the trainer (one that fell
  was still draining a backlog the trainer left: no floor, the trainer pauses again).
  For ``TAILSTREAM_TRAINER_FLOOR_TTL_S`` (120 s) that p99 is the floor: the trainer
  pauses only while a p99 is over ``max(budget, floor ×`` :data:`FLOOR_MARGIN` ``)`` —
  the latency it may add, not the latency the stream has anyway — and, if the pause
  ended on lag, it ignores lag growth. A standing floor never rises. Then it lapses and
  the budget alone decides again, so a stream that recovered is protected at its budget
  and a later pause measures afresh. Before the floor, a 2-core demo whose worker ran
  over budget with or without the trainer paused eight times to the bound and took
  280 s from trigger to candidate for ~30 s of training. The trainer still runs at
  ``SCHED_IDLE``, yet it is not free: where the worker waits on I/O the idle class
  runs, and a worker at p99 293 ms without it passed 352 ms within 30 s of its steps
  (demo, 2026-12-06).

Why these signals: the p99 is what the stream promises (the budget); the lag catches a
worker that keeps its latency only because it reads less. Both come from the workers
themselves, so the trainer needs no other view of the machine, and a missing or stale
report (no worker, Redis away) never blocks training.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from redis.exceptions import RedisError

from tailstream.metrics import TrainerMetrics
from tailstream.redis_io import Keys
from tailstream.settings import Settings

log = logging.getLogger(__name__)

LAG_SLACK = 500
"""Messages a lag may grow by between two reports before it counts as growing (a batch
or two of ordinary jitter)."""

FLOOR_MARGIN = 1.2
"""Over a measured trainer-free floor, the p99 that pauses the trainer: 20 % above what
the workers did without it — twice the window-to-window noise (:data:`HELPED`), so noise
alone does not pause it."""

HELPED = 0.9
"""A pause that ends with the p99 below this share of where it began helped (the p99 of a
10 s window moves by about a tenth between windows under a steady load)."""

WINDOW_S = 10.0
"""The workers' latency window (:meth:`~tailstream.streams.stores.publisher.Publisher.
recent_latency`): a pause shorter than this plus :data:`SETTLE_S` still reads lists the
trainer competed with, so it measures no floor."""

SETTLE_S = 2.0
"""Beyond the window: a report's period (1 s) and the lists in flight."""


def lower_priority(settings: Settings, *, idle: bool = True) -> list[str]:
    """Ask the OS for the lowest CPU priority (``idle``: ``SCHED_IDLE`` too) and cap
    torch's threads; returns what was done (for the log). Each step is best effort: a
    platform without it keeps going."""
    done: list[str] = []
    if idle and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            done.append("SCHED_IDLE")
        except OSError as exc:
            log.debug("SCHED_IDLE refused: %r", exc)
    try:
        done.append(f"nice {os.nice(0)}")
    except OSError:
        pass
    import torch  # here: the trainer loads torch anyway, the worker never imports this

    threads = settings.torch_threads if settings.torch_threads > 0 else 1
    torch.set_num_threads(threads)
    done.append(f"{threads} torch thread{'s' * (threads > 1)}")
    return done


def owed_steps_s(paused_s: float, duty: float) -> float:
    """Seconds of training owed after a pause of ``paused_s`` that did not bring the
    workers back under budget, so training keeps ``duty`` of the wall clock:
    ``t / (paused_s + t) = duty``, i.e. ``t = paused_s · duty / (1 − duty)``.

    >>> owed_steps_s(30.0, 0.5), owed_steps_s(30.0, 0.25), owed_steps_s(30.0, 0.0)
    (30.0, 10.0, 0.0)
    """
    if not 0.0 <= duty < 1.0:
        raise ValueError(f"TAILSTREAM_TRAINER_MIN_DUTY must be in [0, 1), got {duty}")
    return paused_s * duty / (1.0 - duty)


def pause_threshold_s(budget_s: float, floor_s: float | None) -> float:
    """The p99 over which the trainer pauses: the budget, or, while a trainer-free floor
    stands, ``max(budget, floor × FLOOR_MARGIN)`` (module docstring).

    >>> pause_threshold_s(0.25, None), pause_threshold_s(0.25, 0.1), pause_threshold_s(0.25, 1.0)
    (0.25, 0.25, 1.2)
    """
    return budget_s if floor_s is None else max(budget_s, floor_s * FLOOR_MARGIN)


def pause_helped(before_s: float | None, after_s: float) -> bool:
    """Whether a pause lowered the workers' p99 by more than the window-to-window noise
    (:data:`HELPED`): then they were still draining a backlog the trainer left, and what
    they report is no trainer-free floor (a floor read then ratchets up: 293 → 768 ms in
    a demo, and the trainer ran on while the worker fell behind).

    >>> pause_helped(0.9, 0.77), pause_helped(0.3, 0.29), pause_helped(None, 0.3)
    (True, False, False)
    """
    return before_s is not None and after_s < HELPED * before_s


def fresh_p99_s(reports: Mapping[str, Mapping[str, Any]], now: float,
                stale_s: float = 5.0) -> float | None:
    """The highest p99 among fresh reports (None: none fresh or none with a p99).

    >>> fresh_p99_s({"a": {"p99_s": 0.4, "at": 99.0}, "b": {"p99_s": 0.9, "at": 0.0}}, 100.0)
    0.4
    """
    values = [float(r["p99_s"]) for r in reports.values()
              if r.get("p99_s") is not None and now - float(r.get("at", 0.0)) <= stale_s]
    return max(values, default=None)


def over_budget(reports: Mapping[str, Mapping[str, Any]], previous: Mapping[str, float],
                now: float, *, budget_s: float, stale_s: float = 5.0,
                lag: bool = True) -> str | None:
    """Why to pause now, or None: ``"latency"`` if a fresh report's p99 is over the budget,
    ``"lag"`` if a fresh report's lag grew by more than :data:`LAG_SLACK` since
    ``previous`` (worker → lag at the last check; not asked when ``lag`` is False).

    >>> r = {"w": {"p99_s": 0.4, "lag": 0, "at": 100.0}}
    >>> over_budget(r, {}, 101.0, budget_s=0.25), over_budget(r, {}, 200.0, budget_s=0.25)
    ('latency', None)
    >>> r = {"w": {"p99_s": 0.1, "lag": 5000, "at": 100.0}}
    >>> over_budget(r, {"w": 1000.0}, 101.0, budget_s=0.25), over_budget(r, {}, 101.0,
    ...                                                                  budget_s=0.25)
    ('lag', None)
    """
    why: str | None = None
    for worker, report in reports.items():
        if now - float(report.get("at", 0.0)) > stale_s:
            continue
        p99 = report.get("p99_s")
        if p99 is not None and float(p99) > budget_s:
            return "latency"
        behind = float(report.get("lag", 0.0))
        if lag and worker in previous and behind > previous[worker] + LAG_SLACK:
            why = "lag"
    return why


class Yielder:
    """The trainer's ``on_step`` hook: pause between steps while the workers are over
    their budget (see the module docstring)."""

    def __init__(self, settings: Settings, redis: Any, metrics: TrainerMetrics, *,
                 check_s: float = 0.25, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.enabled = settings.trainer_backpressure
        self.budget_s = settings.latency_budget_ms / 1000.0
        self.pause_max_s = settings.trainer_pause_max_s
        self.min_duty = settings.trainer_min_duty
        owed_steps_s(0.0, self.min_duty)  # a bad duty fails at start, not mid-run
        self.redis = redis
        self.key = Keys(settings.redis_prefix).worker_health
        self.metrics = metrics
        self.check_s = check_s
        self.clock = clock
        self.sleep = sleep
        self.monotonic = monotonic
        self.lags: dict[str, float] = {}
        self._last_reports: dict[str, dict[str, Any]] = {}
        self._checked = 0.0
        self._train_until = 0.0
        """Monotonic time before which no pause is asked (the duty floor)."""
        self.paused_s = 0.0
        """Seconds paused since this trainer started."""
        self.floor_ttl_s = settings.trainer_floor_ttl_s
        self.floor_s: float | None = None
        """The workers' p99 measured without the trainer (module docstring), or None."""
        self._floor_until = 0.0
        self._lag_ignored_until = 0.0

    def reports(self) -> dict[str, dict[str, Any]]:
        """The workers' latest health reports (empty when Redis cannot say)."""
        try:
            raw = self.redis.hgetall(self.key)
        except (RedisError, OSError):
            return {}
        out: dict[str, dict[str, Any]] = {}
        for field, value in raw.items():
            try:
                name = field.decode() if isinstance(field, bytes) else str(field)
                out[name] = json.loads(value)
            except (ValueError, UnicodeDecodeError):
                continue
        return out

    def threshold_s(self) -> float:
        """The p99 that pauses the trainer now (the budget, or over a standing floor)."""
        if self.floor_s is not None and self.monotonic() >= self._floor_until:
            self.floor_s = None  # lapsed: the budget alone decides, a pause measures afresh
            self.metrics.floor.set(0)
        return pause_threshold_s(self.budget_s, self.floor_s)

    def reason(self) -> str | None:
        """Why the workers want the CPU now (None: train on)."""
        reports = self.reports()
        self._last_reports = reports
        why = over_budget(reports, self.lags, self.clock(), budget_s=self.threshold_s(),
                          lag=self.monotonic() >= self._lag_ignored_until)
        self.lags = {w: float(r.get("lag", 0.0)) for w, r in reports.items()}
        return why

    def _measure_floor(self, why: str, waited_s: float, at_start: float | None) -> None:
        """After a pause that ran to its bound over budget: if it outlasted the workers'
        window and did not lower their p99 (:func:`pause_helped`), what they report now is
        their trainer-free latency — it stands as the floor for ``trainer_floor_ttl_s``
        (module docstring)."""
        if self.floor_ttl_s <= 0 or waited_s < WINDOW_S + SETTLE_S:
            return
        now = self.monotonic()
        if why == "lag":
            self._lag_ignored_until = now + self.floor_ttl_s
            log.info("the workers' lag grew without the trainer too: lag growth is ignored "
                     "for %.0fs", self.floor_ttl_s)
            return
        p99 = fresh_p99_s(self._last_reports, self.clock())
        if p99 is None:
            return
        if pause_helped(at_start, p99):
            log.info("the workers' p99 fell from %.0f to %.0f ms while paused: still draining "
                     "what the trainer left, no floor", 1000 * (at_start or 0.0), 1000 * p99)
            return
        if self.floor_s is not None:
            # Over a standing floor the pause began because the trainer added latency:
            # what is left at its end is no lower floor to train up to; keep the lower.
            self.floor_s = min(self.floor_s, p99)
        else:
            self.floor_s, self._floor_until = p99, now + self.floor_ttl_s
        p99 = self.floor_s
        self.metrics.floor.set(p99)
        log.info("the workers' p99 without the trainer is %.0f ms: for %.0fs it pauses only "
                 "over %.0f ms", 1000 * p99, self._floor_until - now, 1000 * self.threshold_s())

    def _count_pause(self, since: float) -> float:
        """Add the pause's time since ``since`` to the totals; returns now."""
        now = self.monotonic()
        self.paused_s += now - since
        self.metrics.paused_seconds.inc(now - since)
        return now

    def on_step(self, step: int, loss: float) -> None:
        """After each training step: pause while :meth:`reason` says so (bounded)."""
        if not self.enabled:
            return
        now = self.monotonic()
        if now - self._checked < self.check_s or now < self._train_until:
            return
        self._checked = now
        why = self.reason()
        if why is None:
            return
        started = self.monotonic()
        at_start = fresh_p99_s(self._last_reports, self.clock())
        self.metrics.pauses.labels(why).inc()
        self.metrics.paused.set(1)
        log.info("fine-tune paused at step %d: the workers are over their budget (%s)",
                 step, why)
        counted = started
        try:
            while why is not None and self.monotonic() - started < self.pause_max_s:
                self.sleep(self.check_s)
                # Counted as it passes: a reader during a long pause (a benchmark's window
                # ending mid-pause) sees it, not 0 until the pause ends.
                counted = self._count_pause(counted)
                why = self.reason()
        finally:
            self._count_pause(counted)
            waited = self.monotonic() - started
            self.metrics.paused.set(0)
            self._checked = self.monotonic()
        if why is None:
            log.info("fine-tune resumed after %.1fs", waited)
            return
        self._measure_floor(why, waited, at_start)
        owed = owed_steps_s(waited, self.min_duty)
        self._train_until = self._checked + owed
        self.metrics.unhelpful_pauses.inc()
        self.metrics.duty_seconds.inc(owed)
        log.info("fine-tune resumed after %.1fs, the longest pause: the workers are still "
                 "over budget without it%s", waited,
                 f", so it trains {owed:.1f}s before it asks again" if owed > 0 else
                 " (too small a machine for the stream and the trainer)")
