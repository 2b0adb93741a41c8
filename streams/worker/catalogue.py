"""The catalogue, read whole by every worker (a broadcast, not a queue).

Events are keyed by user, so a consumer group shares them out: each worker holds its
users. Items are not: any worker's list may hold any item, so every worker needs every
catalogue record (title, category, price; the text its item tower embeds). Read through
the group, as the events are, a worker held only its own partitions of the items topic —
with two workers each indexed half the catalogue — and, since the group commits the
topic's offsets, a restarted worker never read the records before its last commit again:
items it had not seen in events since were out of its index for good.

So :func:`follow_catalogue` reads every partition of the (compacted) items topic with a
group-less aiokafka consumer from the topic's start, in every worker, on every start, and
hands the records to :meth:`~tailstream.streams.worker.pipeline.Pipeline.apply_catalogue`
(an upsert: reading a record twice changes nothing). A malformed record is read by every
worker, and again at each restart; :class:`LetterClaims` lets the first reader write its
dead letter and the others skip it, so the dead-letter topic holds it once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer

from tailstream.contract import CATALOGUE
from tailstream.kafka_io import aiokafka_options
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.worker.pipeline import RawMessage, record_digest
from tailstream.streams.worker.transport import assign_every_partition

log = logging.getLogger(__name__)

CLAIM_TTL_S = 7 * 24 * 3600
"""How long a dead letter's claim is kept: longer than any restart re-reads the topic
within, short enough that claims of a long-compacted topic do not pile up in Redis."""
RETRY_S = 2.0
"""Pause before the follower reconnects after an error (broker away)."""


class LetterClaims:
    """Redis ``SET NX`` per malformed record: true for the first worker to ask.

    The key names the record by topic, partition, offset, element and a digest of its
    bytes, so a broker that lost its log and put another record at the same offset is not
    mistaken for the one claimed. Redis away: true (a dead letter twice, never none).
    """

    def __init__(self, redis: Any, prefix: str, ttl_s: int = CLAIM_TTL_S) -> None:
        self.redis, self.prefix, self.ttl_s = redis, prefix, ttl_s

    def key(self, msg: RawMessage, index: int | None) -> str:
        """The claim's key: topic, partition, offset, element, CRC-32 of the value.

        >>> LetterClaims(None, "ts").key(RawMessage("items", 2, 7, None, b"x", None), 1)
        'ts:letter:items:2:7:1:8cdc1683'
        """
        element = "" if index is None else str(index)
        return Keys(self.prefix).letter(f"{msg.topic}:{msg.partition}:{msg.offset}:{element}:"
                                        f"{record_digest(msg.value):08x}")

    async def __call__(self, msg: RawMessage, index: int | None) -> bool:
        try:
            return bool(await self.redis.set(self.key(msg, index), b"1", nx=True,
                                             ex=self.ttl_s))
        except Exception as exc:  # Redis away: better twice than never
            log.warning("could not claim a dead letter in Redis (%r): writing it anyway", exc)
            return True


def raw_of(record: Any) -> RawMessage:
    """An aiokafka record as the pipeline reads it (timestamps in seconds)."""
    ts = record.timestamp
    return RawMessage(topic=record.topic, partition=record.partition, offset=record.offset,
                      key=record.key, value=record.value,
                      timestamp=ts / 1000.0 if ts is not None and ts >= 0 else None)


async def follow_catalogue(settings: Settings,
                           apply: Callable[[list[RawMessage]], Awaitable[None]],
                           consumer: Any = None) -> None:
    """Read every partition of the items topic from its start, then follow it; call
    ``apply`` with each fetched batch. Runs until cancelled; a broker error restarts the
    read from the start (applying a record again changes nothing)."""
    while True:
        try:
            await _read(settings, apply, consumer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("catalogue reader failed (%r): reading the items topic again in "
                        "%.0f s", exc, RETRY_S)
            await asyncio.sleep(RETRY_S)


async def _read(settings: Settings, apply: Callable[[list[RawMessage]], Awaitable[None]],
                consumer: Any = None) -> None:
    topic = settings.topic_for(CATALOGUE)
    # Earliest on an out-of-range position: a broker that lost its log starts it again.
    consumer = consumer or AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", **aiokafka_options(settings))
    await consumer.start()
    try:
        tps = await assign_every_partition(consumer, topic)
        await consumer.seek_to_beginning(*tps)
        log.info("reading the catalogue: %s, %d partitions, from the start", topic, len(tps))
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=2000)
            for records in batches.values():
                await apply([raw_of(r) for r in records])
    finally:
        await consumer.stop()
