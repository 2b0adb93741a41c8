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


def over_budget(reports: Mapping[str, Mapping[str, Any]], previous: Mapping[str, float],
                now: float, *, budget_s: float, stale_s: float = 5.0) -> str | None:
    """Why to pause now, or None: ``"latency"`` if a fresh report's p99 is over the budget,
    ``"lag"`` if a fresh report's lag grew by more than :data:`LAG_SLACK` since
    ``previous`` (worker → lag at the last check).

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
        lag = float(report.get("lag", 0.0))
        if worker in previous and lag > previous[worker] + LAG_SLACK:
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
        self._checked = 0.0
        self._train_until = 0.0
        """Monotonic time before which no pause is asked (the duty floor)."""
        self.paused_s = 0.0
        """Seconds paused since this trainer started."""

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

    def reason(self) -> str | None:
        """Why the workers want the CPU now (None: train on)."""
        reports = self.reports()
        why = over_budget(reports, self.lags, self.clock(), budget_s=self.budget_s)
        self.lags = {w: float(r.get("lag", 0.0)) for w, r in reports.items()}
        return why

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
        owed = owed_steps_s(waited, self.min_duty)
        self._train_until = self._checked + owed
        self.metrics.unhelpful_pauses.inc()
        self.metrics.duty_seconds.inc(owed)
        log.info("fine-tune resumed after %.1fs, the longest pause: the workers are still "
                 "over budget without it%s", waited,
                 f", so it trains {owed:.1f}s before it asks again" if owed > 0 else
                 " (too small a machine for the stream and the trainer)")
