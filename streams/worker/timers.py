"""The worker's timers: what must happen even when no event arrives.

* every half second: dead-letter the offsets the consumer stepped over because their
  record batch cannot be decoded (:mod:`~tailstream.streams.worker.transport`);
* every second: publish the loss weights and copy the imbalance gauges if they changed;
  retry lists a Redis outage held back; add the online figures of served lists to their
  versions' Redis hashes; report catalogue coverage and the tail's share of exposure;
  report the assigned input partitions and each one's consumer lag (and log when the
  assignment changes);
* every ``refresh_check_s``: refresh lists older than ``list_max_age_s`` of users still
  active;
* every ``stuck_partition_s / 5``: the stuck-partition watch (:mod:`~tailstream.streams.
  worker.stuck`) — rejoin the group when partitions held elsewhere make no progress.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

import faust

from tailstream.contract import Rejection
from tailstream.kafka_io import GroupPositions
from tailstream.metrics import Metrics
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.stores.blender_store import BlenderStore, rank1
from tailstream.streams.worker.pipeline import Pipeline, RawMessage
from tailstream.streams.worker.recovery import Recovery
from tailstream.streams.worker.stuck import StuckPartitions
from tailstream.streams.worker.transport import read_offset, request_rejoin, take_undecodable

log = logging.getLogger(__name__)


def names(partitions: Iterable[tuple[str, int]]) -> str:
    """``topic[partition], …`` for the logs.

    >>> names([("clicks", 0), ("carts", 3)])
    'clicks[0], carts[3]'
    """
    return ", ".join(f"{t}[{p}]" for t, p in partitions)


def add_timers(app: faust.App, settings: Settings, pipeline: Pipeline, metrics: Metrics,
               recovery: Recovery) -> None:
    @app.timer(interval=1.0)
    async def publish_loss_weights() -> None:
        await pipeline.publish_weights()
        pipeline.report_gauges()

    @app.timer(interval=1.0)
    async def flush_waiting_lists() -> None:
        """Retry lists a Redis outage held back, even when no events arrive; write the
        online figures (every version's, summed in Redis over the workers); report
        exposure over the recent window."""
        if pipeline.publisher.pending:
            await pipeline.publisher.publish([])
        await pipeline.attribution.flush()
        exposure = pipeline.publisher.exposure
        metrics.coverage.set(exposure.distinct / max(len(pipeline.item_text), 1))
        metrics.tail_exposure.set(exposure.tail_share)

    @app.timer(interval=0.5)
    async def dead_letter_undecodable_batches() -> None:
        """Offsets the consumer stepped over (a batch it cannot decode) go to the DLQ."""
        for skipped in take_undecodable(app.consumer):
            log.error("record batch at %s[%d] offset %d cannot be decoded (%s): "
                      "dead-lettered and skipped", skipped.topic, skipped.partition,
                      skipped.offset, skipped.detail)
            await pipeline.dead_letter(
                RawMessage(skipped.topic, skipped.partition, skipped.offset, None, None, None),
                Rejection("undecodable_batch", skipped.detail))

    @app.timer(interval=settings.refresh_check_s)
    async def refresh_aged_lists() -> None:
        n = await pipeline.refresh.refresh_aged()
        if n:
            log.info("refreshed %d lists older than %.0fs", n, settings.list_max_age_s)

    assignment = AssignmentReport(settings, metrics)

    @app.timer(interval=1.0)
    async def report_assignment() -> None:
        """Assigned input partitions and each one's consumer lag, once their state is
        restored: the gauge is what readiness checks wait on."""
        if recovery.restored.is_set():
            assignment.report(app.consumer)

    # Once the state of a new assignment is restored, at once rather than at the next tick:
    # supervisors and readiness checks wait on it.
    recovery.on_restored.append(lambda: assignment.report(app.consumer))

    redis = getattr(pipeline.publisher, "redis", None)
    if pipeline.state.signals is not None and redis is not None:
        blender = pipeline.refresh.blender
        store = BlenderStore(redis, settings.redis_prefix)

        @app.timer(interval=10.0)
        async def keep_blender() -> None:
            """The hybrid lists' blender: restored once at start, then saved when it
            learned something; its source weights as gauges."""
            if not store.loaded:
                await store.load_into(blender)
            await store.save(blender)
            for source, weight in rank1(blender).items():
                metrics.blend_weight.labels(source).set(weight)

    health = HealthReport(settings, pipeline, metrics, assignment)

    @app.timer(interval=settings.health_publish_s)
    async def publish_health() -> None:
        """Recent latency and lag: to the gauges, and to Redis for the trainer."""
        await health.publish(pipeline.publisher)

    if settings.stuck_partition_s > 0:
        watch = StuckWatch(app, settings, metrics, recovery)

        @app.timer(interval=max(1.0, settings.stuck_partition_s / 5))
        async def rejoin_if_partitions_stuck() -> None:
            """Ask for a rebalance when a partition held elsewhere makes no progress."""
            await watch.check()


class AssignmentReport:
    """The assigned input partitions (a gauge, and a log line when they change) and each
    one's consumer lag (high watermark − next offset to read)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.consumed = frozenset(settings.consumed_topics)
        self.inputs = frozenset(settings.input_topics)
        self.held: frozenset[tuple[str, int]] = frozenset()
        self.lag_labels: set[tuple[str, str]] = set()
        self.lag_total = 0
        """Messages not read yet over every assigned input partition, at the last report."""

    def report(self, consumer: Any) -> None:
        assigned = [tp for tp in consumer.assignment() if tp.topic in self.consumed]
        self.metrics.assigned_partitions.set(sum(tp.topic in self.inputs for tp in assigned))
        now_held = frozenset((tp.topic, tp.partition) for tp in assigned)
        if now_held != self.held:
            # Which worker reads which partition, in its log: the first question when a
            # partition's events stop arriving.
            self.held = now_held
            log.info("holding input partitions: %s", names(sorted(now_held)) or "none")
        now: set[tuple[str, str]] = set()
        total = 0
        for tp in assigned:
            try:
                high = consumer.highwater(tp)
            except Exception:  # noqa: S112 - not known yet for this partition
                continue
            if high is None:
                continue
            read = read_offset(consumer, tp)
            labels = (tp.topic, str(tp.partition))
            lag = max(0, high - (read + 1 if read is not None else 0))
            self.metrics.consumer_lag.labels(*labels).set(lag)
            total += lag if tp.topic in self.inputs else 0
            now.add(labels)
        self.lag_total = total
        for labels in self.lag_labels - now:  # partitions that moved to another worker
            self.metrics.consumer_lag.remove(*labels)
        self.lag_labels = now


class HealthReport:
    """What a worker tells the trainer (``{prefix}:worker-health``, one field per worker):
    the p50 and p99 of its event → Redis latency over the last 10 s, its consumer lag, the
    users waiting for a list, and when. The trainer pauses while any fresh report is over
    the budget or shows the lag growing (:mod:`tailstream.streams.trainer.yielding`)."""

    def __init__(self, settings: Settings, pipeline: Pipeline, metrics: Metrics,
                 assignment: AssignmentReport) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.metrics = metrics
        self.assignment = assignment
        self.field = f"{settings.app_id}:{socket.gethostname()}:{os.getpid()}"
        self.key = Keys(settings.redis_prefix).worker_health

    def snapshot(self, publisher: Any) -> dict[str, float | None]:
        p50, p99 = publisher.recent_latency(0.5), publisher.recent_latency(0.99)
        for q, v in (("0.5", p50), ("0.99", p99)):
            self.metrics.recent_latency.labels(q).set(v if v is not None else 0.0)
        return {"p50_s": p50, "p99_s": p99, "lag": float(self.assignment.lag_total),
                "waiting": float(len(self.pipeline.refresh.waiting)), "at": time.time()}

    async def publish(self, publisher: Any) -> None:
        snap = self.snapshot(publisher)
        redis = getattr(publisher, "redis", None)
        health = getattr(publisher, "health", None)
        if redis is None or (health is not None and not health.allow()):
            return
        try:
            await asyncio.wait_for(redis.hset(self.key, self.field, json.dumps(snap)), 2.0)
        except Exception as exc:  # noqa: BLE001 - advisory: the trainer reads it when it can
            log.debug("could not publish the worker's health: %r", exc)


class StuckWatch:
    """Rejoin the group when input partitions held by another member make no progress."""

    def __init__(self, app: faust.App, settings: Settings, metrics: Metrics,
                 recovery: Recovery) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.recovery = recovery
        self.watch: StuckPartitions[tuple[str, int]] = StuckPartitions(
            settings.stuck_partition_s)
        self.positions = GroupPositions(settings)

    async def check(self) -> None:
        if self.app.rebalancing or not self.recovery.restored.is_set():
            return
        consumer: Any = self.app.consumer
        try:
            committed, ends = await asyncio.to_thread(self.positions.read,
                                                      self.settings.consumed_topics)
        except Exception as exc:  # the broker may be away: the next tick tries again
            log.debug("could not read the group's positions: %r", exc)
            return
        mine = {(tp.topic, tp.partition) for tp in consumer.assignment()}
        now = time.monotonic()
        stuck = self.watch.observe(now, committed, ends, mine)
        self.metrics.stuck_partitions.set(len(stuck))
        if stuck and self.watch.may_act(now):
            log.warning("input partitions %s are held by another member but have not moved "
                        "for %.0fs: rejoining the group so that a rebalance drops the member "
                        "that does not answer", names(stuck), self.settings.stuck_partition_s)
            self.metrics.group_rejoins.inc()
            await request_rejoin(consumer)
