"""The per-batch work of the worker, independent of Faust so it can be tested alone.

ingest (decode, validate, dead-letter) → de-duplicate → state (user profiles,
popularity, catalogue) → score the users who acted → publish.

Nothing here raises into the stream: a message that cannot be processed is
dead-lettered with its reason, never dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tailstream.contract import (
    Event,
    InvalidEvent,
    Limits,
    Rejection,
    decode_payload,
    validate_event,
    validate_item,
)
from tailstream.metrics import Metrics
from tailstream.models.serving.baseline import new_profile, recommend
from tailstream.models.serving.popularity import PopularityTracker
from tailstream.models.serving.scorer import ContextEntry, UserRequest
from tailstream.privacy import pseudonymize
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import RedisBufferStore
from tailstream.streams.stores.deduper import Deduper
from tailstream.streams.stores.publisher import Publisher, RecList
from tailstream.streams.worker.imbalance import ImbalanceLoop
from tailstream.streams.worker.scoring import ScoringService
from tailstream.streams.worker.state import StreamState

log = logging.getLogger(__name__)

BASELINE_VERSION = "baseline-1"
YIELD_EVERY = 2000
"""Events applied between two yields to the event loop."""


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


SendToDlq = Callable[[RawMessage, Rejection], Awaitable[None]]
SendRequest = Callable[[dict[str, Any]], Awaitable[None]]
SaveCounts = Callable[[dict[int, dict[str, Any]]], None]
SendAudit = Callable[[list[str], list[str]], Awaitable[None]]
"""(event_ids applied now, event_ids of replayed messages the state already held)."""


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


class Pipeline:
    def __init__(self, settings: Settings, *, profiles: MutableMapping[str, Any],
                 deduper: Deduper, publisher: Publisher, send_to_dlq: SendToDlq,
                 metrics: Metrics, popularity: PopularityTracker | None = None,
                 imbalance: ImbalanceLoop | None = None,
                 buffer_store: RedisBufferStore | None = None,
                 send_training_request: SendRequest | None = None,
                 save_counts: SaveCounts | None = None,
                 scoring: ScoringService | None = None,
                 send_audit: SendAudit | None = None,
                 refresh_every_s: float = 1.0) -> None:
        self.settings = settings
        self.limits = Limits(max_event_bytes=settings.max_event_bytes,
                             max_envelope_bytes=settings.max_envelope_bytes,
                             max_envelope_events=settings.max_envelope_events,
                             max_string_chars=settings.max_string_chars,
                             max_future_skew_s=float(settings.max_future_skew_s))
        self.kind_of_topic = {settings.topic_for(k): k
                              for k in ("click", "cart", "fav", "purchase", "search")}
        self.items_topic = settings.topic_for("item")
        # Profiles are written back once per user per batch: a table write is a changelog
        # message, and a user often has several events in one batch.
        self.profiles = WriteBehind(profiles)
        self.state = StreamState(settings, self.profiles, popularity=popularity,
                                 imbalance=imbalance,
                                 on_new_item=scoring.queue_item if scoring is not None else None)
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
        self._pseudonym_key = settings.pseudonymize_key.reveal()
        self._weights_written = 0.0
        self._weights_dirty = False
        self.refresh_every_s = refresh_every_s
        self._last_refresh = 0.0
        # Users waiting for a list: the event that asked for it, oldest user first.
        self._waiting: OrderedDict[str, tuple[str, float | None]] = OrderedDict()
        self._wake = asyncio.Event()
        self._scorer_task: asyncio.Task[None] | None = None
        # Users who acted recently (newest last), for refreshes after a promotion.
        self.active: OrderedDict[str, float] = OrderedDict()
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
        already; an event_id seen before from *another* message is a duplicate.
        """
        started = time.perf_counter()
        self.metrics.batch_size.observe(len(batch))
        events: list[tuple[Event, RawMessage]] = []
        replayed: list[str] = []
        counted = self.imbalance.counted
        validate = functools.partial(validate_event, limits=self.limits)
        if self._pseudonym_key:
            validate = functools.partial(_pseudonymized, validate, self._pseudonym_key)
        for msg in batch:
            if msg.topic == self.items_topic:
                await self._apply_item(msg)
                continue
            if counted(msg.partition, msg.topic, msg.offset):
                self.metrics.replays_skipped.inc()
                if self.send_audit is not None:
                    replayed.extend(_event_ids(msg.value, self.limits))
                continue
            kind = self.kind_of_topic.get(msg.topic, "unknown")
            self._messages_in[kind].inc()
            events.extend((event, msg) for event in await self._valid(
                msg, functools.partial(validate, kind), counted=self._events_in[kind]))
        applied: list[str] = []
        if events:
            fresh = await self.deduper.first_seen(
                [e.event_id for e, _ in events],
                [f"{m.topic}/{m.partition}/{m.offset}" for _, m in events])
            acted: dict[str, tuple[Event, RawMessage]] = {}
            for n, ((event, msg), is_new) in enumerate(zip(events, fresh, strict=True)):
                if n % YIELD_EVERY == YIELD_EVERY - 1:
                    # A batch of envelopes can hold tens of thousands of events: let the
                    # web server and timers run now and then.
                    await asyncio.sleep(0)
                if not is_new:
                    self.metrics.duplicates.inc()
                    continue
                try:
                    self.state.apply_event(event, msg.partition)
                except Exception as exc:  # never let one bad event take the stream down
                    log.exception("processing event %s failed", event.event_id)
                    await self._dead_letter(msg, Rejection("processing_error", repr(exc)[:200]))
                    continue
                self._processed[event.kind].inc()
                applied.append(event.event_id)
                acted[event.user_id] = (event, msg)
                self._mark_active(event.user_id)
            self._maybe_refresh()
            await self._refresh_users(acted)
            self.profiles.flush()
        for msg in batch:
            if msg.topic != self.items_topic:
                self.imbalance.mark_counted(msg.partition, msg.topic, msg.offset)
        if events or self.imbalance.touched:
            await self._close_imbalance_batch()
        elif self.publisher.pending:
            await self.publisher.publish([])
        if self.send_audit is not None and (applied or replayed):
            await self.send_audit(applied, replayed)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    async def _close_imbalance_batch(self) -> None:
        """Weights, triggers, persistence and metrics of the imbalance loop, once per batch."""
        loop = self.imbalance
        request = loop.end_batch()
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
                await self.send_training_request(request)
        self.metrics.observe_imbalance(loop)

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
            await self.buffer_store.write_weights(
                loop.policy.describe(), loop.weights, loop.decayed_counts(), time.time())
        except Exception:
            self._weights_dirty = True
            log.exception("writing the loss weights to redis failed")

    async def _valid(self, msg: RawMessage, validate: Callable[[Any], T],
                     counted: Any = None) -> list[T]:
        """The valid values of a message (one, or several in an envelope); the rest are
        dead-lettered, one DLQ record per rejected value. ``counted`` (a counter) is
        increased by the number of events the message carried (1 if it is unreadable)."""
        decoded = decode_payload(msg.value, self.limits)
        if counted is not None:
            counted.inc(1 if isinstance(decoded, Rejection) else len(decoded))
        if isinstance(decoded, Rejection):
            await self._dead_letter(msg, decoded)
            return []
        out: list[T] = []
        for value in decoded:
            try:
                out.append(validate(value))
            except InvalidEvent as exc:
                await self._dead_letter(msg, Rejection(exc.reason, exc.detail))
        return out

    async def _apply_item(self, msg: RawMessage) -> None:
        for item in await self._valid(msg, lambda v: validate_item(v, self.limits)):
            self.state.apply_item(item)
            self.metrics.items_in.inc()

    def context(self, profile: dict[str, Any]) -> list[ContextEntry]:
        return self.state.context(profile)

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._last_refresh >= self.refresh_every_s:
            self.popularity.refresh(time.time())
            self._last_refresh = now
            self.metrics.catalogue_size.set(self.popularity.known_items)

    # ------------------------------------------------------------------ score
    def _mark_active(self, user_id: str) -> None:
        self.active.pop(user_id, None)
        self.active[user_id] = time.time()
        while len(self.active) > self.settings.active_users_max:
            self.active.popitem(last=False)

    async def _score(self, users: Sequence[str]) -> tuple[str, list[list[dict[str, Any]]]]:
        """Lists for users from their profiles: the transformer when it is ready, else the
        baseline. Returns the version that made them."""
        profiles = [self.profiles.get(u) or new_profile() for u in users]
        if self.scoring is not None and self.scoring.ready:
            version = self.scoring.version
            requests = [UserRequest(u, self.context(p), set(p.get("items", [])[:5]))
                        for u, p in zip(users, profiles, strict=True)]
            ranked = await self.scoring.recommend(requests, self.item_info)
            return version, [[r.to_dict(i + 1) for i, r in enumerate(lst)] for lst in ranked]
        return BASELINE_VERSION, [[r.to_dict(i + 1) for i, r in enumerate(
            recommend(p, self.popularity, k=self.settings.recs_k,
                      tail_share=self.settings.tail_share))] for p in profiles]

    async def _refresh_users(self, acted: dict[str, tuple[Event, RawMessage]]) -> None:
        """Queue the users who acted for a fresh list. Scoring runs beside ingest (the
        transformer on its own thread), and users waiting for a list are *conflated*: a
        newer event replaces the older one's place, and the list is made from the profile
        as it is when the user's turn comes. Under load each user gets one list from their
        latest context and ingest never waits for scoring — unless the waiting set
        outgrows its bound (back-pressure, bounded memory)."""
        if not acted:
            if not self._waiting:
                await self.publisher.publish([])  # retries lists a failed write kept
            return
        for u, (event, msg) in acted.items():
            self._waiting.pop(u, None)
            self._waiting[u] = (event.event_id, msg.timestamp)
        self.metrics.scoring_waiting.set(len(self._waiting))
        self._ensure_scorer_task()
        self._wake.set()
        while len(self._waiting) > self.settings.scoring_max_waiting:
            await asyncio.sleep(0.01)

    def _ensure_scorer_task(self) -> None:
        if self._scorer_task is None or self._scorer_task.done():
            self._scorer_task = asyncio.get_running_loop().create_task(self._score_waiting())

    async def _score_waiting(self) -> None:
        """Score waiting users, oldest first, ``scoring_batch`` at a time, forever."""
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            take = min(len(self._waiting), self.settings.scoring_batch)
            batch = [self._waiting.popitem(last=False) for _ in range(take)]
            self.metrics.scoring_waiting.set(len(self._waiting))
            try:
                version, ranked = await self._score([u for u, _ in batch])
                now = time.time()
                await self.publisher.publish([
                    RecList(user_id=u, items=items, model_version=version, trigger="event",
                            generated_at=now, event_id=event_id, source_ts=ts)
                    for (u, (event_id, ts)), items in zip(batch, ranked, strict=True)])
            except Exception:  # lists are derived data: log, count, keep serving
                self.metrics.publish_errors.labels("scoring").inc()
                log.exception("scoring a batch of %d users failed", len(batch))
            # The baseline scores on this loop: let the next ingest batch in between.
            await asyncio.sleep(0)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every waiting user has been scored and published (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def refresh_active(self, trigger: str = "promotion") -> int:
        """Republish the lists of users active within ``active_window_s``, newest first."""
        cutoff = time.time() - self.settings.active_window_s
        return await self.refresh_users(
            [u for u, t in reversed(self.active.items()) if t >= cutoff], trigger)

    async def refresh_aged(self, limit: int = 10_000) -> int:
        """Republish lists older than ``list_max_age_s`` of users active within the list
        TTL, oldest first (``trigger: "ttl"``): a returning user finds a fresh list."""
        now = time.time()
        too_old = now - self.settings.list_max_age_s
        active_since = now - self.settings.recs_ttl_s
        users: list[str] = []
        for user, published in self.publisher.last_published.items():  # oldest first
            if published > too_old or len(users) >= limit:
                break
            if self.active.get(user, 0.0) >= active_since:
                users.append(user)
        return await self.refresh_users(users, "ttl")

    async def refresh_users(self, users: Sequence[str], trigger: str, *,
                            chunk: int = 100) -> int:
        """Republish the lists of ``users`` at most ``refresh_rate`` users/s (a bulk refresh
        must not flood Redis or starve ingest). Returns how many were refreshed."""
        self.metrics.refresh_pending.labels(trigger).set(len(users))
        done = 0
        for start in range(0, len(users), chunk):
            began = time.monotonic()
            part = users[start:start + chunk]
            version, items = await self._score(part)
            now = time.time()
            await self.publisher.publish([
                RecList(user_id=u, items=its, model_version=version, trigger=trigger,
                        generated_at=now, event_id=None, source_ts=None)
                for u, its in zip(part, items, strict=True)])
            done += len(part)
            self.metrics.refresh_pending.labels(trigger).set(len(users) - done)
            self.metrics.refreshed_users.labels(trigger).inc(len(part))
            pause = len(part) / max(self.settings.refresh_rate, 1e-9) - (time.monotonic() - began)
            await asyncio.sleep(max(pause, 0.0))
        return done

    def item_info(self, item_ids: Sequence[str]
                  ) -> tuple[list[str], list[str | None], list[float]]:
        """Tier, category and log q of items, from the live popularity state."""
        tiers = self.imbalance.tiers
        return ([tiers.get(i, "tail") for i in item_ids],
                [self.popularity.category(i) for i in item_ids],
                self.imbalance.items.log_q_smoothed(item_ids, len(self.item_text)))

    async def _dead_letter(self, msg: RawMessage, why: Rejection) -> None:
        self.metrics.dlq.labels(why.reason).inc()
        await self.send_to_dlq(msg, why)


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


def dlq_headers(msg: RawMessage, why: Rejection) -> list[tuple[str, bytes]]:
    """Headers carried by a dead-lettered message (the value is the original bytes)."""
    return [
        ("tailstream-reason", why.reason.encode()),
        ("tailstream-detail", why.detail.encode("utf-8", "replace")[:500]),
        ("tailstream-source-topic", msg.topic.encode()),
        ("tailstream-source-partition", str(msg.partition).encode()),
        ("tailstream-source-offset", str(msg.offset).encode()),
    ]

