"""The trainer's back-pressure (streams/trainer/yielding.py): it pauses between steps while
a worker reports a p99 over the budget or a growing lag, resumes when they are back under
it, never longer than the longest pause, and counts its pauses."""

from __future__ import annotations

import json
import time
from typing import Any

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
