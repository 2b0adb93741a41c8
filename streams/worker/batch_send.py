"""Many Kafka records per call: one aiokafka record batch per partition.

Faust sends each record on its own (a future, a pending message, a buffer entry and a
produce call per record: about 30 µs of Python each). A worker batch writes a profile
changelog record for every user who acted and a message for every list it made — about
one record per event under load — so those go through :class:`BatchSender` instead: the
records of a call are grouped by partition and appended to one
:meth:`AIOKafkaProducer.create_batch` batch per partition (about 2 µs a record), each
sent with one :meth:`~AIOKafkaProducer.send_batch`.

Records keep the partition Faust would give them: the Java client's murmur2 partitioner
on the key, which both Faust's producer and aiokafka's default partitioner use, so a
profile written here lands in the changelog partition of its user's input partition
(``use_partitioner`` tables), and a list on its user's partition of the recommendations
topic. Only public aiokafka API is used.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from kafka.partitioner.default import murmur2

from tailstream.kafka_io import aiokafka_options
from tailstream.settings import Settings

log = logging.getLogger(__name__)

Record = tuple[bytes | None, bytes | None]
"""(key, value)."""


def partition_of(key: bytes, partitions: int) -> int:
    """The Java client's (and Faust's, and aiokafka's) default partition of a key.

    >>> from aiokafka.partitioner import DefaultPartitioner  # what Faust's producer uses
    >>> partition_of(b"u42", 4), DefaultPartitioner()(b"u42", [0, 1, 2, 3], [0, 1, 2, 3]) == 3
    (3, True)
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class BatchSender:
    """Sends lists of records, one batch per partition; started on first use."""

    def __init__(self, settings: Settings, *, linger_ms: int = 2) -> None:
        self.settings = settings
        self.linger_ms = linger_ms
        self.producer: AIOKafkaProducer | None = None
        self._partitions: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> AIOKafkaProducer:
        async with self._lock:
            if self.producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.settings.kafka_bootstrap, acks="all",
                    linger_ms=self.linger_ms, max_batch_size=1 << 20,
                    max_request_size=8 << 20, **aiokafka_options(self.settings))
                await producer.start()
                self.producer = producer
            return self.producer

    async def stop(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            await producer.stop()

    async def partitions(self, topic: str) -> int:
        """Partitions of ``topic`` (asked once per topic)."""
        n = self._partitions.get(topic)
        if n is None:
            producer = await self.start()
            parts = await producer.partitions_for(topic)
            n = self._partitions[topic] = max(len(parts or ()), 1)
        return n

    async def send(self, topic: str, records: Sequence[Record], *,
                   partition: int | None = None) -> list[asyncio.Future[Any]]:
        """Queue ``records`` (to ``partition``, or each to its key's partition); returns
        one delivery future per batch sent. Raises what the producer raises."""
        if not records:
            return []
        producer = await self.start()
        by_partition: dict[int, list[Record]] = {}
        if partition is not None:
            by_partition[partition] = list(records)
        else:
            n = await self.partitions(topic)
            for key, value in records:
                p = partition_of(key, n) if key is not None else 0
                by_partition.setdefault(p, []).append((key, value))
        futures: list[asyncio.Future[Any]] = []
        for p, part in by_partition.items():
            batch = producer.create_batch()
            for key, value in part:
                if batch.append(key=key, value=value, timestamp=None) is None:
                    futures.append(await producer.send_batch(batch, topic, partition=p))
                    batch = producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a record of {len(value or b'')} bytes does not fit "
                                         f"a batch")
            futures.append(await producer.send_batch(batch, topic, partition=p))
        return futures
