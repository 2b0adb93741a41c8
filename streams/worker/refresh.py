"""Which users get a fresh list, and when: the waiting-users queue, the scoring task, and
the bulk refreshes (after a promotion, of aged lists).

* **Users who acted** wait in one queue, oldest first, *conflated*: a newer event
  replaces the older one's place and the list is made from the profile as it is when the
  user's turn comes. A background task scores the oldest waiting users, as many as one
  turn fits in its share of the latency budget (:class:`TurnSizer`), on the event loop
  itself; a larger turn, while the queue is behind, runs on the torch thread
  (:class:`~tailstream.streams.worker.scoring.ScoringService`) so ingest reads on beside
  it. Ingest never waits for the queue unless it outgrows ``scoring_max_waiting``
  (back-pressure, bounded memory).
* **Bulk refreshes** (``trigger`` ``promotion`` or ``ttl``) republish lists at most
  ``refresh_rate`` users/s, so they never flood Redis or starve ingest.
* **Active users** (acted within ``active_window_s``, newest last, bounded) are the ones a
  promotion refreshes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from tailstream.configs import BASELINE_VERSION
from tailstream.contract import INTERACTION_KINDS, Event
from tailstream.metrics import Metrics
from tailstream.models.serving.baseline import new_profile, recommend
from tailstream.models.serving.blend import Candidates, HybridRequest, OnlineBlender
from tailstream.models.serving.canary import in_canary
from tailstream.models.towers.context import UserRequest
from tailstream.settings import Settings
from tailstream.streams.stores.publisher import ExposureWindow, RecList
from tailstream.streams.worker.catchup import CatchUp
from tailstream.streams.worker.state import StreamState

if TYPE_CHECKING:
    from tailstream.streams.worker.scoring import ScoringService

SERVING = "serving"
"""The arm of lists made by the serving version (or the baseline)."""

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
        self.queued_at: dict[str, float] = {}  # monotonic time each waiting user queued
        self.applied_at: dict[str, float] = {}  # monotonic time of their newest event's batch
        self.sizer = TurnSizer(settings.latency_budget_ms / 1000.0, settings.scoring_batch,
                               share=settings.scoring_turn_share)
        self.catchup = CatchUp(settings.scoring_catchup_s, settings.scoring_catchup_duty)
        """While the worker reads a backlog, scoring rests between turns (catchup.py)."""
        self.blender = OnlineBlender(lr=settings.rank_blend_lr)
        """Scores hybrid lists; taught by each user's next interaction (:meth:`learn_from`)."""
        self.shown: OrderedDict[str, Candidates] = OrderedDict()
        """Each user's last hybrid list's candidates, until their next interaction."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Users who acted recently (newest last), for refreshes after a promotion.
        self.active: OrderedDict[str, float] = OrderedDict()

    # ------------------------------------------------------------------ users who acted
    def mark_active(self, user_id: str) -> None:
        self.mark_active_many((user_id,))

    def mark_active_many(self, users: Iterable[str]) -> None:
        """Users who acted now (one clock read for a batch), newest last."""
        now = time.time()
        active = self.active
        for user_id in users:
            active.pop(user_id, None)
            active[user_id] = now
        while len(active) > self.settings.active_users_max:
            active.popitem(last=False)

    async def enqueue(self, acted: Mapping[str, Waiting]) -> None:
        """Queue the users who acted for a fresh list (conflated: one place per user, the
        newest event's), wake the scoring task, and wait only while the queue is over its
        bound. With nobody new, retry the lists a failed write held back."""
        if not acted:
            if not self.waiting:
                await self.publisher.publish([])
            return
        self.catchup.observe(max((ts for _, ts in acted.values() if ts is not None),
                                 default=None), time.time())
        now = time.monotonic()
        for user, why in acted.items():
            # A user already waiting keeps their place (assigning an existing key does not
            # move it): one who acts faster than the queue drains is never pushed back.
            if user not in self.waiting:
                self.queued_at[user] = now
            self.applied_at[user] = now
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
            started = time.perf_counter()
            await self.score_next()
            # The baseline scores on this loop: let the next ingest batch in between; while
            # the worker catches up a backlog, let it read more first (catchup.py).
            rest = self.catchup.rest_s(time.perf_counter() - started, time.time())
            if rest > 0:
                self.metrics.scoring_catchup_rest.inc(rest)
            await asyncio.sleep(rest)

    def oldest_wait_s(self) -> float:
        """How long the user first in the queue has waited for their list."""
        for user in self.waiting:
            return time.monotonic() - self.queued_at.get(user, time.monotonic())
        return 0.0

    async def score_next(self) -> int:
        """Score and publish the oldest waiting users, as many as fit one turn of the
        latency budget (:class:`TurnSizer`); returns how many."""
        take = min(len(self.waiting), self.sizer.size(self.oldest_wait_s()))
        batch = [self.waiting.popitem(last=False) for _ in range(take)]
        turn_at = time.monotonic()
        for user, _ in batch:
            self.queued_at.pop(user, None)
        applied = [self.applied_at.pop(user, turn_at) for user, _ in batch]
        self.metrics.scoring_waiting.set(len(self.waiting))
        self.metrics.scoring_turn_users.set(take)
        # A turn the budget fits runs on the event loop; a catch-up turn on the thread.
        inline = self.settings.scoring_inline and take <= self.sizer.fits()
        started = time.perf_counter()
        try:
            versions, ranked, arms = await self.score([u for u, _ in batch], inline=inline)
            turn_s = time.perf_counter() - started
            self.sizer.observe(take, turn_s)
            now = time.time()
            await self.publisher.publish([
                RecList(user_id=u, items=items, model_version=version, trigger="event",
                        generated_at=now, event_id=event_id, source_ts=ts, arm=arm,
                        policy=self.policy_of(version))
                for (u, (event_id, ts)), items, version, arm in zip(
                    batch, ranked, versions, arms, strict=True)])
            self._observe_stages([ts for _, (_, ts) in batch], applied, turn_at,
                                 turn_s, time.time() - now)
        except Exception:  # lists are derived data: log, count, keep serving
            self.metrics.publish_errors.labels("scoring").inc()
            log.exception("scoring a batch of %d users failed", len(batch))
        return take

    def _observe_stages(self, source_ts: Sequence[float | None], applied: Sequence[float],
                        turn_at: float, turn_s: float, publish_s: float) -> None:
        """Where each list's freshness went (``tailstream_list_stage_seconds``): ``read``
        (the event's Kafka timestamp → its batch applied: producer, broker, fetch wait,
        batch window, the batch), ``queue`` (→ its turn began), ``turn`` (scoring) and
        ``publish`` (the Redis and Kafka writes); the first two per list, the last two per
        turn. A list's event → Redis latency is its read + queue + its turn's two."""
        stage = self.metrics.list_stage
        read, queue = stage.labels("read"), stage.labels("queue")
        to_wall = time.time() - time.monotonic()
        for ts, at in zip(source_ts, applied, strict=True):
            if ts is not None:
                read.observe(max(0.0, at + to_wall - ts))
            queue.observe(max(0.0, turn_at - at))
        if applied:  # once per turn
            stage.labels("turn").observe(turn_s)
            stage.labels("publish").observe(publish_s)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every waiting user has been scored and published (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ the blender
    def learn_from(self, applied: Iterable[tuple[Event, Any]]) -> None:
        """Teach the blender with the interactions just applied: each one against the
        candidates of the list its user was last given (test-then-train: the list was made
        before the event). A list teaches once; a user's later events wait for a new one."""
        if not self.shown:
            return
        for event, _ in applied:
            if event.kind not in INTERACTION_KINDS or event.item_id is None:
                continue
            shown = self.shown.pop(event.user_id, None)
            if shown is None:
                continue
            row = shown.row(event.item_id)
            self.blender.learn(shown.x, row)
            self.metrics.blend_updates.labels("hit" if row is not None else "miss").inc()

    def _remember(self, users: Sequence[str], made: Sequence[Any]) -> None:
        for user, lst in zip(users, made, strict=True):
            self.shown.pop(user, None)
            self.shown[user] = lst.candidates
        while len(self.shown) > self.settings.active_users_max:
            self.shown.popitem(last=False)

    # ------------------------------------------------------------------ scoring
    def policy_of(self, version: str) -> str:
        """What made a list of ``version``: ``baseline``, ``hybrid`` or ``towers``."""
        if version == BASELINE_VERSION:
            return "baseline"
        return "hybrid" if self.state.signals is not None else "towers"

    async def score(self, users: Sequence[str], *, inline: bool = False
                    ) -> tuple[list[str], list[list[dict[str, Any]]], list[str]]:
        """Lists for users from their profiles: the transformer when it is ready (hybrid:
        with the stateful sources and the blender; ``inline``: on the event loop, else on
        the torch thread), else the baseline. Returns, per user, the version that made
        the list, the list, and its arm (``serving``, or ``canary`` for the users a
        canary's candidate serves: scored in a call of their own)."""
        profiles = [self.profiles.get(u) or new_profile() for u in users]
        scoring = self.scoring
        if scoring is None or not scoring.ready:
            return [BASELINE_VERSION] * len(users), [[r.to_dict(i + 1) for i, r in enumerate(
                recommend(p, self.state.popularity, k=self.settings.recs_k,
                          tail_share=self.settings.tail_share))] for p in profiles], \
                [SERVING] * len(users)
        arms = [scoring.arm(u) for u in users] if scoring.canary is not None \
            else [SERVING] * len(users)
        versions = [""] * len(users)
        lists: list[list[dict[str, Any]]] = [[] for _ in users]
        for arm in dict.fromkeys(arms):
            idx = [i for i, a in enumerate(arms) if a == arm]
            version, made = await self._score_with(
                arm, [users[i] for i in idx], [profiles[i] for i in idx], inline)
            for i, lst in zip(idx, made, strict=True):
                versions[i], lists[i] = version, lst
        return versions, lists, arms

    async def _score_with(self, arm: str, users: Sequence[str], profiles: Sequence[Any],
                          inline: bool) -> tuple[str, list[list[dict[str, Any]]]]:
        """The transformer's lists for ``users`` from the scorer of ``arm``, and its version."""
        assert self.scoring is not None
        scorer = self.scoring.scorer_for(arm)
        assert scorer is not None
        version = scorer.version
        requests = [UserRequest(u, self.state.context(p), set(p.get("items", [])[:5]))
                    for u, p in zip(users, profiles, strict=True)]
        signals = self.state.signals
        if signals is not None:
            now = time.time()
            hybrid = [HybridRequest(r, signals.sources(p, now=now), dict(p.get("cats", {})),
                                    query=signals.last_query(p, now))
                      for r, p in zip(requests, profiles, strict=True)]
            made = await self.scoring.recommend_hybrid(hybrid, self.item_info, self.blender,
                                                       scorer=scorer,
                                                       features=self.state.list_features,
                                                       inline=inline)
            self._remember(users, made)
            return version, [[r.to_dict(i + 1) for i, r in enumerate(m.ranked)]
                             for m in made]
        ranked = await self.scoring.recommend(requests, self.item_info, scorer=scorer,
                                              features=self.state.list_features,
                                              inline=inline)
        return version, [[r.to_dict(i + 1) for i, r in enumerate(lst)] for lst in ranked]

    async def _after_waiting_users(self, longest_s: float = 2.0) -> None:
        """Let users who acted go first: a bulk chunk waits while the oldest of them has
        waited over a quarter of the budget (at most ``longest_s``, so a bulk refresh under
        constant load still moves)."""
        deadline = time.monotonic() + longest_s
        while (self.oldest_wait_s() > self.sizer.budget_s / 4
               and time.monotonic() < deadline):
            await asyncio.sleep(0.005)

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

    async def refresh_canary_users(self, version: str, share: float,
                                   trigger: str = "canary") -> int:
        """Republish the lists of the active users in the canary of ``version`` (its
        ``share`` of users): when it starts, so they see the candidate at once; when it is
        rolled back, so they see the serving version again."""
        cutoff = time.time() - self.settings.active_window_s
        return await self.refresh_users(
            [u for u, t in reversed(self.active.items())
             if t >= cutoff and in_canary(u, share, version)], trigger)

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
        """Republish the lists of ``users`` at most ``refresh_rate`` users/s, each chunk
        after the users who acted have had their turn (:meth:`_after_waiting_users`).
        Chunks are scored on the torch thread, never on the event loop. A chunk is what
        one scoring turn fits in the latency budget
        (:meth:`TurnSizer.fits`, at most ``chunk``): scoring takes one turn at
        a time, so a user who acts while a bulk chunk is scored waits for all of it — a
        fixed 100 users (half a second on a busy two-core machine) put a second into the
        p99 of every promotion and canary. Returns how many were refreshed."""
        self.metrics.refresh_pending.labels(trigger).set(len(users))
        done = 0
        while done < len(users):
            await self._after_waiting_users()
            began = time.monotonic()
            part = users[done:done + min(chunk, self.sizer.fits())]
            # On the torch thread: ingest and the users who acted keep the event loop
            # (inline, chunks at ``refresh_rate`` held it most of a promotion's refresh,
            # and a demo's p99 went from 0.2 to 1.9 s).
            versions, items, arms = await self.score(part)
            now = time.time()
            await self.publisher.publish([
                RecList(user_id=u, items=its, model_version=version, trigger=trigger,
                        generated_at=now, event_id=None, source_ts=None, arm=arm,
                        policy=self.policy_of(version))
                for u, its, version, arm in zip(part, items, versions, arms, strict=True)])
            done += len(part)
            self.metrics.refresh_pending.labels(trigger).set(len(users) - done)
            self.metrics.refreshed_users.labels(trigger).inc(len(part))
            pause = len(part) / max(self.settings.refresh_rate, 1e-9) - (time.monotonic() - began)
            await asyncio.sleep(max(pause, 0.0))
        return done


class TurnSizer:
    """How many waiting users one scoring turn takes, so that it ends within the budget.

    A user who acts while a turn runs waits for it to end and is scored in the next one,
    so their latency is about two turns plus the batch wait: a turn gets ``share`` (30 %)
    of the budget. The cost of a turn of ``n`` users is fitted as ``fixed + per_user · n``
    (least squares over the last turns), and the size is what fits, at least ``low``
    users. When the queue is behind (its oldest user has waited longer than the budget),
    throughput counts more: each turn while behind takes twice the last one (from twice
    what fits), at most ``high`` (``TAILSTREAM_SCORING_BATCH``), so a fixed cost the fit
    cannot see (turns of one size all look like per-user cost) is spread over more users,
    and the fit learns from the new sizes; once caught up, turns fit the budget again.

    >>> t = TurnSizer(budget_s=0.25, high=256)
    >>> for n in (16, 64, 128):
    ...     t.observe(n, 0.01 + 0.001 * n)    # 10 ms + 1 ms per user
    >>> t.size(waited_s=0.0), t.size(waited_s=0.3), t.size(waited_s=0.3), t.size(0.0)
    (64, 128, 256, 64)
    >>> t.fits()                          # a bulk refresh's chunk: never the catch-up size
    64
    """

    def __init__(self, budget_s: float, high: int, *, low: int = 8, share: float = 0.3,
                 history: int = 32) -> None:
        self.budget_s = budget_s
        self.high = max(high, 1)
        self.low = max(min(low, self.high), 1)
        self.share = share
        self.turns: deque[tuple[int, float]] = deque(maxlen=history)
        self.fixed_s = 0.01
        self.per_user_s = 0.001
        self._behind = 0  # the last turn's size while behind (0: not behind)

    def observe(self, users: int, seconds: float) -> None:
        """A turn of ``users`` took ``seconds``: refit the cost."""
        if users <= 0:
            return
        self.turns.append((users, seconds))
        n = len(self.turns)
        mean_x = sum(u for u, _ in self.turns) / n
        mean_y = sum(t for _, t in self.turns) / n
        var = sum((u - mean_x) ** 2 for u, _ in self.turns)
        if var > 0:
            slope = sum((u - mean_x) * (t - mean_y) for u, t in self.turns) / var
        else:  # one size so far: all of it per user
            slope = mean_y / mean_x
        self.per_user_s = max(slope, 1e-6)
        self.fixed_s = max(mean_y - self.per_user_s * mean_x, 0.0)

    def fits(self) -> int:
        """Users one turn scores within its share of the budget, by the fitted cost (at
        least ``low``, at most ``high``); bulk refreshes take chunks of this size."""
        left = self.budget_s * self.share - self.fixed_s
        return min(self.high, max(self.low, int(left / self.per_user_s) if left > 0 else 0))

    def size(self, waited_s: float) -> int:
        """Users for the next turn, given how long the oldest has waited already."""
        fit = self.fits()
        if waited_s > self.budget_s:
            fit = max(2 * fit, 2 * self._behind)
            self._behind = min(self.high, fit)
        else:
            self._behind = 0
        return min(self.high, fit)
