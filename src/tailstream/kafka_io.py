"""Kafka clients in one place: the security translator every client uses, and small
kafka-python helpers shared by the CLI, the demo and the tests.

**One translator.** The security settings (``TAILSTREAM_KAFKA_SECURITY_PROTOCOL``,
``…_SASL_*``, ``…_SSL_CAFILE``) reach three client libraries that spell them three ways:
:func:`kafka_python_options` (kafka-python: producers, readers, admin),
:func:`aiokafka_options` (aiokafka, with an SSL context instead of a CA file) and
:func:`faust_broker_options` (Faust's broker URL, credentials and consumer timing). No
other module reads those settings.

Readers here use *manual partition assignment* rather than a consumer group:
they are readers (subscribe, demo counters, verifiers) that each want every
message, and kafka-python group consumers stall on Tansu's JoinGroup unless
``max_poll_interval_ms`` is tiny.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from tailstream.settings import Settings

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}
RECORD_OVERHEAD = 64 * 1024
"""Room for a record batch's headers beside the largest value the contract accepts."""


def max_message_bytes(settings: Settings) -> int:
    """The largest request a tailstream producer sends and the largest record its topics
    accept: the envelope limit plus the record overhead, so the contract, the producers
    and the topics agree (a 1 MiB envelope does not fit Kafka's default 1,048,588 bytes).

    >>> max_message_bytes(Settings())
    1114112
    """
    return max(settings.max_envelope_bytes, settings.max_event_bytes) + RECORD_OVERHEAD


# --------------------------------------------------------------------------- security
def kafka_python_options(settings: Settings) -> dict[str, Any]:
    """Security options in kafka-python's spelling.

    >>> from tailstream.settings import Secret
    >>> kafka_python_options(Settings().replace(kafka_security_protocol="SASL_SSL",
    ...     kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u",
    ...     kafka_sasl_password=Secret("p")))["sasl_plain_username"]
    'u'
    """
    opts: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = settings.kafka_sasl_password.reveal()
    if settings.kafka_ssl_cafile:
        opts["ssl_cafile"] = settings.kafka_ssl_cafile
    return opts


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if "SSL" not in settings.kafka_security_protocol.upper():
        return None
    return ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Security options in aiokafka's spelling (an SSL context instead of a CA file)."""
    opts: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = settings.kafka_sasl_password.reveal()
    context = _ssl_context(settings)
    if context is not None:
        opts["ssl_context"] = context
    return opts


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """Broker URL, credentials and consumer timing for ``faust.App``."""
    import faust

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
    if settings.group_instance_id:
        opts["consumer_group_instance_id"] = settings.group_instance_id
    proto = settings.kafka_security_protocol.upper()
    context = _ssl_context(settings)
    if proto.startswith("SASL"):
        opts["broker_credentials"] = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.reveal(),
            mechanism=settings.kafka_sasl_mechanism or "PLAIN", ssl_context=context)
    elif context is not None:
        opts["broker_credentials"] = context
    return opts


# --------------------------------------------------------------------------- helpers
def admin(settings: Settings) -> KafkaAdminClient:
    return KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                            client_id="tailstream-admin", **kafka_python_options(settings))


def create_topics(settings: Settings, replication: int = 1, timeout: float = 30.0) -> None:
    """Create tailstream's topics if missing (idempotent). ``items`` and ``impressions``
    (keyed by item and by user) are compacted; the input topics take records as large as
    the contract's envelopes (``max.message.bytes``)."""
    wanted = {t: settings.partitions for t in settings.all_topics}
    compacted = {settings.topic_for("item"), settings.topic(settings.topic_impressions)}
    inputs = {*settings.consumed_topics, settings.topic_for("item")}
    sized = {"max.message.bytes": str(max_message_bytes(settings))}
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = admin(settings)
            try:
                existing = set(client.list_topics())
                new = [
                    NewTopic(name, n, replication,
                             topic_configs={**(COMPACTED if name in compacted else {}),
                                            **(sized if name in inputs else {})})
                    for name, n in wanted.items() if name not in existing
                ]
                if new:
                    try:
                        client.create_topics(new)
                    except TopicAlreadyExistsError:
                        pass
                return
            finally:
                client.close()
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not create topics on {settings.kafka_bootstrap}: "
                                   f"{exc}") from exc
            time.sleep(0.5)


def reader(settings: Settings, topics: Iterable[str], from_beginning: bool = True,
           **extra: Any) -> KafkaConsumer:
    """A group-less consumer assigned every partition of ``topics``."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             enable_auto_commit=False, group_id=None,
                             **kafka_python_options(settings), **extra)
    parts: list[TopicPartition] = []
    for topic in topics:
        found = None
        deadline = time.monotonic() + 10
        while not found and time.monotonic() < deadline:
            found = consumer.partitions_for_topic(topic)
            if not found:
                time.sleep(0.2)
        if not found:
            consumer.close()
            raise RuntimeError(f"topic {topic!r} does not exist on {settings.kafka_bootstrap}")
        parts.extend(TopicPartition(topic, p) for p in sorted(found))
    consumer.assign(parts)
    if from_beginning:
        consumer.seek_to_beginning(*parts)
    else:
        consumer.seek_to_end(*parts)
    return consumer


GONE = object()
"""What :func:`values_at` gives for an offset at or past its partition's log end."""


def values_at(settings: Settings, offsets: dict[tuple[str, int], int],
              timeout: float = 5.0) -> dict[tuple[str, int], bytes | object]:
    """The value of the record at each (topic, partition) → offset; :data:`GONE` where
    the log now ends at or below that offset (a broker that lost its log). A partition
    is left out where nobody can say: the offset is below the log's start (retention),
    a gap (compaction), or no answer came within ``timeout`` seconds.

    Used to ask whether the log a worker read is still the log the broker holds: the
    same offset with another record means the broker started a new one.
    """
    if not offsets:
        return {}
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                             enable_auto_commit=False, group_id=None,
                             request_timeout_ms=int(timeout * 1000) + 1000,
                             **kafka_python_options(settings))
    found: dict[tuple[str, int], bytes | object] = {}
    try:
        parts = {TopicPartition(t, p): o for (t, p), o in offsets.items()}
        consumer.assign(list(parts))
        starts = consumer.beginning_offsets(list(parts), timeout_ms=int(timeout * 1000))
        ends = consumer.end_offsets(list(parts), timeout_ms=int(timeout * 1000))
        wanted = {}
        for tp, offset in parts.items():
            if offset >= ends[tp]:
                found[(tp.topic, tp.partition)] = GONE
            elif offset >= starts[tp]:
                consumer.seek(tp, offset)
                wanted[tp] = offset
            else:
                consumer.pause(tp)
        deadline = time.monotonic() + timeout
        while wanted and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                if tp not in wanted or not records:
                    continue
                if records[0].offset == wanted.pop(tp):
                    found[(tp.topic, tp.partition)] = records[0].value or b""
                consumer.pause(tp)
    finally:
        consumer.close()
    return found


def iter_messages(consumer: KafkaConsumer, stop: threading.Event | None = None,
                  poll_ms: int = 200, idle_timeout: float | None = None) -> Iterator[Any]:
    """Yield records until ``stop`` is set or nothing arrived for ``idle_timeout`` s."""
    last = time.monotonic()
    while stop is None or not stop.is_set():
        batch = consumer.poll(timeout_ms=poll_ms)
        if batch:
            last = time.monotonic()
            for records in batch.values():
                yield from records
        elif idle_timeout is not None and time.monotonic() - last > idle_timeout:
            return


class TopicCounter(threading.Thread):
    """Counts (and optionally inspects) every record of some topics in the background.

    ``every_s`` > 0: read at most once per that many seconds (a poll drains what came
    since). For a reader whose figures come from timestamps inside the records (the
    demo's latency watcher), reading late changes nothing, and each fetch costs the
    broker: the embedded Tansu lists every batch of a partition per fetch, so a reader
    fetching as fast as lists arrive made it work harder the longer the demo ran."""

    def __init__(self, settings: Settings, topics: Iterable[str],
                 on_record: Callable[[Any], None] | None = None, *,
                 every_s: float = 0.0) -> None:
        super().__init__(daemon=True, name="topic-counter")
        self.consumer = reader(settings, list(topics))
        self.on_record = on_record
        self.every_s = every_s
        self.count = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def _records(self) -> Iterator[Any]:
        if self.every_s <= 0:
            yield from iter_messages(self.consumer, self.stop_event)
            return
        while not self.stop_event.wait(self.every_s):
            yield from self._drain(0)
        yield from self._drain(500)  # at stop: what the last rest had not read yet

    def _drain(self, timeout_ms: int, limit_s: float = 5.0) -> Iterator[Any]:
        """Poll until a poll returns nothing (at most ``limit_s``)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            batch = self.consumer.poll(timeout_ms=timeout_ms)
            for records in batch.values():
                yield from records
            if not batch:
                return

    def run(self) -> None:
        try:
            for record in self._records():
                self.count += 1
                if self.on_record is not None:
                    self.on_record(record)
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            self.consumer.close()

    def stop(self) -> int:
        self.stop_event.set()
        self.join(10)
        if self.error is not None:
            log.error("topic counter failed: %r", self.error)
        return self.count


class GroupPositions:
    """The worker group's committed offset and the log end of each partition of some
    topics (blocking kafka-python calls: run them in a thread). Clients are reused."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._admin: Any = None
        self._reader: Any = None

    def read(self, topics: list[str]) -> tuple[dict[tuple[str, int], int | None],
                                               dict[tuple[str, int], int]]:
        s = self.settings
        try:
            if self._admin is None:
                self._admin = admin(s)
            if self._reader is None:
                self._reader = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap,
                                             group_id=None, enable_auto_commit=False,
                                             client_id="tailstream-stuck-watch",
                                             **kafka_python_options(s))
            parts = [TopicPartition(t, p) for t in topics
                     for p in sorted(self._reader.partitions_for_topic(t) or ())]
            ends = self._reader.end_offsets(parts)
            offsets = self._admin.list_group_offsets({s.app_id: parts}).get(s.app_id, {})
        except Exception:
            self.close()  # a broker restart can leave a client unusable: start afresh
            raise
        return ({(tp.topic, tp.partition): (o.offset if (o := offsets.get(tp)) else None)
                 for tp in parts},
                {(tp.topic, tp.partition): int(end) for tp, end in ends.items()})

    def close(self) -> None:
        for client in (self._admin, self._reader):
            if client is not None:
                try:
                    client.close()
                except Exception:  # noqa: S110 - closing a broken client
                    pass
        self._admin = self._reader = None
