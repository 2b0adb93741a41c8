"""Which users get a fresh list, and when: the waiting-users queue, the scoring task, and
the bulk refreshes (after a promotion, of aged lists).

* **Users who acted** wait in one queue, oldest first, *conflated*: a newer event
  replaces the older one's place and the list is made from the profile as it is when the
  user's turn comes. A background task scores ``scoring_batch`` waiting users at a time
  (the transformer on its own thread, :class:`~tailstream.streams.worker.scoring.
  ScoringService`; the baseline on the event loop), so ingest never waits for scoring —
  unless the queue outgrows ``scoring_max_waiting`` (back-pressure, bounded memory).
* **Bulk refreshes** (``trigger`` ``promotion`` or ``ttl``) republish lists at most
  ``refresh_rate`` users/s, so they never flood Redis or starve ingest.
* **Active users** (acted within ``active_window_s``, newest last, bounded) are the ones a
  promotion refreshes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tailstream.configs import BASELINE_VERSION
from tailstream.metrics import Metrics
from tailstream.models.serving.baseline import new_profile, recommend
from tailstream.models.towers.context import UserRequest
from tailstream.settings import Settings
from tailstream.streams.stores.publisher import ExposureWindow, RecList
from tailstream.streams.worker.state import StreamState

if TYPE_CHECKING:
    from tailstream.streams.worker.scoring import ScoringService

log = logging.getLogger(__name__)


class ListSink(Protocol):
    """Where lists go (:class:`~tailstream.streams.stores.publisher.Publisher`, or a fake)."""

    exposure: ExposureWindow
    last_published: OrderedDict[str, float]

    @property
    def pending(self) -> int: ...

    async def publish(self, lists: list[RecList]) -> int: ...


Waiting = tuple[str, float | None]
"""(event_id that asked for the list, its Kafka timestamp: the latency origin)."""


class Refresher:
    def __init__(self, settings: Settings, state: StreamState,
                 profiles: Mapping[str, Any], publisher: ListSink, metrics: Metrics,
                 scoring: ScoringService | None = None) -> None:
        self.settings = settings
        self.state = state
        self.profiles = profiles
        self.publisher = publisher
        self.metrics = metrics
        self.scoring = scoring
        self.waiting: OrderedDict[str, Waiting] = OrderedDict()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Users who acted recently (newest last), for refreshes after a promotion.
        self.active: OrderedDict[str, float] = OrderedDict()

    # ------------------------------------------------------------------ users who acted
    def mark_active(self, user_id: str) -> None:
        self.active.pop(user_id, None)
        self.active[user_id] = time.time()
        while len(self.active) > self.settings.active_users_max:
            self.active.popitem(last=False)

    async def enqueue(self, acted: Mapping[str, Waiting]) -> None:
        """Queue the users who acted for a fresh list (conflated: one place per user, the
        newest event's), wake the scoring task, and wait only while the queue is over its
        bound. With nobody new, retry the lists a failed write held back."""
        if not acted:
            if not self.waiting:
                await self.publisher.publish([])
            return
        for user, why in acted.items():
            # A user already waiting keeps their place (assigning an existing key does not
            # move it): one who acts faster than the queue drains is never pushed back.
            self.waiting[user] = why
        self.metrics.scoring_waiting.set(len(self.waiting))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._score_waiting())
        self._wake.set()
        while len(self.waiting) > self.settings.scoring_max_waiting:
            await asyncio.sleep(0.01)

    async def _score_waiting(self) -> None:
        """Score waiting users, oldest first, ``scoring_batch`` at a time, forever."""
        while True:
            if not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self.score_next()
            # The baseline scores on this loop: let the next ingest batch in between.
            await asyncio.sleep(0)

    async def score_next(self) -> int:
        """Score and publish the oldest ``scoring_batch`` waiting users; returns how many."""
        take = min(len(self.waiting), self.settings.scoring_batch)
        batch = [self.waiting.popitem(last=False) for _ in range(take)]
        self.metrics.scoring_waiting.set(len(self.waiting))
        try:
            version, ranked = await self.score([u for u, _ in batch])
            now = time.time()
            await self.publisher.publish([
                RecList(user_id=u, items=items, model_version=version, trigger="event",
                        generated_at=now, event_id=event_id, source_ts=ts)
                for (u, (event_id, ts)), items in zip(batch, ranked, strict=True)])
        except Exception:  # lists are derived data: log, count, keep serving
            self.metrics.publish_errors.labels("scoring").inc()
            log.exception("scoring a batch of %d users failed", len(batch))
        return take

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every waiting user has been scored and published (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ scoring
    async def score(self, users: Sequence[str]) -> tuple[str, list[list[dict[str, Any]]]]:
        """Lists for users from their profiles: the transformer when it is ready, else the
        baseline. Returns the version that made them."""
        profiles = [self.profiles.get(u) or new_profile() for u in users]
        if self.scoring is not None and self.scoring.ready:
            version = self.scoring.version
            requests = [UserRequest(u, self.state.context(p), set(p.get("items", [])[:5]))
                        for u, p in zip(users, profiles, strict=True)]
            ranked = await self.scoring.recommend(requests, self.item_info)
            return version, [[r.to_dict(i + 1) for i, r in enumerate(lst)] for lst in ranked]
        return BASELINE_VERSION, [[r.to_dict(i + 1) for i, r in enumerate(
            recommend(p, self.state.popularity, k=self.settings.recs_k,
                      tail_share=self.settings.tail_share))] for p in profiles]

    def item_info(self, item_ids: Sequence[str]
                  ) -> tuple[list[str], list[str | None], list[float]]:
        """Tier, category and log q of items, from the live popularity state."""
        tiers = self.state.imbalance.tiers
        return ([tiers.get(i, "tail") for i in item_ids],
                [self.state.popularity.category(i) for i in item_ids],
                self.state.imbalance.items.log_q_smoothed(item_ids, len(self.state.item_text)))

    # ------------------------------------------------------------------ bulk refreshes
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
        """Republish the lists of ``users`` at most ``refresh_rate`` users/s. Returns how
        many were refreshed."""
        self.metrics.refresh_pending.labels(trigger).set(len(users))
        done = 0
        for start in range(0, len(users), chunk):
            began = time.monotonic()
            part = users[start:start + chunk]
            version, items = await self.score(part)
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
