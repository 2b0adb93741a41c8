"""The Faust app of a worker: one agent over the input topics, and what surrounds it.

Built by :func:`create_app` from a :class:`~tailstream.settings.Settings`, so tests and
several deployments can run side by side. The app does not know whether its broker is
the embedded Tansu or Apache Kafka: it only sees a bootstrap address. The parts:

* topics and tables — :mod:`~tailstream.streams.worker.tables`;
* the per-batch work — :class:`~tailstream.streams.worker.pipeline.Pipeline` (ingest →
  de-duplicate → state → imbalance loop → refresh), over Redis-backed stores
  (:mod:`tailstream.streams.stores`);
* restore after (re)assignment and broker resets — :mod:`~tailstream.streams.worker.recovery`;
* timers and web pages — :mod:`~.timers`, :mod:`~.pages`;
* the transformer's tasks (serve, follow promotions) — :mod:`~.model_updates`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, cast

import faust
import redis.asyncio as aioredis
from faust.types import EventT

from tailstream import configs
from tailstream.contract import Rejection
from tailstream.kafka_io import faust_broker_options
from tailstream.metrics import Metrics
from tailstream.redis_io import RedisHealth
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import RedisBufferStore
from tailstream.streams.stores.deduper import Deduper
from tailstream.streams.stores.impressions import OnlineCounters
from tailstream.streams.stores.publisher import Publisher
from tailstream.streams.worker.attribution import Attribution
from tailstream.streams.worker.batch_send import BatchSender
from tailstream.streams.worker.catalogue import LetterClaims, follow_catalogue
from tailstream.streams.worker.dead_letters import DeadLetter
from tailstream.streams.worker.loop_watch import LoopWatch
from tailstream.streams.worker.model_updates import add_model_tasks
from tailstream.streams.worker.pages import add_pages
from tailstream.streams.worker.pipeline import Pipeline, RawMessage
from tailstream.streams.worker.recovery import Recovery
from tailstream.streams.worker.scoring import ScoringService
from tailstream.streams.worker.tables import (
    Deliveries,
    StrKeyed,
    WorkerTables,
    WorkerTopics,
    declare_tables,
    declare_topics,
)
from tailstream.streams.worker.timers import add_timers
from tailstream.streams.worker.transport import app_class, log_end, set_producer_buffer

log = logging.getLogger(__name__)

CHANGELOG_WAIT_S = 10.0
"""Longest a batch waits for the previous batch's profile records to be confirmed (then its
own are kept and sent again with the next batch: a compacted changelog keeps the
newest), and a commit for the changelog records sent before it (then it commits anyway,
counted in ``tailstream_changelog_unconfirmed_total``)."""


@dataclass
class Worker:
    """Everything a worker process holds, for tests and the CLI."""

    app: faust.App
    pipeline: Pipeline
    metrics: Metrics
    redis: aioredis.Redis
    scoring: ScoringService | None


def faust_app(settings: Settings) -> faust.App:
    datadir = settings.data_dir / "faust" / settings.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = app_class(settings.kafka_fetch_max_wait_ms)(
        settings.app_id, store="memory://",
        # Faust keeps small local files; under the data dir, not the working directory.
        datadir=str(datadir), topic_partitions=settings.partitions, topic_allow_declare=True,
        # Faust listens on web_bind (default 0.0.0.0); web_host is only the advertised name.
        web_host=settings.web_host, web_bind=settings.web_host, web_port=settings.web_port,
        web_in_thread=False, value_serializer="raw", key_serializer="raw",
        producer_linger=0.005, stream_buffer_maxsize=max(4 * settings.batch_size, 4096),
        recovery_consistency_check=settings.kafka_recovery_consistency_check,
        **faust_broker_options(settings))
    # A batch routinely writes hundreds of profiles (one changelog record each): past the
    # default bound (100) the conductor stops feeding the stream and flushes them one at a
    # time. A few batches' worth keeps memory bounded without that stall.
    set_producer_buffer(app, 20 * settings.batch_size)
    return app


GC_THRESHOLDS = (50_000, 20, 100)
"""Allocations between two young-generation collections (CPython's default is 700). A
batch allocates millions of short-lived containers (decoded events, profiles, samples):
with the default, the collector ran every few hundred events and, each tenth time, walked
the worker's whole heap (torch, transformers, Faust: millions of objects). Measured on the
in-process pipeline: 43 → 24 µs per event."""


SWITCH_INTERVAL_S = 0.001
"""How long a thread may hold the interpreter before another that waits gets it (CPython's
default is 5 ms). The torch thread releases the interpreter around each of the hundreds of
small operations of an encoder pass and must take it back after each: with the default, a
busy event loop made it wait up to 5 ms every time, and a 20 ms scoring turn took 150."""


def tune_interpreter() -> None:
    """Switch threads more often (:data:`SWITCH_INTERVAL_S`), so the scoring thread is not
    starved by the event loop."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def tune_gc() -> None:
    """Fewer collections, and none of what is loaded so far (:func:`gc.freeze` moves it to
    a generation the collector never walks). Called once the app is built and again once
    the model is loaded."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def create_app(settings: Settings) -> Worker:
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise ValueError("the worker needs TAILSTREAM_KAFKA_BOOTSTRAP and TAILSTREAM_REDIS_URL "
                         "(`tailstream up` sets both for the embedded stack)")
    app = faust_app(settings)
    metrics = Metrics()
    scoring = ScoringService(settings, metrics) if settings.scorer == "transformer" else None
    redis = aioredis.Redis.from_url(settings.redis_url.reveal(), socket_timeout=5,
                                    socket_connect_timeout=2, health_check_interval=10)
    topics, tables = declare_topics(app, settings), declare_tables(app, settings)
    tables.deliveries = Deliveries(CHANGELOG_WAIT_S, metrics.changelog_unconfirmed.inc)
    buffer_store = RedisBufferStore(redis, settings.redis_prefix)
    sender = BatchSender(settings)
    pipeline = build_pipeline(settings, topics, tables, metrics, redis, buffer_store, scoring,
                              sender)
    pipeline.log_end = lambda topic, partition: log_end(app.consumer, topic, partition)
    recovery = Recovery(app, settings, tables, pipeline, buffer_store, metrics)
    recovery.install()
    pipeline.claim_letter = LetterClaims(redis, settings.redis_prefix)

    @app.task
    async def read_catalogue() -> None:
        """Every partition of the items topic, in every worker (catalogue.py)."""
        async def apply(records: list[RawMessage]) -> None:
            async with recovery.turn:
                await pipeline.apply_catalogue(records)

        await follow_catalogue(settings, apply)

    @app.agent(topics.inputs)
    async def process_events(stream: faust.StreamT[bytes]) -> None:
        """Validate, de-duplicate, update state and refresh the acting users' lists."""
        # take_events (not take): it acks each batch only after this loop body ran.
        batches = cast(faust.Stream[bytes], stream).take_events(
            settings.batch_size, within=settings.batch_within_s)
        async for events in batches:
            if scoring is not None:  # the first lists from the model, not the baseline
                await scoring.wait_loaded(settings.scorer_start_wait_s)
            await recovery.wait_restored()
            async with recovery.turn:
                await process_batch(pipeline, [_raw(e) for e in events])

    async def stop_sender(app: faust.App, *args: Any, **kwargs: Any) -> None:
        await sender.stop()

    app.on_before_shutdown.connect(cast(Any, stop_sender))

    add_timers(app, settings, pipeline, metrics, recovery)
    watch = LoopWatch(metrics, stall_s=settings.loop_stall_ms / 1000.0)

    @app.task
    async def watch_the_loop() -> None:
        await watch.run()

    add_pages(app, settings, pipeline, metrics, redis)
    if scoring is not None:
        add_model_tasks(app, settings, scoring, pipeline)
    tune_gc()
    if scoring is not None:
        tune_interpreter()
    return Worker(app=app, pipeline=pipeline, metrics=metrics, redis=redis, scoring=scoring)


def build_pipeline(settings: Settings, topics: WorkerTopics, tables: WorkerTables,
                   metrics: Metrics, redis: aioredis.Redis, buffer_store: RedisBufferStore,
                   scoring: ScoringService | None, sender: BatchSender) -> Pipeline:
    """The pipeline over the worker's topics, tables and Redis-backed stores. Profiles'
    changelog records and the lists' messages go out a batch at a time (:class:`BatchSender`),
    the rest through Faust."""
    recs_topic = settings.topic(settings.topic_recommendations)
    impressions_topic = settings.topic(settings.topic_impressions)
    in_flight: list[asyncio.Future[Any]] = []

    async def send_changelog(topic: str, records: list[tuple[bytes, bytes]]) -> None:
        # The previous batch's records are confirmed before this batch's go (and before
        # this batch is acked); this batch's delivery overlaps the next batch's work
        # instead of adding a produce round trip to every batch. The next commit waits
        # for them too (tables.deliveries).
        if in_flight:
            try:
                await asyncio.wait_for(asyncio.gather(*in_flight), CHANGELOG_WAIT_S)
            finally:
                in_flight.clear()
        futures = await sender.send(topic, records)
        in_flight.extend(futures)
        tables.deliveries.add(futures)

    async def send_recs_many(lists: list[tuple[str, bytes]]) -> None:
        await sender.send(recs_topic, [(u.encode(), v) for u, v in lists])

    async def send_impressions(records: list[tuple[str, bytes]]) -> None:
        await sender.send(impressions_topic, [(u.encode(), v) for u, v in records])

    async def send_to_dlq(letter: DeadLetter) -> None:
        await topics.dlq.send(key=letter.key, value=letter.value, headers=letter.headers)

    async def send_audit(applied: list[str], replayed: list[str]) -> None:
        await topics.audit.send(key=settings.app_id.encode(), value=json.dumps(
            {"applied": applied, "replayed": replayed}, separators=(",", ":")).encode())

    async def send_recs(user_id: str, payload: bytes) -> None:
        await topics.recommendations.send(key=user_id.encode(), value=payload)

    async def send_training_request(request: dict[str, Any]) -> None:
        await topics.training_requests.send(key=settings.app_id.encode(),
                                            value=json.dumps(request, default=float).encode())

    attribution = Attribution(
        configs.attribution_config(settings), metrics,
        OnlineCounters(redis, settings.redis_prefix, health=RedisHealth.of(redis)),
        redis=redis, prefix=settings.redis_prefix, health=RedisHealth.of(redis))
    return Pipeline(
        settings,
        profiles=StrKeyed(tables.profiles, send_changelog),
        deduper=Deduper(redis, prefix=settings.redis_prefix, ttl_s=settings.dedupe_ttl_s),
        publisher=Publisher(redis, send_recs, metrics, prefix=settings.redis_prefix,
                            ttl_s=settings.recs_ttl_s, max_backoff_s=settings.redis_retry_max_s,
                            remember_users=settings.active_users_max,
                            send_many=send_recs_many,
                            impression_ttl_s=max(1, math.ceil(settings.attribution_window_s)),
                            send_impressions=send_impressions,
                            on_impressions=attribution.shown),
        send_to_dlq=send_to_dlq, metrics=metrics, buffer_store=buffer_store,
        send_training_request=send_training_request, save_counts=tables.save_counts,
        scoring=scoring, send_audit=send_audit if settings.audit_processed else None,
        attribution=attribution)


async def process_batch(pipeline: Pipeline, batch: list[RawMessage]) -> None:
    """One batch through the pipeline. The pipeline handles per-event errors itself; an
    exception here is a batch-level failure (a bug): the batch is dead-lettered rather than
    acked away."""
    try:
        await pipeline.process(batch)
    except Exception as exc:
        log.exception("batch of %d failed; dead-lettering it", len(batch))
        for msg in batch:
            try:
                await pipeline.dead_letter(msg, Rejection("processing_error", repr(exc)[:200]))
            except Exception:
                log.exception("dead-lettering failed")


def _raw(event: EventT) -> RawMessage:
    m = event.message
    return RawMessage(topic=m.topic, partition=m.partition, offset=m.offset, key=m.key,
                      value=m.value, timestamp=m.timestamp)
