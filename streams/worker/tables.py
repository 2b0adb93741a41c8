"""The worker's topics and changelog-backed tables (Faust objects, declared once).

* ``user-profiles``: keyed by user_id like the input topics, so the partitioner keeps each
  profile beside its events; a restarted worker recovers it from the changelog.
* ``imbalance-counts``: one record per *source* partition (``p{n}``), written with that
  partition's number, so the class counts and their offset watermarks move with the
  partition when a rebalance hands it to another worker.

Keys and values are bytes we encode ourselves (JSON): see :data:`RAW_SCHEMA`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import faust
import msgspec

from tailstream.settings import Settings

log = logging.getLogger(__name__)

# Faust writes a changelog with the table's schema but reads it back with a codec derived
# from key_type (JSON unless bytes), so a mismatch loses the state on recovery ("Error in
# recovery: Expecting value"). Tables take their changelog codec from key_type/value_type:
# bytes means raw on both paths.
RAW_SCHEMA: faust.Schema[bytes, bytes] = faust.Schema(
    key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")


class Deliveries:
    """Changelog records sent and not yet confirmed, for the next commit to wait for
    (:meth:`settle`, the consumer's ``before_commit``): offsets are committed only once
    the changelog holds the effects of the messages they cover.

    ``on_unconfirmed(n)`` is told how many deliveries failed or were still pending after
    ``timeout_s`` (the commit then goes ahead: holding offsets back for ever would stop
    the group).

    >>> async def demo():
    ...     d = Deliveries(timeout_s=0.05)
    ...     loop = asyncio.get_running_loop()
    ...     ok, slow = loop.create_future(), loop.create_future()
    ...     ok.set_result(1)
    ...     d.add([ok, slow])
    ...     return await d.settle(), d.pending
    >>> asyncio.run(demo())
    (1, 0)
    """

    PRUNE_AT = 10_000
    """Pending futures past which the confirmed ones are dropped (no commit for a while)."""

    def __init__(self, timeout_s: float,
                 on_unconfirmed: Callable[[int], object] | None = None) -> None:
        self.timeout_s = timeout_s
        self.on_unconfirmed = on_unconfirmed
        self._pending: list[asyncio.Future[Any]] = []

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, futures: Iterable[Any]) -> None:
        self._pending.extend(futures)
        if len(self._pending) > self.PRUNE_AT:
            self._pending = [f for f in self._pending if not f.done() or _failed(f)]

    async def settle(self) -> int:
        """Wait for every delivery added before this call (at most ``timeout_s``); returns
        how many were not confirmed."""
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        done, late = await asyncio.wait(pending, timeout=self.timeout_s)
        for fut in late:  # their outcome is read when it comes: never "never retrieved"
            fut.add_done_callback(_failed)
        unconfirmed = sum(1 for f in done if _failed(f)) + len(late)
        if unconfirmed:
            log.warning("%d of %d changelog records not confirmed (failed, or pending after "
                        "%.0f s): committing anyway", unconfirmed, len(pending),
                        self.timeout_s)
            if self.on_unconfirmed is not None:
                self.on_unconfirmed(unconfirmed)
        return unconfirmed


def _failed(fut: asyncio.Future[Any]) -> bool:
    return fut.cancelled() or fut.exception() is not None


@dataclass
class WorkerTopics:
    inputs: Any
    """Every event topic and the catalogue, consumed by one agent."""
    recommendations: Any
    dlq: Any
    audit: Any
    training_requests: Any


@dataclass
class WorkerTables:
    profiles: Any
    counts: Any
    partitions: int
    """Partitions of the changelogs (``TAILSTREAM_PARTITIONS``)."""
    _warned: set[int] = field(default_factory=set)
    deliveries: Deliveries = field(default_factory=lambda: Deliveries(timeout_s=10.0))
    """Changelog records sent and not confirmed yet: the next commit waits for them."""

    def save_counts(self, states: dict[int, dict[str, Any]]) -> None:
        """Write each source partition's counts to its own changelog partition. A source
        partition beyond the changelog's (an input topic with more partitions than the
        tables: auto-created by a broker that lost its log) is kept in memory only — and
        said once — rather than crash the worker's producer."""
        for partition, state in states.items():
            if partition >= self.partitions:
                if partition not in self._warned:
                    self._warned.add(partition)
                    log.error("input partition %d has no changelog partition (the input "
                              "topics have more partitions than TAILSTREAM_PARTITIONS=%d: "
                              "re-created by a broker that lost its log?): its class "
                              "counts are kept in memory only", partition, self.partitions)
                continue
            key = f"p{partition}".encode()
            blob = json.dumps(state, separators=(",", ":")).encode()
            self.counts.data[key] = blob
            self.deliveries.add([self.counts.send_changelog(partition, key, blob)])

    def changelogs(self) -> dict[str, Any]:
        """Changelog topic name → its table."""
        return {t.changelog_topic.get_topic_name(): t for t in (self.profiles, self.counts)}

    def counts_by_partition(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The stored counts of every source partition this worker holds."""
        for key, blob in self.counts.items():
            if blob:
                yield int(key.decode()[1:]), json.loads(blob)


def declare_topics(app: faust.App, settings: Settings) -> WorkerTopics:
    def raw(name: str) -> Any:
        return app.topic(settings.topic(name), key_serializer="raw", value_serializer="raw")

    return WorkerTopics(
        inputs=app.topic(*settings.consumed_topics, key_type=bytes, value_type=bytes,
                         key_serializer="raw", value_serializer="raw"),
        recommendations=raw(settings.topic_recommendations), dlq=raw(settings.topic_dlq),
        audit=raw(settings.topic_processed),
        training_requests=raw(settings.topic_training_requests))


def declare_tables(app: faust.App, settings: Settings) -> WorkerTables:
    profiles = app.Table("user-profiles", default=None, partitions=settings.partitions,
                         use_partitioner=True, key_type=bytes, value_type=bytes,
                         schema=RAW_SCHEMA)
    counts = app.Table("imbalance-counts", default=None, partitions=settings.partitions,
                       key_type=bytes, value_type=bytes, schema=RAW_SCHEMA)
    return WorkerTables(profiles, counts, settings.partitions)


_encode = msgspec.json.encode
_decode = msgspec.json.decode

SendRecords = Callable[[str, list[tuple[bytes, bytes]]], Awaitable[None]]
"""(changelog topic, [(key, value)]): sends and waits for delivery."""


class StrKeyed(MutableMapping[str, Any]):
    """Adapts the bytes-in, bytes-out Faust table to the str → dict mapping of the pipeline.

    Values are JSON (msgspec: the same JSON as ``json.dumps`` with compact separators,
    but UTF-8 instead of ``\\u`` escapes, at a fifth of the cost). :meth:`save_many` writes
    a batch's values and their changelog records in one send (:mod:`~.batch_send`)."""

    def __init__(self, table: Any, send: SendRecords | None = None) -> None:
        self._table = table
        self._send = send

    def get(self, key: str, default: Any = None) -> Any:
        # The table's store directly: the same value as ``table.get`` for a plain
        # (non-windowed) table, without its per-call bookkeeping.
        value = self._table.data.get(key.encode())
        return default if value is None else _decode(value)

    def __getitem__(self, key: str) -> Any:
        return _decode(self._table[key.encode()])

    def __setitem__(self, key: str, value: Any) -> None:
        self._table[key.encode()] = _encode(value)

    async def save_many(self, values: Mapping[str, Any]) -> None:
        """Write ``values`` to the table and to its changelog in one batched send (or one
        Faust write each, without a sender), and wait until the changelog holds them."""
        if self._send is None:
            for key, value in values.items():
                self[key] = value
            return
        records = [(key.encode(), _encode(value)) for key, value in values.items()]
        data = self._table.data
        for key_bytes, blob in records:
            data[key_bytes] = blob
        await self._send(self._table.changelog_topic.get_topic_name(), records)

    def __delitem__(self, key: str) -> None:
        del self._table[key.encode()]

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self._table)

    def __len__(self) -> int:
        return len(self._table)
