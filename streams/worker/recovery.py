"""What a worker does when partitions are (re)assigned: restore the imbalance state, and
recover from a broker that lost its log.

* **Counts** come back from the ``imbalance-counts`` changelog (per source partition,
  with the offset watermarks that make replays count once).
* **Where reading resumes**: where the restored counts end, for any input partition whose
  committed offset is past that (a commit that went ahead of the counts' changelog
  record, then a crash): those messages are counted, not skipped
  (:func:`~tailstream.streams.worker.transport.resume_from_counts`).
* **The minority buffer** comes back from Redis, once per process: on later rebalances the
  in-memory buffer is the newer copy (a batch in flight has added samples to it whose
  Redis writes may land after a reload would have read Redis).
* **A broker reset.** Faust created the changelog topics at start; a broker without them
  lost its log (a memory-storage broker restarted). So did a broker that holds another
  record at the offset of the first record this worker read from an input partition in
  the last assignment (:meth:`Pipeline.anchors`): a table write can have the broker
  auto-create the changelogs before the rebalance, and a consumer that resumed from its
  old positions never steps back, so neither of the other signs shows. Offsets restart
  at 0 there, so the watermarks would take new messages for replays, and positions and
  offsets committed since point past records never read. The worker re-creates the
  changelogs, writes its whole state to them again, forgets the watermarks and reads
  every input partition from its start; event_id de-duplication skips what was processed
  already. A worker whose input offsets go back *within* an assignment (it read from the
  restarted broker before any rebalance) drops the watermarks at once
  (:meth:`Pipeline.process`), and the rebalance that follows does the rest.

With the memory store Faust re-reads, at every rebalance, the changelog of a partition
that stays assigned and writes its records into the table: one of ours not delivered when
it read the log's end leaves the table behind the loop. The restore keeps the loop's
counts when they are newer (:meth:`ImbalanceLoop.restore_partition`) and writes them
again.

Faust resumes the stream *before* the tables' ``on_recover`` callbacks run: a batch in that
gap would be counted into empty partitions that the restore then overwrites. The agent
therefore waits for :meth:`Recovery.wait_restored`, and every revocation closes that gate
again. A rebalance can also start while a batch is half done (it awaits Redis): a restore
then would load the table's state over events the batch applied but has not saved yet, and
the batch would go on to mark their offsets counted — counts lost for good. Batches and
restores therefore take turns on one lock (:attr:`Recovery.turn`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import faust

from tailstream.kafka_io import GONE, admin, values_at
from tailstream.metrics import Metrics
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import RedisBufferStore
from tailstream.streams.worker.pipeline import Pipeline, record_digest
from tailstream.streams.worker.tables import WorkerTables
from tailstream.streams.worker.transport import (
    count_rereads,
    resume_from_counts,
    rewind_inputs,
    set_before_commit,
    set_input_topics,
    wait_for_topic,
)

log = logging.getLogger(__name__)

RESTORE_WAIT_S = 60.0
"""Longest the agent waits for a restore before it processes anyway (and says so)."""


class Recovery:
    unguarded = False
    """Batches ran before the restore now due (the wait for it gave up): the counts this
    worker holds may then lack what the changelog holds, so the restore loads the
    changelog's over all of them, and reading resumes where those end."""

    def __init__(self, app: faust.App, settings: Settings, tables: WorkerTables,
                 pipeline: Pipeline, buffer_store: RedisBufferStore, metrics: Metrics) -> None:
        self.app = app
        self.settings = settings
        self.tables = tables
        self.pipeline = pipeline
        self.buffer_store = buffer_store
        self.metrics = metrics
        self.restored = asyncio.Event()
        self.turn = asyncio.Lock()
        """Held by each batch and by each restore: they never interleave."""
        self.on_restored: list[Callable[[], None]] = []
        """Called after each restore (the assignment report)."""
        self._buffer_restored = False

    def install(self) -> None:
        """Hook into the app: close the gate on revocation, restore on recovery."""

        @self.app.on_partitions_revoked.connect
        def hold_until_restored(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
            # Every rebalance restores the counts again: a batch applied between the new
            # assignment and that restore would be overwritten by it.
            self.restored.clear()

        @self.tables.counts.on_recover
        async def restore_imbalance_state() -> None:
            await self.restore()

    async def wait_restored(self) -> None:
        """Until the state is restored (at most :data:`RESTORE_WAIT_S`)."""
        if self.restored.is_set():
            return
        try:
            await asyncio.wait_for(self.restored.wait(), RESTORE_WAIT_S)
        except TimeoutError:
            log.warning("imbalance state not restored after %.0f s; processing anyway",
                        RESTORE_WAIT_S)
            self.unguarded = True
            self.restored.set()

    async def restore(self) -> None:
        """After (re)assignment: counts from the changelog, the buffer from Redis (once no
        batch is in flight)."""
        async with self.turn:
            await self._restore()
        for callback in self.on_restored:
            callback()

    async def _restore(self) -> None:
        loop = self.pipeline.imbalance
        consumer: Any = self.app.consumer
        set_input_topics(consumer, frozenset(self.settings.consumed_topics))
        set_before_commit(consumer, self.tables.deliveries.settle)
        count_rereads(consumer, self.metrics.input_rereads.inc)
        missing = await asyncio.to_thread(self._missing_changelogs)
        replaced = set() if missing else await asyncio.to_thread(self._replaced_logs)
        reset = bool((missing or replaced) and (loop.partitions or len(self.tables.counts.data)))
        self.pipeline.deduper.trust_seen = reset
        if reset:
            await self._recreate(missing, replaced, consumer)
        kept = self._load_counts()
        if kept and not reset:  # the changelog's last record must be the newest again
            self.tables.save_counts(loop.take_touched())
        if reset:
            loop.forget_offsets()  # after loading: the table holds the old ones
            # Make the state durable again: write it all to the new changelogs.
            self.tables.save_counts(loop.take_touched())
            for key, value in list(self.tables.profiles.data.items()):
                self.tables.deliveries.add(
                    [self.tables.profiles.send_changelog(None, key, value)])
        # (After a reset every input is read from 0 anyway.)
        resume_from_counts(consumer, {} if reset else self._resume_at(),
                           self.metrics.behind_commit.inc)
        if not self._buffer_restored:
            await self._restore_buffer()
        log.info("imbalance state restored: counts %s, buffer %s", loop.totals(),
                 loop.buffer.sizes())
        self.pipeline.new_assignment()
        self.restored.set()

    def _load_counts(self) -> list[int]:
        """The table's counts into the loop, but for partitions this process holds newer
        counts of (:meth:`ImbalanceLoop.restore_partition`); returns those. Counts held
        after the wait for a restore gave up (:attr:`unguarded`) are never newer: the
        table's replace them all."""
        loop = self.pipeline.imbalance
        if self.unguarded:  # counts begun before the restore: not newer, only different
            log.warning("batches ran before this restore: the counts held (%s) give way "
                        "to the changelog's", loop.totals())
            loop.partitions.clear()
            self.unguarded = False
        kept = [p for p, state in self.tables.counts_by_partition()
                if loop.restore_partition(p, state)]
        if kept:
            log.info("the changelog of %d partition(s) %s ends behind the counts this "
                     "worker holds (records not delivered at the rebalance): kept the "
                     "newer counts and write them again", len(kept), sorted(kept))
        return kept

    def _resume_at(self) -> dict[tuple[str, int], int]:
        """Where reading each input partition must resume for the counts to miss nothing:
        where the counts held end, and 0 for a partition the changelog holds no counts of
        (:meth:`ImbalanceLoop.resume_at`)."""
        topics = self.settings.consumed_topics
        none_yet = {(t, p): 0 for p in range(self.tables.partitions) for t in topics}
        return {**none_yet, **self.pipeline.imbalance.resume_at(topics)}

    def _missing_changelogs(self) -> set[str]:
        client = admin(self.settings)
        try:
            return set(self.tables.changelogs()) - set(client.list_topics())
        finally:
            client.close()

    def _replaced_logs(self) -> set[tuple[str, int]]:
        """The input partitions whose first record read in the last assignment is no longer
        at its offset: the broker holds a new log there. The changelogs alone cannot tell:
        a table write after the reset can have the broker create them again (auto-create)
        before this rebalance."""
        anchors = self.pipeline.anchors()
        try:
            now = values_at(self.settings, {k: o for k, (o, _) in anchors.items()})
        except Exception:  # noqa: BLE001 - no answer: the changelog check stands alone
            log.warning("could not read the first records back to check the input logs",
                        exc_info=True)
            return set()
        return {k for k, value in now.items()
                if value is GONE or not isinstance(value, bytes)
                or record_digest(value) != anchors[k][1]}

    async def _recreate(self, missing: set[str], replaced: set[tuple[str, int]],
                        consumer: Any) -> None:
        self.metrics.broker_resets.inc()
        why = (f"lost this worker's changelog topics {sorted(missing)}" if missing else
               f"holds other records than were read at the start of {len(replaced)} input "
               f"partition(s), e.g. {min(replaced)}")
        log.warning("the broker %s (restarted without storage?): re-creating the missing "
                    "changelogs and reading every input partition from its start; event_id "
                    "de-duplication skips what was processed already", why)
        changelogs = self.tables.changelogs()
        for name in missing:
            await changelogs[name].changelog_topic.declare()
            # The producer must know the new topic before a table write partitions a key
            # for it.
            await wait_for_topic(self.app.producer, name)
        rewind_inputs(consumer)

    async def _restore_buffer(self) -> None:
        s = self.settings
        try:
            self.pipeline.imbalance.buffer = await self.buffer_store.load(
                s.buffer_capacity, s.minority_share, s.tail_capacity)
            self._buffer_restored = True
        except Exception:
            log.exception("could not restore the minority buffer from redis; starting empty")
