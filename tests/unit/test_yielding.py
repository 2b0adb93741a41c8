"""The trainer's back-pressure (streams/trainer/yielding.py): it pauses between steps while
a worker reports a p99 over the budget or a growing lag, resumes when they are back under
it, never longer than the longest pause, and counts its pauses."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tailstream.metrics import TrainerMetrics
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.trainer.yielding import Yielder, lower_priority, over_budget


class FakeRedis:
    """``hgetall`` of the worker-health hash, scripted per call."""

    def __init__(self, script: list[dict[str, dict[str, Any]]]) -> None:
        self.script = script
        self.calls = 0

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        assert key == Keys("tailstream").worker_health
        reports = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return {w.encode(): json.dumps(r).encode() for w, r in reports.items()}


def report(p99: float | None, lag: float = 0.0, age: float = 0.0) -> dict[str, Any]:
    return {"p99_s": p99, "p50_s": p99, "lag": lag, "at": time.time() - age}


def yielder(script: list[dict[str, dict[str, Any]]], **overrides: Any
            ) -> tuple[Yielder, FakeRedis, TrainerMetrics, list[float]]:
    settings = Settings().replace(**{"latency_budget_ms": 250.0, **overrides})
    redis = FakeRedis(script)
    metrics = TrainerMetrics(CollectorRegistry())
    slept: list[float] = []
    y = Yielder(settings, redis, metrics, check_s=0.0, sleep=slept.append)
    return y, redis, metrics, slept


def value(metrics: TrainerMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def test_a_worker_over_its_budget_pauses_training_until_it_is_back_under() -> None:
    over = {"w1": report(0.40), "w2": report(0.05)}
    under = {"w1": report(0.20), "w2": report(0.05)}
    y, redis, metrics, slept = yielder([over, over, over, under])
    y.on_step(0, 1.0)
    assert len(slept) == 3 and redis.calls == 4
    assert value(metrics, "tailstream_trainer_pauses_total", reason="latency") == 1
    assert value(metrics, "tailstream_trainer_paused_seconds_total") >= 0.0
    assert value(metrics, "tailstream_trainer_paused") == 0
    y.on_step(1, 1.0)  # under the budget: no pause
    assert len(slept) == 3


def test_a_growing_lag_pauses_and_a_steady_one_does_not() -> None:
    y, _, metrics, slept = yielder([{"w": report(0.1, lag=100)}, {"w": report(0.1, lag=5000)},
                                    {"w": report(0.1, lag=5000)}])
    y.on_step(0, 1.0)  # first reading: nothing to compare with
    assert not slept
    y.on_step(1, 1.0)  # +4,900 messages: growing
    assert value(metrics, "tailstream_trainer_pauses_total", reason="lag") == 1
    assert len(slept) == 1  # the next reading holds still: resume


def test_stale_reports_no_reports_and_back_pressure_off_never_pause() -> None:
    for script, overrides in (([{"w": report(5.0, age=60)}], {}), ([{}], {}),
                              ([{"w": report(5.0)}], {"trainer_backpressure": False})):
        y, _, _, slept = yielder(script, **overrides)
        y.on_step(0, 1.0)
        assert not slept


def test_a_pause_never_outlasts_its_bound() -> None:
    y, _, metrics, slept = yielder([{"w": report(9.0)}], trainer_pause_max_s=0.05)
    y.sleep = lambda s: (slept.append(s), time.sleep(0.01))  # type: ignore[assignment,func-returns-value]
    started = time.monotonic()
    y.on_step(0, 1.0)
    assert time.monotonic() - started < 1.0 and slept
    assert value(metrics, "tailstream_trainer_paused_seconds_total") >= 0.05


def test_over_budget_reads_the_newest_reports_only() -> None:
    now = 1000.0
    assert over_budget({"w": {"p99_s": 0.3, "at": now - 1}}, {}, now, budget_s=0.25) == "latency"
    assert over_budget({"w": {"p99_s": 0.3, "at": now - 10}}, {}, now, budget_s=0.25) is None
    assert over_budget({"w": {"p99_s": None, "lag": 10, "at": now}}, {"w": 0.0}, now,
                       budget_s=0.25) is None


def test_lower_priority_caps_the_torch_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        done = lower_priority(Settings().replace(torch_threads=1), idle=False)  # not pytest
        assert torch.get_num_threads() == 1 and "1 torch thread" in done
    finally:
        torch.set_num_threads(before)


class Clock:
    """A monotonic clock that only moves when the trainer sleeps or trains."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


class StampedRedis:
    """One worker whose report is fresh at every reading: over budget (``p99``), or
    under it from reading ``under_after`` on."""

    def __init__(self, clock: Clock, p99: float, under_after: int | None = None) -> None:
        self.clock, self.p99, self.under_after, self.calls = clock, p99, under_after, 0

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        self.calls += 1
        p99 = self.p99 if self.under_after is None or self.calls <= self.under_after else 0.1
        return {b"w": json.dumps({"p99_s": p99, "lag": 0, "at": self.clock.t}).encode()}


def clocked(**overrides: Any) -> tuple[Yielder, Clock, TrainerMetrics]:
    settings = Settings().replace(**{"latency_budget_ms": 250.0, "trainer_pause_max_s": 30.0,
                                     **overrides})
    clock = Clock()
    metrics = TrainerMetrics(CollectorRegistry())
    y = Yielder(settings, StampedRedis(clock, 0.9), metrics, check_s=1.0, clock=clock,
                sleep=clock.sleep, monotonic=clock)
    return y, clock, metrics


def train(y: Yielder, clock: Clock, seconds: float, step_s: float = 1.0) -> tuple[float, float]:
    """Steps of ``step_s`` for ``seconds`` of wall clock; returns (trained, paused) s."""
    start, trained = clock.t, 0.0
    step = 0
    while clock.t - start < seconds:
        clock.t += step_s
        trained += step_s
        y.on_step(step, 1.0)
        step += 1
    return trained, clock.t - start - trained


def test_pauses_that_do_not_help_leave_the_fine_tune_its_duty_share() -> None:
    """Workers over budget whatever the trainer does: before the duty floor the trainer
    ran one step per 30 s pause (1/31 of the clock), so a run on a busy machine never
    ended; with duty 0.5 it trains half the time, at most."""
    y, clock, metrics = clocked(trainer_min_duty=0.5, trainer_floor_ttl_s=0.0)
    trained, paused = train(y, clock, 600.0)
    assert 0.45 <= trained / (trained + paused) <= 0.55
    assert value(metrics, "tailstream_trainer_unhelpful_pauses_total") >= 9
    assert value(metrics, "tailstream_trainer_duty_seconds_total") == pytest.approx(
        value(metrics, "tailstream_trainer_paused_seconds_total"), rel=0.05)
    y0, clock0, _ = clocked(trainer_min_duty=0.0, trainer_floor_ttl_s=0.0)  # a step per pause
    trained0, paused0 = train(y0, clock0, 600.0)
    assert trained0 / (trained0 + paused0) < 0.05


def test_a_pause_that_helps_owes_no_training_time() -> None:
    """Workers back under budget during the pause: no duty run, so the next over-budget
    report pauses again at once (the stream keeps its protection)."""
    y, clock, metrics = clocked(trainer_min_duty=0.5, trainer_floor_ttl_s=0.0)
    y.redis = StampedRedis(clock, 0.9, under_after=3)  # over for 3 readings, then under
    y.on_step(0, 1.0)
    assert value(metrics, "tailstream_trainer_unhelpful_pauses_total") == 0
    y.redis = StampedRedis(clock, 0.9)
    clock.t += 1.0
    y.on_step(1, 1.0)
    assert value(metrics, "tailstream_trainer_pauses_total", reason="latency") == 2


def test_a_duty_of_one_or_more_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="TAILSTREAM_TRAINER_MIN_DUTY"):
        clocked(trainer_min_duty=1.0)



def test_a_pause_is_counted_while_it_lasts_not_only_when_it_ends() -> None:
    """A reader in the middle of a long pause (a benchmark's window that ends mid-pause)
    sees the seconds paused so far: the total had stayed 0 until the pause ended."""
    y, clock, metrics = clocked(trainer_min_duty=0.5)
    seen: list[float] = []

    def sleep_and_read(s: float) -> None:
        clock.sleep(s)
        seen.append(value(metrics, "tailstream_trainer_paused_seconds_total"))

    y.sleep = sleep_and_read
    y.on_step(0, 1.0)
    assert seen[1] == 1.0 and seen[10] == 10.0  # check_s = 1 s: a second per reading
    assert value(metrics, "tailstream_trainer_paused_seconds_total") == 30.0 == y.paused_s


class ScriptedRedis:
    """One worker whose fresh report at clock time t is ``script(t)`` → (p99 s, lag)."""

    def __init__(self, clock: Clock, script: Any) -> None:
        self.clock, self.script = clock, script

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        p99, lag = self.script(self.clock.t)
        return {b"w": json.dumps({"p99_s": p99, "lag": lag, "at": self.clock.t}).encode()}


def test_a_stream_over_budget_without_the_trainer_sets_a_floor_it_trains_under() -> None:
    """The 2-core demo's case: the worker is over budget whether the trainer runs or not.
    One pause to the 15 s bound measures its p99 without the trainer (0.9 s); for the
    floor's 120 s the trainer pauses only over 1.2 × that, so it trains ~120 s of every
    ~135 s instead of one step per pause (the rule before, still there with the floor
    off)."""
    y, clock, metrics = clocked(trainer_pause_max_s=15.0, trainer_floor_ttl_s=120.0)
    trained, paused = train(y, clock, 600.0)
    assert trained / (trained + paused) > 0.85
    assert 4 <= value(metrics, "tailstream_trainer_unhelpful_pauses_total") <= 5
    assert y.floor_s == 0.9 and value(metrics, "tailstream_trainer_floor_seconds") == 0.9
    off, clock_off, _ = clocked(trainer_pause_max_s=15.0, trainer_floor_ttl_s=0.0)
    trained_off, paused_off = train(off, clock_off, 600.0)
    assert trained_off / (trained_off + paused_off) < 0.1


def test_over_a_floor_the_trainer_still_pauses_for_the_latency_it_adds() -> None:
    """Floor 0.9 s: a p99 of 1.0 s (under 1.08) trains on; 1.5 s (the trainer adding to
    it) pauses, and the pause ends once the workers are back under 1.08 s."""
    y, clock, metrics = clocked(trainer_pause_max_s=15.0, trainer_floor_ttl_s=120.0)
    y.on_step(0, 1.0)  # 0.9 s throughout the pause: the floor
    assert y.floor_s == 0.9
    p99 = {"now": 1.0}
    y.redis = ScriptedRedis(clock, lambda t: (p99["now"], 0))
    before = value(metrics, "tailstream_trainer_pauses_total", reason="latency")
    clock.t += 1.0
    y.on_step(1, 1.0)
    assert value(metrics, "tailstream_trainer_pauses_total", reason="latency") == before
    started = clock.t
    y.redis = ScriptedRedis(clock, lambda t: (1.5 if t < started + 4 else 1.0, 0))
    clock.t += 1.0
    y.on_step(2, 1.0)
    assert value(metrics, "tailstream_trainer_pauses_total", reason="latency") == before + 1
    assert clock.t - started < 8.0  # resumed when back under the floor's margin
    assert y.floor_s == 0.9


def test_a_floor_lapses_and_the_budget_decides_again() -> None:
    y, clock, metrics = clocked(trainer_pause_max_s=15.0, trainer_floor_ttl_s=120.0)
    y.on_step(0, 1.0)
    assert y.floor_s == 0.9
    y.redis = ScriptedRedis(clock, lambda t: (0.3, 0))  # over the budget, under the floor
    clock.t += 60.0
    y.on_step(1, 1.0)
    assert y.floor_s == 0.9 and y.paused_s == 15.0  # the first pause only
    clock.t += 61.0
    y.on_step(2, 1.0)  # lapsed: 0.3 s is over the 0.25 s budget again, and stays so
    assert y.floor_s == 0.3 and y.paused_s == 30.0
    assert value(metrics, "tailstream_trainer_floor_seconds") == 0.3


def test_a_pause_shorter_than_the_workers_window_measures_no_floor() -> None:
    """A 5 s bound: the workers' 10 s window still holds lists the trainer competed with."""
    y, clock, _ = clocked(trainer_pause_max_s=5.0, trainer_floor_ttl_s=120.0)
    y.on_step(0, 1.0)
    assert y.floor_s is None


def test_a_lag_that_grows_without_the_trainer_is_ignored_until_the_floor_lapses() -> None:
    y, clock, metrics = clocked(trainer_pause_max_s=15.0, trainer_floor_ttl_s=120.0)
    y.redis = ScriptedRedis(clock, lambda t: (0.1, 1000.0 * t))  # under budget, lag growing
    y.on_step(0, 1.0)  # first reading: nothing to compare with
    clock.t += 1.0
    y.on_step(1, 1.0)  # growing: pauses 15 s, still growing
    assert value(metrics, "tailstream_trainer_pauses_total", reason="lag") == 1
    assert value(metrics, "tailstream_trainer_unhelpful_pauses_total") == 1
    trained, paused = train(y, clock, 100.0)
    assert paused == 0.0
    clock.t += 30.0
    y.on_step(2, 1.0)  # lapsed: a growing lag pauses again
    assert value(metrics, "tailstream_trainer_pauses_total", reason="lag") == 2


def test_a_pause_that_lowered_the_p99_measures_no_floor() -> None:
    """0.9 s when the pause began, 0.7 s at its bound: still over budget, but the workers
    were draining what the trainer left — no floor (one read then had ratcheted a demo's
    floor from 293 to 768 ms); the trainer pauses again at the next step."""
    y, clock, metrics = clocked(trainer_pause_max_s=15.0, trainer_floor_ttl_s=120.0)
    started = clock.t
    y.redis = ScriptedRedis(clock, lambda t: (0.9 if t < started + 5 else 0.7, 0))
    y.on_step(0, 1.0)
    assert y.floor_s is None and y.paused_s == 15.0
    clock.t += 1.0
    y.on_step(1, 1.0)
    assert value(metrics, "tailstream_trainer_pauses_total", reason="latency") == 2


def test_a_standing_floor_never_rises() -> None:
    """Floor 0.3 s; the trainer pushes the p99 to 0.55 s (over 0.36), a pause ends at
    0.52 s, no better: the floor stays 0.3 s, so the trainer still pauses over 0.36 s."""
    y, clock, _ = clocked(trainer_pause_max_s=15.0, trainer_floor_ttl_s=120.0)
    y.redis = ScriptedRedis(clock, lambda t: (0.3, 0))
    y.on_step(0, 1.0)
    assert y.floor_s == 0.3
    started = clock.t
    y.redis = ScriptedRedis(clock, lambda t: (0.55 if t < started + 5 else 0.52, 0))
    clock.t += 1.0
    y.on_step(1, 1.0)
    assert y.floor_s == 0.3 and y.threshold_s() == pytest.approx(0.36)
