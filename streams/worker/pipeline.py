"""The per-batch work of the worker, independent of Faust so it can be tested alone
(``tests/unit/test_pipeline.py`` drives it with in-memory fakes).

ingest (decode, validate, dead-letter) → de-duplicate → state (user profiles,
popularity, catalogue, the imbalance loop) → attribute interactions to the lists their
users were served (:mod:`~tailstream.streams.worker.attribution`) → queue the users who
acted for a fresh list (:mod:`~tailstream.streams.worker.refresh`) → once per batch:
weights, triggers and the buffer's persistence. Catalogue records come another way,
:meth:`Pipeline.apply_catalogue` (every worker reads the whole items topic).

Nothing here raises into the stream: a message that cannot be processed is
dead-lettered with its reason, never dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tailstream import configs
from tailstream.contract import (
    EVENT_KINDS,
    INTERACTION_KINDS,
    Event,
    InvalidEvent,
    Limits,
    Rejection,
    decode_payload,
    validate_event,
    validate_item,
)
from tailstream.metrics import Metrics
from tailstream.models.imbalance.buffer import MinorityBuffer, Sample
from tailstream.models.serving.popularity import PopularityTracker
from tailstream.models.serving.signals import Signals
from tailstream.privacy import pseudonymize
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import LiveWeights
from tailstream.streams.worker.attribution import Attribution
from tailstream.streams.worker.dead_letters import DeadLetter, bare, dead_letter
from tailstream.streams.worker.imbalance import ImbalanceLoop
from tailstream.streams.worker.refresh import ListSink, Refresher
from tailstream.streams.worker.state import StreamState

if TYPE_CHECKING:
    from tailstream.streams.worker.scoring import ScoringService

log = logging.getLogger(__name__)

YIELD_EVERY = 2000
"""Events applied between two yields to the event loop."""
TIERS_EVERY_S = 0.5
"""The tier snapshot (a sort of the heavy hitters) is refreshed at most this often."""
RECOMPUTE_SHARE = 0.02
"""The most of the wall clock that each whole-state recomputation (the popularity
rankings, a sort of every item with events; the tier snapshot) may keep: one that took
``c`` seconds is next due ``max(interval, c / share)`` later (:func:`next_due`). At a
fixed interval its cost grew with the catalogue — 40 ms a second of a serve worker's loop
at 50k items, all of it at a million."""


def next_due(now: float, every_s: float, cost_s: float, share: float | None) -> float:
    """When a periodic recomputation that took ``cost_s`` is due again: ``every_s`` after
    ``now``, or later so that it keeps at most ``share`` of the wall clock
    (``now + max(every_s, cost_s / share)``; ``share`` None: no bound).

    >>> next_due(10.0, every_s=1.0, cost_s=0.005, share=0.02)   # 5 ms: every second
    11.0
    >>> next_due(10.0, every_s=1.0, cost_s=0.08, share=0.02)    # 80 ms: every 4 s
    14.0
    """
    if share is None:
        return now + every_s
    return now + max(every_s, cost_s / share)


GAUGES_EVERY_S = 1.0
"""The imbalance loop's gauges are copied at most this often (and by a timer): the river
path's report (its ROC AUC over thresholds) cost ~2 % of a serve worker when copied at
each of its small batches, and Prometheus scrapes every few seconds."""
AUDIT_CHUNK = 5000
"""Event ids per audit record (about 200 KB: far under any producer's request limit)."""
def record_digest(value: bytes | None) -> int:
    """What identifies a record's value at an offset: its CRC-32.

    >>> record_digest(b"") == record_digest(None)
    True
    """
    return zlib.crc32(value or b"")


DIGESTS_KEPT = 4096
"""Offsets per input partition whose record digests are kept to tell a seek from a new
log (a seek back further than this falls back to the log's end)."""


@dataclass(slots=True)
class RawMessage:
    """What the pipeline needs of a Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: float | None  # seconds; the producer's create time


T = TypeVar("T")


SendToDlq = Callable[[DeadLetter], Awaitable[None]]
SendRequest = Callable[[dict[str, Any]], Awaitable[None]]
SaveCounts = Callable[[dict[int, dict[str, Any]]], None]
SendAudit = Callable[[list[str], list[str]], Awaitable[None]]
"""(event_ids applied now, event_ids of replayed messages the state already held)."""


class SeenIds(Protocol):
    """De-duplication by event_id (:class:`~tailstream.streams.stores.deduper.Deduper`)."""

    trust_seen: bool

    async def first_seen(self, event_ids: list[str],
                         sources: list[str] | None = None) -> list[bool]: ...


class BufferSink(Protocol):
    """The minority buffer's and the live weights' home
    (:class:`~tailstream.streams.stores.buffer_store.RedisBufferStore`)."""

    async def apply(self, changes: list[tuple[str, int | None, Sample]],
                    buffer: MinorityBuffer) -> None: ...

    async def mark_consumed(self) -> None: ...

    async def write_weights(self, live: LiveWeights) -> None: ...


def _pseudonymized(validate: Callable[[str, Any], Event], key: str, kind: str,
                   value: Any) -> Event:
    event = validate(kind, value)
    return dataclasses.replace(event, user_id=pseudonymize(event.user_id, key))


def _event_ids(value: bytes | None, limits: Limits) -> list[str]:
    """The event_ids a (replayed) message carries, for the audit; unreadable ones: none."""
    decoded = decode_payload(value, limits)
    if isinstance(decoded, Rejection):
        return []
    return [v["event_id"] for v in decoded
            if isinstance(v, dict) and isinstance(v.get("event_id"), str)]


ClaimLetter = Callable[[RawMessage, int | None], Awaitable[bool]]
"""(record, element index or None) → whether this worker is the first to dead-letter it."""


async def _first_claim(msg: RawMessage, index: int | None) -> bool:
    """A worker alone (unit tests): every claim is the first."""
    return True


def _sources(events: list[tuple[Event, RawMessage]]) -> list[str]:
    """``topic/partition/offset`` of each event's message (once per message: an envelope's
    events share it)."""
    out: list[str] = []
    last: RawMessage | None = None
    source = ""
    for _, msg in events:
        if msg is not last:
            last, source = msg, f"{msg.topic}/{msg.partition}/{msg.offset}"
        out.append(source)
    return out


class Pipeline:
    def __init__(self, settings: Settings, *, profiles: MutableMapping[str, Any],
                 deduper: SeenIds, publisher: ListSink, send_to_dlq: SendToDlq,
                 metrics: Metrics, popularity: PopularityTracker | None = None,
                 imbalance: ImbalanceLoop | None = None,
                 buffer_store: BufferSink | None = None,
                 send_training_request: SendRequest | None = None,
                 save_counts: SaveCounts | None = None,
                 scoring: ScoringService | None = None,
                 send_audit: SendAudit | None = None,
                 attribution: Attribution | None = None,
                 refresh_every_s: float = 1.0,
                 gauges_every_s: float = GAUGES_EVERY_S,
                 recompute_share: float | None = RECOMPUTE_SHARE) -> None:
        self.settings = settings
        self.limits = configs.limits(settings)
        self.kind_of_topic = {settings.topic_for(k): k for k in EVENT_KINDS}
        # Profiles are written back once per user per batch: a table write is a changelog
        # message, and a user often has several events in one batch.
        self.profiles = WriteBehind(profiles)
        self.state = StreamState(
            settings, self.profiles, popularity=popularity, imbalance=imbalance,
            on_new_item=scoring.queue_item if scoring is not None else None,
            on_removed_item=scoring.remove_item if scoring is not None else None)
        if scoring is not None and settings.rank_mode == "hybrid":
            self.state.signals = Signals(configs.signals_config(settings),
                                         self.state.popularity)
        self.deduper = deduper
        self.publisher = publisher
        self.send_to_dlq = send_to_dlq
        self.metrics = metrics
        self.popularity = self.state.popularity
        self.imbalance = self.state.imbalance
        self.buffer_store = buffer_store
        self.send_training_request = send_training_request
        self.save_counts = save_counts
        self.item_text = self.state.item_text
        self.scoring = scoring
        self.send_audit = send_audit
        self.refresh = Refresher(settings, self.state, self.profiles, publisher, metrics,
                                 scoring)
        self.attribution = attribution or Attribution(configs.attribution_config(settings),
                                                      metrics)
        """Each user's last served list, and what their interactions did with it."""
        self._pseudonym_key = settings.pseudonymize_key.reveal()
        self._weights_written = 0.0
        self._weights_dirty = False
        self._tiers_due = 0.0
        self.refresh_every_s = refresh_every_s
        self.recompute_share = recompute_share
        self.gauges_every_s = gauges_every_s
        self._gauges_at = float("-inf")
        self._gauges_dirty = False
        self._read: dict[tuple[str, int], int] = {}
        """The highest offset read per input (topic, partition) in this assignment."""
        self.log_end: Callable[[str, int], int | None] | None = None
        """Where a partition's log ends now (the consumer's high watermark; None when
        unknown): tells a broker that lost its log from a consumer that seeks back."""
        self.claim_letter: ClaimLetter = _first_claim
        """Whether this worker dead-letters a malformed catalogue record (element
        ``index`` of an envelope): the first of the workers that read it to ask."""
        self._digests: dict[tuple[str, int], dict[int, int]] = {}
        """CRC-32 of the values of the last :data:`DIGESTS_KEPT` offsets read per input
        partition: a record read again at the same offset is a replay, another one is a
        new log."""
        self._anchors: dict[tuple[str, int], tuple[int, int]] = {}
        """The first record (offset, digest) read per input partition in this assignment:
        recovery asks the broker whether it still holds it (:meth:`anchors`)."""
        self._refresh_due = 0.0
        # Label lookups cost more than the increments: resolve each child once.
        kinds = [*self.kind_of_topic.values(), "unknown"]
        self._events_in = {k: metrics.events_in.labels(k) for k in kinds}
        self._messages_in = {k: metrics.messages_in.labels(k) for k in kinds}
        self._processed = {k: metrics.events_processed.labels(k) for k in kinds}

    # ------------------------------------------------------------------ ingest
    async def process(self, batch: list[RawMessage]) -> None:
        """Process one batch. Every message ends processed, skipped as duplicate, or in the DLQ.

        Effectively-once counts under at-least-once delivery: a message at or below its
        partition's offset watermark is a replay whose effects the recovered state holds
        already; an event_id seen before from *another* message is a duplicate. One
        message's failure never touches its neighbours: it is dead-lettered on its own.
        """
        started = time.perf_counter()
        self.metrics.batch_size.observe(len(batch))
        if self._offsets_went_back(batch):
            self._lost_log()
        events, replayed = await self._ingest(batch)
        self.refresh.catchup.reading = True  # scoring turns may run while it applies
        try:
            applied = await self._apply(events) if events else []
        finally:
            self.refresh.catchup.reading = False
        for msg in batch:
            self.imbalance.mark_counted(msg.partition, msg.topic, msg.offset)
        if events or self.imbalance.touched:
            await self._close_imbalance_batch()
        elif self.publisher.pending:
            await self.publisher.publish([])
        if self.send_audit is not None and (applied or replayed):
            await self._audit(applied, replayed)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def new_assignment(self) -> None:
        """The state was restored for a (re)assignment: reading positions may move."""
        self._read.clear()
        self._digests.clear()
        self._anchors.clear()

    def anchors(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(offset, digest) of the first record read from each input partition since the
        last assignment. A consumer that resumes from its old position on a broker that
        lost its log reads only offsets above every old one and never steps back; the
        record at the anchor's offset is then another record (or gone), and that is how
        recovery tells (:mod:`~tailstream.streams.worker.recovery`)."""
        return dict(self._anchors)

    def _offsets_went_back(self, batch: list[RawMessage]) -> bool:
        """Whether a message sits at or below an offset this process already read from its
        partition within the same assignment. A consumer never goes back by itself; the
        broker does when it restarts without its log (offsets start again at 0), and the
        new messages would pass for replays until the rebalance that recovery sees comes
        round (seconds later, or never when the group rejoins before the broker notices)."""
        went_back = False
        for msg in batch:
            key = (msg.topic, msg.partition)
            last = self._read.get(key)
            digest = record_digest(msg.value)
            back = last is not None and msg.offset <= last
            if back and last is not None and self._log_replaced(key, msg.offset, digest,
                                                                last):
                went_back = True
                self._digests[key] = {}
                self._anchors[key] = (msg.offset, digest)
            if key not in self._anchors:  # no tuple per message on the hot path
                self._anchors[key] = (msg.offset, digest)
            self._read[key] = msg.offset if last is None or back else max(last, msg.offset)
            self._remember(key, msg.offset, digest)
        return went_back

    def _log_replaced(self, key: tuple[str, int], offset: int, digest: int,
                      last: int) -> bool:
        """Whether a step back to ``offset`` (at or below ``last``, read before) is a new
        log rather than a seek. A consumer steps back by itself when it seeks: after a
        restart Faust seeks to the committed offsets while a batch fetched before the seek
        was already handed over, and the same records come again — replays, which the
        watermarks must keep recognising (treating them as a new log let event_ids that a
        killed process had marked seen, but never saved the effects of, pass as
        duplicates: events lost). The same record at the same offset is a seek; another
        record is a new log; an offset too old to remember is a new log when the log now
        ends at or below ``last`` (or nobody can say where it ends: the in-memory fakes)."""
        seen = self._digests.get(key, {}).get(offset)
        if seen is not None:
            return seen != digest
        end = self.log_end(*key) if self.log_end is not None else None
        return end is None or end <= last

    def _remember(self, key: tuple[str, int], offset: int, digest: int) -> None:
        kept = self._digests.setdefault(key, {})
        kept[offset] = digest
        if len(kept) > 2 * DIGESTS_KEPT:
            newest = max(kept)
            self._digests[key] = {o: d for o, d in kept.items() if o > newest - DIGESTS_KEPT}

    def _lost_log(self) -> None:
        """Offsets went back: no watermark marks a replay any more. The event_id
        de-duplication (trusting every id seen) keeps the counts right instead, as after a
        broker reset found at a rebalance (:mod:`~tailstream.streams.worker.recovery`)."""
        log.warning("input offsets went back within an assignment (the broker lost its "
                    "log?): offset watermarks dropped; event_id de-duplication decides "
                    "what was processed already")
        self.metrics.broker_resets.inc()
        self.imbalance.forget_offsets()
        self.deduper.trust_seen = True

    async def _ingest(self, batch: list[RawMessage]
                      ) -> tuple[list[tuple[Event, RawMessage]], list[str]]:
        """Decode and validate each message; returns the valid events and the event_ids
        of replays the state already holds."""
        events: list[tuple[Event, RawMessage]] = []
        replayed: list[str] = []
        # After a broker reset (until the next restore) no offset marks a replay: the
        # inputs are re-read from 0 on a new log, and a batch fetched from the old
        # positions before the rewind, handed over after it, would have set watermarks
        # above records not read yet. event_id de-duplication decides instead.
        counted = (self.imbalance.counted if not self.deduper.trust_seen
                   else lambda partition, topic, offset: False)
        validate = functools.partial(validate_event, limits=self.limits)
        if self._pseudonym_key:
            validate = functools.partial(_pseudonymized, validate, self._pseudonym_key)
        messages: Counter[str] = Counter()
        read: Counter[str] = Counter()
        validators = {k: functools.partial(validate, k) for k in self._events_in}
        for msg in batch:
            try:
                if counted(msg.partition, msg.topic, msg.offset):
                    self.metrics.replays_skipped.inc()
                    if self.send_audit is not None:
                        replayed.extend(_event_ids(msg.value, self.limits))
                    continue
                kind = self.kind_of_topic.get(msg.topic, "unknown")
                messages[kind] += 1
                events.extend((event, msg) for event in await self._valid(
                    msg, validators[kind], counted=read, kind=kind))
            except Exception as exc:  # a bug on one message: that message alone is refused
                log.exception("reading %s/%d/%d failed", msg.topic, msg.partition, msg.offset)
                await self.dead_letter(msg, Rejection("processing_error", repr(exc)[:200]))
        for kind, n in messages.items():  # one increment per kind and batch, not per event
            self._messages_in[kind].inc(n)
        for kind, n in read.items():
            self._events_in[kind].inc(n)
        return events, replayed

    async def _apply(self, events: list[tuple[Event, RawMessage]]) -> list[str]:
        """De-duplicate (one Redis command), apply to the state a chunk at a time
        (:meth:`StreamState.apply_batch`), queue the users who acted, write their profiles
        (one changelog send); returns the event_ids applied."""
        fresh = await self.deduper.first_seen([e.event_id for e, _ in events],
                                               _sources(events))
        new = [pair for pair, is_new in zip(events, fresh, strict=True) if is_new]
        if len(new) < len(events):
            self.metrics.duplicates.inc(len(events) - len(new))
        applied: list[str] = []
        acted: dict[str, tuple[str, float | None]] = {}
        processed: Counter[str] = Counter()
        # Users whose last list this worker does not hold (a partition that moved here):
        # their impressions from Redis, in one round trip for the batch.
        await self.attribution.prefetch(e.user_id for e, _ in new
                                        if e.kind in INTERACTION_KINDS)
        for start in range(0, len(new), YIELD_EVERY):
            if start:
                # A batch of envelopes can hold tens of thousands of events: let the web
                # server and timers run now and then.
                await asyncio.sleep(0)
            chunk = new[start:start + YIELD_EVERY]
            failures = dict(self.state.apply_batch([(e, m.partition) for e, m in chunk]))
            if failures:  # never let one bad event take the stream down: it goes alone
                for n, exc in sorted(failures.items()):
                    event, msg = chunk[n]
                    log.error("processing event %s failed: %r", event.event_id, exc)
                    await self.dead_letter(msg, Rejection("processing_error", repr(exc)[:200]))
                chunk = [pair for n, pair in enumerate(chunk) if n not in failures]
            processed.update(e.kind for e, _ in chunk)
            applied.extend(e.event_id for e, _ in chunk)
            for event, msg in chunk:
                acted[event.user_id] = (event.event_id, msg.timestamp)
            self.refresh.learn_from(chunk)
            self.attribution.observe(chunk)
        for kind, n in processed.items():
            self._processed[kind].inc(n)
        self.refresh.mark_active_many(acted)
        self._maybe_refresh()
        await self.refresh.enqueue(acted)
        try:
            await self.profiles.save()
        except Exception as exc:  # kept dirty: the next batch's save writes them again
            log.warning("writing %d profiles to the changelog failed (%r); retried with the "
                        "next batch", len(self.profiles.dirty), exc)
        return applied

    async def _audit(self, applied: list[str], replayed: list[str],
                     attempts: int = 3) -> None:
        """Report the batch's event_ids in records of at most :data:`AUDIT_CHUNK` ids each (a
        batch of envelopes holds up to hundreds of thousands); a record that cannot be sent
        is retried, then logged and counted — never raised into the batch, whose effects
        are applied already."""
        for start in range(0, max(len(applied), len(replayed)), AUDIT_CHUNK):
            part = (applied[start:start + AUDIT_CHUNK], replayed[start:start + AUDIT_CHUNK])
            for attempt in range(attempts):
                try:
                    assert self.send_audit is not None
                    await self.send_audit(*part)
                    break
                except Exception as exc:
                    if attempt == attempts - 1:
                        self.metrics.audit_failures.inc()
                        log.error("could not publish %d audit ids: %r", sum(map(len, part)),
                                  exc)
                    else:
                        await asyncio.sleep(0.1 * (attempt + 1))

    async def _close_imbalance_batch(self) -> None:
        """Weights, triggers, persistence and metrics of the imbalance loop, once per batch."""
        loop = self.imbalance
        now = time.monotonic()
        refresh_tiers = now >= self._tiers_due
        request = loop.end_batch(refresh_tiers=refresh_tiers)
        if refresh_tiers:
            self._tiers_due = next_due(now, TIERS_EVERY_S, time.monotonic() - now,
                                       self.recompute_share)
        if self.save_counts is not None:
            self.save_counts(loop.take_touched())
        changes = loop.take_buffer_changes()
        if self.buffer_store is not None:
            try:
                await self.buffer_store.apply(changes, loop.buffer)
                if request is not None:
                    await self.buffer_store.mark_consumed()
            except Exception:  # the buffer is a cache of the stream: log, keep going
                log.exception("writing the minority buffer to redis failed")
        self._weights_dirty = True
        if time.monotonic() - self._weights_written >= 1.0:
            await self.publish_weights()
        if request is not None:
            self.metrics.triggers.labels(request["reason"]).inc()
            if self.send_training_request is not None:
                try:
                    await self.send_training_request(request)
                except Exception:  # the trigger fires again; the batch's effects stand
                    log.exception("publishing a training request failed")
        if self.scoring is not None:
            self.scoring.set_live_prior(loop.live_prior(), loop.online)
        self._gauges_dirty = True
        if time.monotonic() - self._gauges_at >= self.gauges_every_s:
            self.report_gauges()

    def report_gauges(self) -> None:
        """Copy the imbalance loop's state into its gauges, if a batch changed it since the
        last copy: after a batch at most every :data:`GAUGES_EVERY_S`, and by a timer, so
        the gauges are never more than a second behind the last batch."""
        if not self._gauges_dirty:
            return
        self._gauges_at = time.monotonic()
        self._gauges_dirty = False
        self.metrics.observe_imbalance(self.imbalance)

    async def publish_weights(self) -> None:
        """Write the weights in force to Redis for the trainer, if they changed since the
        last write. Called at most once a second per batch, and by a timer, so the stored
        weights are never more than a second behind the last batch."""
        if not self._weights_dirty or self.buffer_store is None:
            return
        loop = self.imbalance
        self._weights_written = time.monotonic()
        self._weights_dirty = False
        try:
            await self.buffer_store.write_weights(LiveWeights(
                loop.policy, dict(loop.weights), loop.decayed_counts(), time.time()))
        except Exception:
            self._weights_dirty = True
            log.exception("writing the loss weights to redis failed")

    async def _valid(self, msg: RawMessage, validate: Callable[[Any], T],
                     counted: Counter[str] | None = None, kind: str = "",
                     claimed: bool = False) -> list[T]:
        """The valid values of a message (one, or several in an envelope); the rest are
        dead-lettered, one DLQ record per rejected value (with ``claimed``, only those
        this worker is the first to claim: :meth:`apply_catalogue`). ``counted[kind]``
        is increased by the number of events the message carried (1 if it is
        unreadable)."""
        decoded = decode_payload(msg.value, self.limits)
        if counted is not None:
            counted[kind] += 1 if isinstance(decoded, Rejection) else len(decoded)
        if isinstance(decoded, Rejection):
            if not claimed or await self.claim_letter(msg, None):
                await self.dead_letter(msg, decoded)
            return []
        envelope = len(decoded) > 1 or (msg.value or b"").lstrip()[:1] == b"["
        out: list[T] = []
        for index, value in enumerate(decoded):
            try:
                out.append(validate(value))
            except InvalidEvent as exc:
                why = Rejection(exc.reason, exc.detail)
                if claimed and not await self.claim_letter(msg, index if envelope else None):
                    continue
                if envelope:  # the element alone: its neighbours are applied
                    await self.dead_letter(msg, why, element=value, index=index,
                                           events=len(decoded))
                else:
                    await self.dead_letter(msg, why)
        return out

    async def apply_catalogue(self, batch: Sequence[RawMessage]) -> None:
        """Catalogue records (and tombstones) from the items topic, which every worker
        reads whole (:mod:`~tailstream.streams.worker.catalogue`): items are not keyed
        like users, and a list may hold any of them. Since every worker — and a
        restarted one, from the topic's start — reads each record, a malformed one is
        dead-lettered by whoever claims it first (``claim_letter``), once."""
        for msg in batch:
            try:
                await self._apply_item(msg)
            except Exception as exc:  # one record's bug: the others are applied
                log.exception("reading %s/%d/%d failed", msg.topic, msg.partition, msg.offset)
                if await self.claim_letter(msg, None):
                    await self.dead_letter(msg, Rejection("processing_error", repr(exc)[:200]))

    async def _apply_item(self, msg: RawMessage) -> None:
        if msg.value is None and msg.key:  # a tombstone on the compacted items topic
            item_id = msg.key.decode("utf-8", "replace")
            self.state.remove_item(item_id)
            self.metrics.items_deleted.inc()
            return
        for item in await self._valid(msg, lambda v: validate_item(v, self.limits),
                                      claimed=True):
            self.state.apply_item(item)
            self.metrics.items_in.inc()

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now >= self._refresh_due:
            self.popularity.refresh(time.time())
            self.metrics.catalogue_size.set(self.popularity.known_items)
            self._refresh_due = next_due(now, self.refresh_every_s, time.monotonic() - now,
                                         self.recompute_share)

    async def dead_letter(self, msg: RawMessage, why: Rejection, *, element: Any = None,
                          index: int | None = None, events: int | None = None) -> None:
        """Send ``msg`` (or element ``index`` of its envelope) to the dead-letter topic with
        ``why``, and count it. Never raises: a record that cannot be written is written
        bare (headers, the value's size and sha256), and if even that fails the loss is
        logged and counted (``tailstream_dlq_failures_total``)."""
        self.metrics.dlq.labels(why.reason).inc()
        letter = dead_letter(msg, why, max_value_bytes=self.settings.dlq_max_value_bytes,
                             element=element, index=index, events=events)
        for attempt in (letter, bare(letter)):
            try:
                await self.send_to_dlq(attempt)
                return
            except Exception as exc:  # the record's bytes, or the broker: try the bare one
                error = exc
        self.metrics.dlq_failures.inc()
        log.error("could not dead-letter %s/%d/%d (%s): %r", msg.topic, msg.partition,
                  msg.offset, why.reason, error)


class WriteBehind(MutableMapping[str, Any]):
    """A mapping over another whose writes wait in memory until :meth:`flush`.

    >>> table = {"a": 1}
    >>> wb = WriteBehind(table)
    >>> wb["a"] = 2; wb["a"] = 3; wb["b"] = 4
    >>> table, wb["a"], len(wb.dirty)
    ({'a': 1}, 3, 2)
    >>> wb.flush(); table
    {'a': 3, 'b': 4}
    """

    def __init__(self, backing: MutableMapping[str, Any]) -> None:
        self.backing = backing
        self.dirty: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.dirty:
            return self.dirty[key]
        return self.backing.get(key, default)

    def __getitem__(self, key: str) -> Any:
        if key in self.dirty:
            return self.dirty[key]
        return self.backing[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.dirty[key] = value

    def __delitem__(self, key: str) -> None:
        self.dirty.pop(key, None)
        self.backing.pop(key, None)

    def __iter__(self) -> Iterator[str]:
        yield from self.dirty
        yield from (k for k in self.backing if k not in self.dirty)

    def __len__(self) -> int:
        return len(self.backing) + sum(1 for k in self.dirty if k not in self.backing)

    def flush(self) -> None:
        for key, value in self.dirty.items():
            self.backing[key] = value
        self.dirty.clear()

    async def save(self) -> None:
        """:meth:`flush`, in one batched write when the backing store has ``save_many``
        (the worker's profiles table: one changelog send for the batch)."""
        if not self.dirty:
            return
        save_many = getattr(self.backing, "save_many", None)
        if save_many is None:
            self.flush()
            return
        dirty, self.dirty = self.dirty, {}
        try:
            await save_many(dirty)
        except BaseException:
            # Not written: keep them for the next batch's save (newer values win).
            self.dirty = {**dirty, **self.dirty}
            raise
