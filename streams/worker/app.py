"""The Faust app: topics, tables, the agents, and the worker's web pages.

Built by :func:`create_app` from a :class:`~tailstream.settings.Settings`, so tests and
several deployments can run side by side. The app does not know whether its broker is
the embedded Tansu or Apache Kafka: it only sees a bootstrap address.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import faust
import redis.asyncio as aioredis
from faust.types import EventT
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tailstream.contract import Rejection
from tailstream.kafka_io import GroupPositions, admin
from tailstream.metrics import Metrics
from tailstream.privacy import pseudonymize
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import RedisBufferStore
from tailstream.streams.stores.deduper import Deduper
from tailstream.streams.stores.publisher import Publisher, meta_key, parse_meta
from tailstream.streams.worker.model_updates import follow_model_updates
from tailstream.streams.worker.pipeline import Pipeline, RawMessage, dlq_headers
from tailstream.streams.worker.scoring import ScoringService
from tailstream.streams.worker.stuck import StuckPartitions
from tailstream.streams.worker.transport import app_class, request_rejoin

log = logging.getLogger(__name__)


@dataclass
class Worker:
    """Everything a worker process holds, for tests and the CLI."""

    app: faust.App
    pipeline: Pipeline
    metrics: Metrics
    redis: aioredis.Redis
    scoring: ScoringService | None


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """Broker URL, credentials and consumer timing for faust.App."""
    opts: dict[str, Any] = {
        "broker": ",".join(f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")),
        # A new worker reads its partitions from the start; committed offsets win after.
        "consumer_auto_offset_reset": "earliest",
    }
    if settings.kafka_session_timeout_s > 0:
        opts["broker_session_timeout"] = settings.kafka_session_timeout_s
        opts["broker_heartbeat_interval"] = min(3.0, settings.kafka_session_timeout_s / 5)
    if settings.kafka_rebalance_timeout_s > 0:
        opts["broker_rebalance_timeout"] = settings.kafka_rebalance_timeout_s
    proto = settings.kafka_security_protocol.upper()
    if proto != "PLAINTEXT":
        import ssl

        ssl_context = None
        if "SSL" in proto:
            ssl_context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        if proto.startswith("SASL"):
            opts["broker_credentials"] = faust.SASLCredentials(
                username=settings.kafka_sasl_username,
                password=settings.kafka_sasl_password.reveal(),
                mechanism=settings.kafka_sasl_mechanism or "PLAIN",
                ssl_context=ssl_context,
            )
        elif ssl_context is not None:
            opts["broker_credentials"] = ssl_context
    return opts


def create_app(settings: Settings) -> Worker:
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise ValueError("the worker needs TAILSTREAM_KAFKA_BOOTSTRAP and TAILSTREAM_REDIS_URL "
                         "(`tailstream up` sets both for the embedded stack)")
    datadir = settings.data_dir / "faust" / settings.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = app_class(settings.kafka_fetch_max_wait_ms)(
        settings.app_id,
        store="memory://",
        # Faust keeps small local files; under the data dir, not the working directory.
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_allow_declare=True,
        web_host=settings.web_host,
        # Faust listens on web_bind (default 0.0.0.0); web_host is only the advertised name.
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        value_serializer="raw",
        key_serializer="raw",
        producer_linger=0.005,
        stream_buffer_maxsize=max(4 * settings.batch_size, 4096),
        **faust_broker_options(settings),
    )
    # Table writes (one changelog record per user per batch) queue in Faust's producer
    # buffer; past `max_messages` (100) the conductor stops feeding the stream and flushes
    # them one at a time, logging a warning each time. A batch routinely writes hundreds
    # of profiles, so the bound is set to a few batches' worth (still bounded memory).
    app.producer.buffer.max_messages = 20 * settings.batch_size
    metrics = Metrics()
    scoring = ScoringService(settings, metrics) if settings.scorer == "transformer" else None
    redis = aioredis.Redis.from_url(settings.redis_url.reveal(), socket_timeout=5,
                                    socket_connect_timeout=2, health_check_interval=10)

    input_topic = app.topic(*settings.consumed_topics,
                            key_type=bytes, value_type=bytes,
                            key_serializer="raw", value_serializer="raw")
    recs_topic = app.topic(settings.topic(settings.topic_recommendations),
                           key_serializer="raw", value_serializer="raw")
    dlq_topic = app.topic(settings.topic(settings.topic_dlq),
                          key_serializer="raw", value_serializer="raw")
    audit_topic = app.topic(settings.topic(settings.topic_processed),
                            key_serializer="raw", value_serializer="raw")
    # Keyed by user_id like the input topics, so the partitioner keeps each profile
    # beside its events; changelog-backed, so a restarted worker recovers it.
    profiles_table = app.Table("user-profiles", default=None, partitions=settings.partitions,
                               use_partitioner=True,
                               key_type=bytes, value_type=bytes, schema=_RAW_SCHEMA)

    # Per source partition, written with that partition's number so the counts move with
    # the partition when a rebalance hands it to another worker.
    counts_table = app.Table("imbalance-counts", default=None, partitions=settings.partitions,
                             key_type=bytes, value_type=bytes, schema=_RAW_SCHEMA)
    requests_topic = app.topic(settings.topic(settings.topic_training_requests),
                               key_serializer="raw", value_serializer="raw")
    buffer_store = RedisBufferStore(redis, settings.redis_prefix)

    def save_counts(states: dict[int, dict[str, Any]]) -> None:
        for partition, state in states.items():
            key = f"p{partition}".encode()
            blob = json.dumps(state, separators=(",", ":")).encode()
            counts_table.data[key] = blob
            counts_table.send_changelog(partition, key, blob)

    async def send_training_request(request: dict[str, Any]) -> None:
        await requests_topic.send(key=settings.app_id.encode(),
                                  value=json.dumps(request, default=float).encode())

    changelogs = {t.changelog_topic.get_topic_name(): t
                  for t in (profiles_table, counts_table)}

    def missing_changelogs() -> set[str]:
        client = admin(settings)
        try:
            return set(changelogs) - set(client.list_topics())
        finally:
            client.close()

    buffer_restored: list[bool] = []
    # Faust resumes the stream before the tables' on_recover callbacks have run: a batch
    # processed in that gap would be counted into empty partitions that the restore then
    # overwrites (its events lost from the counts, already read past). The agent waits.
    counts_restored = asyncio.Event()

    @app.on_partitions_revoked.connect
    def hold_until_restored(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # Every rebalance restores the counts again (on_recover below): a batch applied
        # between the new assignment and that restore would be overwritten by it.
        counts_restored.clear()

    @counts_table.on_recover
    async def restore_imbalance_state() -> None:
        """After (re)assignment: counts from the changelog, the buffer from Redis."""
        loop = pipeline.imbalance
        consumer: Any = app.consumer
        consumer.input_topics = frozenset(settings.consumed_topics)
        missing = await asyncio.to_thread(missing_changelogs)
        reset = bool(missing and (loop.partitions or len(counts_table.data)))
        pipeline.deduper.trust_seen = reset
        if reset:
            # Faust created them at start: a broker without them lost its log (a
            # memory-storage broker restarted). Offsets restart at 0 there, so the
            # watermarks would take new messages for replays, and the fetch positions
            # and any offsets committed since point past records never read.
            metrics.broker_resets.inc()
            log.warning("the broker lost this worker's changelog topics %s (restarted "
                        "without storage?): re-creating them and reading every input "
                        "partition from its start; event_id de-duplication skips what "
                        "was processed already", sorted(missing))
            producer: Any = app.producer
            for name in missing:
                await changelogs[name].changelog_topic.declare()
                # The producer must know the new topic before a table write partitions a
                # key for it (aiokafka's partitioner fails on an unknown topic).
                await producer._ensure_producer().client._wait_on_metadata(name)
            consumer.rewind = {tp for tp in consumer.assignment()
                               if tp.topic in consumer.input_topics}
        for key, blob in counts_table.items():
            if blob:
                loop.load_partition(int(key.decode()[1:]), json.loads(blob))
        if reset:
            loop.forget_offsets()  # after loading: the table holds the old ones
            # Make the state durable again: write it all to the new changelogs.
            save_counts(loop.take_touched())
            for key, value in list(profiles_table.data.items()):
                profiles_table.send_changelog(None, key, value)
        # The buffer is restored from Redis once per process. On later rebalances the
        # in-memory buffer is the newer copy: a batch still in flight has added samples
        # to it whose Redis writes may land after a reload would have read Redis.
        if not buffer_restored:
            try:
                loop.buffer = await buffer_store.load(settings.buffer_capacity,
                                                      settings.minority_share,
                                                      settings.tail_capacity)
                buffer_restored.append(True)
            except Exception:
                log.exception("could not restore the minority buffer from redis; starting "
                              "empty")
        log.info("imbalance state restored: counts %s, buffer %s", loop.totals(),
                 loop.buffer.sizes())
        counts_restored.set()

    async def send_to_dlq(msg: RawMessage, why: Rejection) -> None:
        await dlq_topic.send(key=msg.key, value=msg.value if msg.value is not None else b"",
                             headers=dlq_headers(msg, why))

    async def send_audit(applied: list[str], replayed: list[str]) -> None:
        await audit_topic.send(key=settings.app_id.encode(), value=json.dumps(
            {"applied": applied, "replayed": replayed}, separators=(",", ":")).encode())

    async def send_recs(user_id: str, payload: bytes) -> None:
        await recs_topic.send(key=user_id.encode(), value=payload)

    pipeline = Pipeline(
        settings,
        profiles=_StrKeyed(profiles_table),
        deduper=Deduper(redis, prefix=settings.redis_prefix, ttl_s=settings.dedupe_ttl_s),
        publisher=Publisher(redis, send_recs, metrics, prefix=settings.redis_prefix,
                            ttl_s=settings.recs_ttl_s,
                            max_backoff_s=settings.redis_retry_max_s,
                            remember_users=settings.active_users_max),
        send_to_dlq=send_to_dlq,
        metrics=metrics,
        buffer_store=buffer_store,
        send_training_request=send_training_request,
        save_counts=save_counts,
        scoring=scoring,
        send_audit=send_audit if settings.audit_processed else None,
    )

    if scoring is not None:
        @app.task
        async def serve_transformer() -> None:
            """Load the served model version, then embed catalogue items as they arrive."""
            await scoring.start()
            while scoring.scorer is not None:
                if not await scoring.embed_pending(settings.embed_chunk):
                    await asyncio.sleep(0.1)

        async def on_model_update(update: dict[str, Any]) -> None:
            version = str(update.get("version", ""))
            log.info("model update: %s %s", update.get("action"), version)
            if await scoring.swap_to(version, lambda ids: [
                    pipeline.item_text.get(i) or f"item {i}" for i in ids]):
                n = await pipeline.refresh_active("promotion")
                log.info("refreshed %d active users with %s", n, version)

        @app.task
        async def follow_promotions() -> None:
            """Swap to each promoted version without a restart (every worker)."""
            await follow_model_updates(settings, on_model_update)

    @app.agent(input_topic)
    async def process_events(stream: faust.StreamT[bytes]) -> None:
        """Validate, de-duplicate, update state and refresh the acting users' lists."""
        # take_events (not take): it acks each batch only after this loop body ran.
        batches = cast(faust.Stream[bytes], stream).take_events(
            settings.batch_size, within=settings.batch_within_s)
        async for events in batches:
            if not counts_restored.is_set():
                try:
                    await asyncio.wait_for(counts_restored.wait(), 60.0)
                except TimeoutError:
                    log.warning("imbalance state not restored after 60 s; processing anyway")
                    counts_restored.set()
            batch = [_raw(e) for e in events]
            try:
                await pipeline.process(batch)
            except Exception as exc:
                # The pipeline handles per-event errors itself; this is a batch-level
                # failure (a bug). Dead-letter the batch rather than let Faust ack it away.
                log.exception("batch of %d failed; dead-lettering it", len(batch))
                for msg in batch:
                    try:
                        await pipeline._dead_letter(
                            msg, Rejection("processing_error", repr(exc)[:200]))
                    except Exception:
                        log.exception("dead-lettering failed")

    @app.timer(interval=1.0)
    async def publish_loss_weights() -> None:
        await pipeline.publish_weights()

    @app.timer(interval=1.0)
    async def flush_waiting_lists() -> None:
        """Retry lists a Redis outage held back, even when no events arrive; report
        exposure over the recent window."""
        if pipeline.publisher.pending:
            await pipeline.publisher.publish([])
        exposure = pipeline.publisher.exposure
        metrics.coverage.set(exposure.distinct / max(len(pipeline.item_text), 1))
        metrics.tail_exposure.set(exposure.tail_share)

    @app.timer(interval=settings.refresh_check_s)
    async def refresh_aged_lists() -> None:
        n = await pipeline.refresh_aged()
        if n:
            log.info("refreshed %d lists older than %.0fs", n, settings.list_max_age_s)

    lag_labels: set[tuple[str, str]] = set()
    held: list[frozenset[tuple[str, int]]] = [frozenset()]
    consumed = frozenset(settings.consumed_topics)

    @app.timer(interval=1.0)
    async def report_assignment() -> None:
        """Assigned input partitions and each one's consumer lag."""
        consumer: Any = app.consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic in consumed]
        metrics.assigned_partitions.set(sum(tp.topic in settings.input_topics
                                            for tp in assigned))
        now_held = frozenset((tp.topic, tp.partition) for tp in assigned)
        if now_held != held[0]:
            # Which worker reads which partition, in its log: the first question when
            # a partition's events stop arriving.
            held[0] = now_held
            log.info("holding input partitions: %s", _names(sorted(now_held)) or "none")
        now: set[tuple[str, str]] = set()
        for tp in assigned:
            try:
                high = consumer.highwater(tp)
            except Exception:  # noqa: S112 - not known yet for this partition
                continue
            if high is None:
                continue
            read = consumer._read_offset.get(tp)  # last offset handed to the stream
            labels = (tp.topic, str(tp.partition))
            metrics.consumer_lag.labels(*labels).set(max(0, high - (read + 1 if read is not None
                                                                    else 0)))
            now.add(labels)
        for labels in lag_labels - now:  # partitions that moved to another worker
            metrics.consumer_lag.remove(*labels)
        lag_labels.clear()
        lag_labels.update(now)

    if settings.stuck_partition_s > 0:
        watch: StuckPartitions[tuple[str, int]] = StuckPartitions(settings.stuck_partition_s)
        positions = GroupPositions(settings)

        @app.timer(interval=max(1.0, settings.stuck_partition_s / 5))
        async def rejoin_if_partitions_stuck() -> None:
            """Ask for a rebalance when a partition held elsewhere makes no progress."""
            if app.rebalancing or not counts_restored.is_set():
                return
            consumer: Any = app.consumer
            try:
                committed, ends = await asyncio.to_thread(positions.read, settings.consumed_topics)
            except Exception as exc:  # the broker may be away: the next tick tries again
                log.debug("could not read the group's positions: %r", exc)
                return
            mine = {(tp.topic, tp.partition) for tp in consumer.assignment()}
            now = time.monotonic()
            stuck = watch.observe(now, committed, ends, mine)
            metrics.stuck_partitions.set(len(stuck))
            if stuck and watch.may_act(now):
                log.warning("input partitions %s are held by another member but have not "
                            "moved for %.0fs: rejoining the group so that a rebalance "
                            "drops the member that does not answer",
                            _names(stuck),
                            settings.stuck_partition_s)
                metrics.group_rejoins.inc()
                await request_rejoin(consumer)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.registry),
                         content_type=CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4")

    @app.page("/imbalance")
    async def imbalance_page(web: Any, request: Any) -> Any:
        return web.json(json.loads(json.dumps(pipeline.imbalance.snapshot(), default=float)))

    @app.page("/recommendations/{user_id}")
    async def recommendations_page(web: Any, request: Any, user_id: str) -> Any:
        # Callers ask with the id they know; with pseudonymisation on, lists are stored
        # under its pseudonym.
        user_id = pseudonymize(user_id, settings.pseudonymize_key.reveal())
        found = parse_meta(user_id, await redis.hgetall(meta_key(settings.redis_prefix,
                                                                  user_id)))
        if found is None:
            return web.json({"user_id": user_id, "items": [], "found": False}, status=404)
        return web.json({**found, "found": True})

    return Worker(app=app, pipeline=pipeline, metrics=metrics, redis=redis, scoring=scoring)


def _names(partitions: Iterable[tuple[str, int]]) -> str:
    """``topic[partition], …`` for the logs."""
    return ", ".join(f"{t}[{p}]" for t, p in partitions)


# Table keys and values are bytes we encode ourselves (JSON). Faust writes a changelog with
# the table's schema but reads it back with a codec derived from key_type (JSON unless bytes), so a
# mismatch loses the state on recovery ("Error in recovery: Expecting value"). Tables take
# their changelog codec from key_type/value_type: bytes means raw on both paths.
_RAW_SCHEMA: faust.Schema[bytes, bytes] = faust.Schema(
    key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


def _raw(event: EventT) -> RawMessage:
    m = event.message
    return RawMessage(topic=m.topic, partition=m.partition, offset=m.offset, key=m.key,
                      value=m.value, timestamp=m.timestamp)


class _StrKeyed(MutableMapping[str, Any]):
    """Adapts the bytes-in, bytes-out Faust table to the str → dict mapping of the pipeline."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def get(self, key: str, default: Any = None) -> Any:
        value = self._table.get(key.encode())
        return default if value is None else json.loads(value)

    def __getitem__(self, key: str) -> Any:
        return json.loads(self._table[key.encode()])

    def __setitem__(self, key: str, value: Any) -> None:
        self._table[key.encode()] = json.dumps(value, separators=(",", ":")).encode()

    def __delitem__(self, key: str) -> None:
        del self._table[key.encode()]

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self._table)

    def __len__(self) -> int:
        return len(self._table)
