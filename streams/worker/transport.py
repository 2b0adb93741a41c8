"""Faust's aiokafka transport, adapted — and the only module that touches Faust's,
mode's or aiokafka's private attributes.

* **Fetch wait.** faust-streaming creates its consumer with ``fetch_max_wait_ms=1500``
  hard-coded. A broker that does not answer a pending fetch as soon as data arrives
  (Tansu, like some other Kafka-protocol brokers) then adds up to that wait to every
  event's latency: we measured a p50 of ~500 ms at 50 events/s.
  ``TAILSTREAM_KAFKA_FETCH_MAX_WAIT_MS`` bounds it (:func:`app_class`).
* **Seeks.** With no committed offset, read from the start (faust-streaming#216), and
  rewind every input after a broker lost its log, and read again from where the restored
  counts end any input committed past it (:meth:`perform_seek`). Each input partition is
  delivered in offset order without holes (:class:`InOrder`).
* **Small private accesses** the worker needs (rejoin the group, the last offset read, a
  topic's metadata, the producer buffer's bound), each behind one function here, so an
  upgrade of those libraries has one file to check.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka import TopicPartition
from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    """An offset skipped because its record batch cannot be decoded (a corrupt or
    unreadable compressed batch), for the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    detail: str


class _Guard:
    """Lets a fetch deliver the records before an undecodable batch and report the batch
    instead of raising (aiokafka raises out of ``getmany``, which stops Faust's fetcher and
    the worker with it).

    Every fetched partition's record iterator is wrapped once. A wrapped iterator that fails
    after some records ends there: those records are delivered and the position stops at
    the bad batch. One that fails before any record means the batch at the position cannot
    be read: :meth:`skip` moves the position one record past it and reports the offset
    (a batch of n records takes n fetches, each offset dead-lettered on its own)."""

    def __init__(self) -> None:
        self.failed: list[tuple[Any, int, str]] = []  # (tp, offset, detail), zero-yield only

    def wrap(self, fetcher: Any) -> None:
        for tp, result in list(fetcher._records.items()):
            records: Any = getattr(result, "_partition_records", None)
            inner = getattr(records, "_records_iterator", None)
            if inner is None or getattr(records, "_tailstream_guarded", False):
                continue
            records._tailstream_guarded = True
            records._records_iterator = self._guarded(tp, records, inner)

    def _guarded(self, tp: Any, records: Any, inner: Iterator[Any]) -> Iterator[Any]:
        start = records.next_fetch_offset
        yielded = 0
        try:
            for record in inner:
                yielded += 1
                yield record
        except Exception as exc:  # noqa: BLE001 - any decoding failure of this batch
            if not yielded and records.next_fetch_offset == start:
                self.failed.append((tp, start, f"{type(exc).__name__}: {exc}"[:300]))

    def skip(self, consumer: Any, found: deque[Undecodable],
             skipped: Callable[[Any, int], None] | None = None) -> None:
        """Seek past each batch that failed at the position (run after the fetch)."""
        failed, self.failed = self.failed, []
        for tp, offset, detail in failed:
            try:
                position = consumer._subscription.subscription.assignment.state_value(
                    tp).position
            except (AttributeError, AssertionError):
                continue  # no longer assigned: whoever holds it next reads it again
            if position != offset:
                continue  # moved on meanwhile (a seek): read it again
            consumer.seek(tp, offset + 1)
            if skipped is not None:
                skipped(tp, offset)
            found.append(Undecodable(tp.topic, tp.partition, offset, detail))


class InOrder:
    """Delivers each input partition's records in offset order, without holes.

    The pipeline's offset watermarks take every record at or below the highest offset
    applied for a replay, so a record delivered after a later one of its partition is
    skipped for good. Faust does not prevent that around a seek: a fetch begun before a
    restart's seek to the committed offsets can deliver records from the old position
    after it, Faust takes the jump forward for a gap in the log (acknowledging the offsets
    between as processed) and drops the records re-read from the committed offset as old
    (a kill -9 test lost 58 events so); records read while the seek was under way, before
    Faust reset its read offset, went unapplied the same way (53 events). So each input
    partition's next offset is tracked here: a record older than it was delivered already
    and is dropped; a record beyond it is held back and the partition sought back to it,
    so the records between are read (re-reading is a replay the worker recognises;
    skipping is a loss). Offsets stepped over as undecodable (:class:`_Guard`) are holes
    on purpose; a hole that stays after :attr:`JUMP_TRIES` reads (records deleted by
    retention) is accepted with a warning.

    >>> g = InOrder()
    >>> g.sought("clicks/2", 757)
    >>> [g.admit("clicks/2", o) for o in (757, 758, 923, 924)]
    [True, True, False, False]
    >>> g.take_reseeks()
    {'clicks/2': 759}
    >>> g.sought("clicks/2", 759); [g.admit("clicks/2", o) for o in (758, 759)]
    [False, True]
    >>> g.skipped("clicks/2", 760); g.admit("clicks/2", 761)
    True
    """

    JUMP_TRIES = 3

    def __init__(self) -> None:
        self._next: dict[Any, int] = {}
        self._reseek: dict[Any, int] = {}
        self._skipped: dict[Any, set[int]] = {}
        self._jumps: dict[Any, tuple[int, int, int]] = {}  # tp: (from, to, times)
        self.on_reread: Callable[[int], object] = lambda n: None
        """Told how many partitions are sought back (the worker's metric)."""

    def sought(self, tp: Any, offset: int) -> None:
        """A seek of ``tp`` to ``offset`` took effect: its records go on from there."""
        self._next[tp] = offset
        self._reseek.pop(tp, None)

    def skipped(self, tp: Any, offset: int) -> None:
        """``offset`` was stepped over as undecodable (called from the consumer's thread)."""
        self._skipped.setdefault(tp, set()).add(offset)

    def admit(self, tp: Any, offset: int) -> bool:
        """Whether the record of ``tp`` at ``offset`` may be delivered now."""
        expect = self._next.get(tp)
        if expect is None or offset == expect:
            self._next[tp] = offset + 1
            return True
        if offset < expect:
            return False
        if tp in self._reseek:
            return False
        if self._hole_accepted(tp, expect, offset):
            self._next[tp] = offset + 1
            return True
        self._reseek[tp] = expect
        return False

    def _hole_accepted(self, tp: Any, expect: int, offset: int) -> bool:
        skipped = self._skipped.get(tp, set())
        if offset - expect <= len(skipped) and all(o in skipped for o in range(expect, offset)):
            skipped.difference_update(range(expect, offset))
            return True
        first, last, times = self._jumps.get(tp, (expect, offset, 0))
        times = times + 1 if (first, last) == (expect, offset) else 1
        self._jumps[tp] = (expect, offset, times)
        if times < self.JUMP_TRIES:
            return False
        log.warning("%s: offsets %d..%d could not be read (deleted by retention?); going "
                    "on from %d", tp, expect, offset - 1, offset)
        del self._jumps[tp]
        return True

    def take_reseeks(self) -> dict[Any, int]:
        """Partitions whose records were held back, and the offset to read them from."""
        out, self._reseek = self._reseek, {}
        if out:
            self.on_reread(len(out))
        return out


class CommitsAfterChangelog:
    """A Faust consumer mixin: each commit waits for ``before_commit`` (the worker's
    :meth:`~tailstream.streams.worker.tables.Deliveries.settle`), so offsets are committed
    only once the changelog holds the effects of what they cover. Faust flushes its
    producer first, but that flush gives up on a buffered message not sent within 0.1 s:
    under load a commit got ahead of the counts' changelog, and a worker killed then left
    its successor counts without events it never read again (a CI run of the kill -9
    test: 872 short)."""

    before_commit: Callable[[], Awaitable[object]] | None = None

    async def _commit_offsets(self, offsets: Any, start_new_transaction: bool = True
                              ) -> bool:
        if self.before_commit is not None:
            await self.before_commit()
        parent: Any = super()
        return bool(await parent._commit_offsets(
            offsets, start_new_transaction=start_new_transaction))


class SeeksWhereStateEnds:
    """A Faust consumer mixin: after Faust's seek to the committed offsets, read the input
    partitions from where the worker's state needs them (:meth:`perform_seek`)."""

    #: input partitions to read from offset 0 at the next seek (set on a broker reset)
    rewind: set[Any] = set()
    input_topics: frozenset[str] = frozenset()
    #: (topic, partition) → the first offset the restored counts do not hold, for the next
    #: seek (set at each restore: :meth:`_seek_to_counts`)
    resume_at: dict[tuple[str, int], int] | None = None
    #: told how many input partitions were sought back to their counts (a metric)
    on_behind_commit: Callable[[int], object] | None = None

    async def perform_seek(self) -> None:
        """Faust seeks to committed offsets; with none committed it leaves the position
        where the fetcher got to while partitions were resumed, and the records fetched
        in that window were dropped (faust-streaming#216). Read those from the start,
        as auto_offset_reset=earliest promises, and all of a reset broker's inputs."""
        this: Any = self
        parent: Any = super()
        await parent.perform_seek()
        assigned = set(this.assignment())
        uncommitted = {tp for tp in assigned if tp.topic in self.input_topics
                       and this._committed_offset.get(tp) is None}
        from_start = uncommitted | (self.rewind & assigned)
        for tp in from_start:
            await this.seek(tp, 0)
        self.rewind = set()
        await self._seek_to_counts(from_start)

    async def _seek_to_counts(self, from_start: set[Any]) -> None:
        """Read again from where the restored counts end any input partition whose
        committed offset is past it (a commit that went ahead of the counts' changelog
        record): those messages are not replays, and skipping them loses their counts."""
        this: Any = self
        resume_at, self.resume_at = self.resume_at, None
        if resume_at is None:
            return
        behind = 0
        for tp in this.assignment():
            committed = this._committed_offset.get(tp)
            if tp.topic not in self.input_topics or tp in from_start or committed is None:
                continue
            offset = resume_at.get((tp.topic, tp.partition))
            if offset is not None and offset < committed:
                log.warning("%s: the offset committed (%d) is past the restored counts, "
                            "which hold the offsets below %d only: reading from there",
                            tp, committed, offset)
                await this.seek(tp, offset)
                behind += 1
        if behind and self.on_behind_commit is not None:
            self.on_behind_commit(behind)


def app_class(fetch_max_wait_ms: int) -> type[faust.App]:
    """A ``faust.App`` subclass whose consumer waits at most ``fetch_max_wait_ms`` per fetch
    and steps over record batches it cannot decode (see :class:`_Guard`)."""
    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._guard = _Guard()

        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # Read by AIOKafkaConsumer.start() when it builds its Fetcher.
            if fetch_max_wait_ms > 0:
                consumer._fetch_max_wait_ms = fetch_max_wait_ms
            return consumer

        async def _fetch_records(self, consumer: Any, active_partitions: Any,
                                 timeout: float | None = None,
                                 max_records: int | None = None) -> Any:
            """Faust's fetch, with the records guarded: ``fetched_records``' own wait loop,
            so that results arriving while it waits are guarded too."""
            fetcher = consumer._fetcher
            loop = asyncio.get_running_loop()
            deadline = loop.time() + (timeout or 0.0)
            while True:
                self._guard.wrap(fetcher)
                records = await super()._fetch_records(consumer, active_partitions,
                                                       timeout=0, max_records=max_records)
                faust_consumer: Any = self.consumer
                self._guard.skip(consumer, faust_consumer.undecodable,
                                 faust_consumer.in_order.skipped)
                remaining = deadline - loop.time()
                if records or remaining <= 0 or fetcher._closed:
                    return records
                waiter = fetcher._create_fetch_waiter()
                done, _ = await asyncio.wait([waiter], timeout=remaining)
                if not done:
                    waiter.cancel()
                    return records

    class FastFetchConsumer(CommitsAfterChangelog, SeeksWhereStateEnds,
                            faust_aiokafka.Consumer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            #: offsets stepped over as undecodable, waiting to be dead-lettered (appended in
            #: the consumer's thread, taken on the worker's loop: a deque is safe for that)
            self.undecodable: deque[Undecodable] = deque()
            self.in_order = InOrder()

        async def seek_to_committed(self) -> Any:
            committed = await super().seek_to_committed()
            for tp, offset in committed.items():
                if offset is not None and offset >= 0:
                    self.in_order.sought(tp, offset)
            return committed

        async def seek(self, partition: Any, offset: int) -> None:
            await super().seek(partition, offset)
            self.in_order.sought(partition, offset)

        async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
            for tp, offset in self.in_order.take_reseeks().items():
                if tp in self.assignment():
                    log.info("%s read again from offset %d (records out of order)", tp, offset)
                    await self.seek(tp, offset)
            return await super()._getmany(active_partitions, timeout)

        async def getmany(self, timeout: float) -> Any:
            """Faust's delivery, inputs in offset order without holes (:class:`InOrder`).

            Faust then drops a record below the read offset it set last, and it sets that
            *after* a record's hand-over to the stream returns: a record fetched before a
            seek back, whose hand-over waited on a full stream buffer while the seek ran,
            puts the read offset back above the offsets sought, and the records read again
            would be dropped unapplied. A record admitted here is the next one of its
            partition, so Faust's read offset is brought down to it first (its hand-over
            loop takes the next record only after setting the last one's offset)."""
            admit = self.in_order.admit  # (input_topics is read per record: set at restore)
            read = self._read_offset
            async for tp, message in super().getmany(timeout):
                if tp.topic not in self.input_topics:
                    yield tp, message
                elif admit(tp, message.offset):
                    last = read.get(tp)
                    if last is not None and message.offset < last:
                        read[tp] = message.offset
                    yield tp, message

        def _new_consumer_thread(self) -> ConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    transport = type("Transport", (faust_aiokafka.Transport,), {"Consumer": FastFetchConsumer})

    class App(faust.App):  # noqa: D106
        consumer_class = FastFetchConsumer

        def _new_transport(self) -> Any:
            return transport(self.conf.broker_consumer, self)

    return App


async def request_rejoin(consumer: Any) -> None:
    """Make the aiokafka consumer under Faust rejoin its group (in the consumer's thread,
    where its event loop runs)."""
    thread = consumer._thread

    async def rejoin() -> None:
        thread._ensure_consumer()._coordinator.request_rejoin()

    await thread.call_thread(rejoin)


# --------------------------------------------------------------------------- private access
# Everything below reaches into Faust's, mode's or aiokafka's internals (attributes with a
# leading underscore). This module is the only place that does; a test keeps it so.
def set_producer_buffer(app: faust.App, max_messages: int) -> None:
    """Bound of Faust's producer buffer before the conductor stops feeding the stream
    (table writes queue there: one changelog record per user per batch)."""
    app.producer.buffer.max_messages = max_messages


def count_rereads(consumer: Any, inc: Callable[[int], object]) -> None:
    """Report each input partition sought back by :class:`InOrder` to ``inc``."""
    consumer.in_order.on_reread = inc


def take_undecodable(consumer: Any) -> list[Undecodable]:
    """The offsets the consumer stepped over since the last call."""
    found: deque[Undecodable] = consumer.undecodable
    out = []
    while found:
        out.append(found.popleft())
    return out


def set_input_topics(consumer: Any, topics: frozenset[str]) -> None:
    """The topics whose partitions :class:`FastFetchConsumer` reads from the start."""
    consumer.input_topics = topics


def set_before_commit(consumer: Any, hook: Callable[[], Awaitable[object]]) -> None:
    """What :class:`FastFetchConsumer` awaits before each commit."""
    consumer.before_commit = hook


def resume_from_counts(consumer: Any, resume_at: dict[tuple[str, int], int],
                       on_behind: Callable[[int], object]) -> None:
    """At the next seek, read each assigned input partition from ``resume_at[(topic,
    partition)]`` when that is before the committed offset
    (:class:`FastFetchConsumer`); ``on_behind`` is told how many were. A snapshot taken at
    the restore: a batch processed before the seek advances the watermarks, not this."""
    consumer.resume_at = resume_at
    consumer.on_behind_commit = on_behind


def rewind_inputs(consumer: Any) -> None:
    """Read every assigned input partition from offset 0 at the next seek (the broker
    lost its log: offsets restarted there)."""
    consumer.rewind = {tp for tp in consumer.assignment() if tp.topic in consumer.input_topics}


def log_end(consumer: Any, topic: str, partition: int) -> int | None:
    """The high watermark of ``topic``/``partition`` from the consumer's last fetch (the
    offset the next appended message gets); None when unknown (not assigned, no fetch)."""
    from faust.types import TP

    try:
        value = consumer.highwater(TP(topic, partition))
    except Exception:  # noqa: BLE001 - a revoked or never-fetched partition: unknown
        return None
    return None if value is None else int(value)


def read_offset(consumer: Any, tp: Any) -> int | None:
    """The last offset of ``tp`` handed to the stream (None before the first)."""
    value = consumer._read_offset.get(tp)
    return None if value is None else int(value)


async def wait_for_topic(producer: Any, topic: str) -> None:
    """Make the producer learn a topic created after it started (aiokafka's partitioner
    fails on an unknown topic)."""
    await producer._ensure_producer().client._wait_on_metadata(topic)


async def refresh_metadata(consumer: Any) -> None:
    """Ask a plain aiokafka consumer to fetch cluster metadata now (a topic made after it
    started)."""
    await consumer._client.force_metadata_update()


async def assign_every_partition(consumer: Any, topic: str) -> list[Any]:
    """Assign every partition of ``topic`` to a group-less aiokafka consumer (a broadcast
    every worker reads whole), waiting for the topic to exist; returns them."""
    parts: set[int] | None = None
    while not parts:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            await asyncio.sleep(1.0)
            await refresh_metadata(consumer)  # the topic was made after the start
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    return tps
