"""The per-batch work of the worker, independent of Faust so it can be tested alone.

ingest (decode, validate, dead-letter) → de-duplicate → state (user profiles,
popularity, catalogue) → score the users who acted → publish.

Nothing here raises into the stream: a message that cannot be processed is
dead-lettered with its reason, never dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
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
from tailstream.models.baseline import new_profile, recommend
from tailstream.models.popularity import PopularityTracker
from tailstream.models.scorer import ContextEntry, UserRequest
from tailstream.settings import Settings
from tailstream.streams.buffer_store import RedisBufferStore
from tailstream.streams.dedupe import Deduper
from tailstream.streams.imbalance import ImbalanceLoop
from tailstream.streams.publish import Publisher, RecList
from tailstream.streams.scoring import ScoringService
from tailstream.streams.state import StreamState

log = logging.getLogger(__name__)

BASELINE_VERSION = "baseline-1"


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


@dataclass(slots=True)
class _ScoringJob:
    """One batch's users to score: their requests, and (user, event id, event time)."""

    requests: list[UserRequest]
    meta: list[tuple[str, str, float | None]]

SendToDlq = Callable[[RawMessage, Rejection], Awaitable[None]]
SendRequest = Callable[[dict[str, Any]], Awaitable[None]]
SaveCounts = Callable[[dict[int, dict[str, Any]]], None]


class Pipeline:
    def __init__(self, settings: Settings, *, profiles: MutableMapping[str, Any],
                 deduper: Deduper, publisher: Publisher, send_to_dlq: SendToDlq,
                 metrics: Metrics, popularity: PopularityTracker | None = None,
                 imbalance: ImbalanceLoop | None = None,
                 buffer_store: RedisBufferStore | None = None,
                 send_training_request: SendRequest | None = None,
                 save_counts: SaveCounts | None = None,
                 scoring: ScoringService | None = None,
                 refresh_every_s: float = 1.0) -> None:
        self.settings = settings
        self.limits = Limits(max_event_bytes=settings.max_event_bytes,
                             max_string_chars=settings.max_string_chars,
                             max_future_skew_s=float(settings.max_future_skew_s))
        self.kind_of_topic = {settings.topic_for(k): k
                              for k in ("click", "cart", "fav", "purchase", "search")}
        self.items_topic = settings.topic_for("item")
        self.state = StreamState(settings, profiles, popularity=popularity, imbalance=imbalance,
                                 on_new_item=scoring.queue_item if scoring is not None else None)
        self.profiles = profiles
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
        self._weights_written = 0.0
        self._weights_dirty = False
        self.refresh_every_s = refresh_every_s
        self._last_refresh = 0.0
        self._jobs: asyncio.Queue[_ScoringJob] | None = None
        self._job_task: asyncio.Task[None] | None = None
        # Users who acted recently (newest last), for refreshes after a promotion.
        self.active: OrderedDict[str, float] = OrderedDict()
        # Label lookups cost more than the increments: resolve each child once.
        kinds = [*self.kind_of_topic.values(), "unknown"]
        self._events_in = {k: metrics.events_in.labels(k) for k in kinds}
        self._processed = {k: metrics.events_processed.labels(k) for k in kinds}

    # ------------------------------------------------------------------ ingest
    async def process(self, batch: list[RawMessage]) -> None:
        """Process one batch. Every message ends processed, skipped as duplicate, or in the DLQ."""
        started = time.perf_counter()
        self.metrics.batch_size.observe(len(batch))
        events: list[tuple[Event, RawMessage]] = []
        for msg in batch:
            if msg.topic == self.items_topic:
                await self._apply_item(msg)
                continue
            kind = self.kind_of_topic.get(msg.topic, "unknown")
            self._events_in[kind].inc()
            events.extend((event, msg) for event in await self._valid(
                msg, functools.partial(validate_event, kind, limits=self.limits)))
        if events:
            fresh = await self.deduper.first_seen([e.event_id for e, _ in events])
            acted: dict[str, tuple[Event, RawMessage]] = {}
            for (event, msg), is_new in zip(events, fresh, strict=True):
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
                acted[event.user_id] = (event, msg)
                self._mark_active(event.user_id)
            self._maybe_refresh()
            await self._refresh_users(acted)
            await self._close_imbalance_batch()
        elif self.publisher.pending:
            await self.publisher.publish([])
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

    async def _valid(self, msg: RawMessage, validate: Callable[[Any], T]) -> list[T]:
        """The valid values of a message (one, or several in an envelope); the rest are
        dead-lettered, one DLQ record per rejected value."""
        decoded = decode_payload(msg.value, self.limits)
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
        if not acted:
            if self._jobs is None or self._jobs.empty():
                await self.publisher.publish([])  # retries lists a failed write kept
            return
        if self.scoring is not None and self.scoring.ready:
            # The transformer scores on its own thread while the next batch is ingested:
            # the user contexts are taken now, the lists follow in batch order. A bounded
            # queue makes ingest wait when scoring falls behind.
            profiles = [self.profiles.get(u) or new_profile() for u in acted]
            job = _ScoringJob(
                [UserRequest(u, self.context(p), set(p.get("items", [])[:5]))
                 for u, p in zip(acted, profiles, strict=True)],
                [(u, event.event_id, msg.timestamp) for u, (event, msg) in acted.items()])
            await self._enqueue(job)
            return
        version, items = await self._score(list(acted))
        now = time.time()
        lists = [RecList(user_id=u, items=its, model_version=version, trigger="event",
                         generated_at=now, event_id=event.event_id, source_ts=msg.timestamp)
                 for (u, (event, msg)), its in zip(acted.items(), items, strict=True)]
        await self.publisher.publish(lists)

    async def _enqueue(self, job: _ScoringJob) -> None:
        if self._jobs is None:
            self._jobs = asyncio.Queue(maxsize=max(1, self.settings.scoring_queue))
            self._job_task = asyncio.get_running_loop().create_task(self._score_jobs())
        await self._jobs.put(job)

    async def _score_jobs(self) -> None:
        assert self._jobs is not None and self.scoring is not None
        while True:
            jobs = [await self._jobs.get()]
            # Whatever queued up meanwhile is scored in the same call: bigger batches are
            # far cheaper per user, and a user's newest context supersedes older ones.
            while not self._jobs.empty():
                jobs.append(self._jobs.get_nowait())
            latest: dict[str, tuple[UserRequest, tuple[str, str, float | None]]] = {}
            for j in jobs:
                for req, meta in zip(j.requests, j.meta, strict=True):
                    latest.pop(req.user_id, None)
                    latest[req.user_id] = (req, meta)
            job = _ScoringJob([r for r, _ in latest.values()], [m for _, m in latest.values()])
            try:
                ranked = await self.scoring.recommend(job.requests, self.item_info)
                now = time.time()
                version = self.scoring.version
                await self.publisher.publish([
                    RecList(user_id=u, items=[r.to_dict(i + 1) for i, r in enumerate(lst)],
                            model_version=version, trigger="event", generated_at=now,
                            event_id=event_id, source_ts=ts)
                    for (u, event_id, ts), lst in zip(job.meta, ranked, strict=True)])
            except Exception:  # lists are derived data: log, count, keep serving
                self.metrics.publish_errors.labels("scoring").inc()
                log.exception("scoring a batch of %d users failed", len(job.requests))
            finally:
                for _ in jobs:
                    self._jobs.task_done()

    async def drain(self) -> None:
        """Wait until every queued scoring job has published its lists."""
        if self._jobs is not None:
            await self._jobs.join()

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


def dlq_headers(msg: RawMessage, why: Rejection) -> list[tuple[str, bytes]]:
    """Headers carried by a dead-lettered message (the value is the original bytes)."""
    return [
        ("tailstream-reason", why.reason.encode()),
        ("tailstream-detail", why.detail.encode("utf-8", "replace")[:500]),
        ("tailstream-source-topic", msg.topic.encode()),
        ("tailstream-source-partition", str(msg.partition).encode()),
        ("tailstream-source-offset", str(msg.offset).encode()),
    ]

