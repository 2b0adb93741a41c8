"""Online attribution: what users did with the lists they were served (no torch, no I/O
per event).

Each published list is an :class:`~tailstream.streams.stores.impressions.Impression`
(the publisher hands them over once Redis holds the lists). The worker keeps each user's
*last* impression (bounded by ``max_users``; Redis keeps it too, for the window, so a
user whose partition moved here is still attributed: :meth:`Attribution.prefetch` reads
the users this worker does not know in one ``MGET`` per batch, and remembers for a
minute who has none). Then, per applied interaction (a dict lookup and a scan of at most
``k`` items):

* the user's **first interaction after the list** *judges* it: a **hit** when it is on an
  item of the list, a **miss** otherwise — the online HitRate of served lists
  (``tailstream_judged_lists_total{model_version,outcome}``), what the canary compares;
* an interaction on an item of the list is **attributed** to it, by class, the item's
  tier, its position and the list's model version (``tailstream_attributed_total``,
  ``tailstream_attributed_position_total``); an item taken from a list is remembered
  for the window, so the cart and purchase that follow the click are attributed to the
  list that showed it even after the list was replaced (last touch);
* only interactions whose time stamp (``ts``) lies within ``[published_at, published_at
  + window]`` count: an event that happened before the list existed, or a replayed log's
  (its times are the past), is never attributed to it.

Every figure is also added to the version's online counters
(:class:`~tailstream.streams.stores.impressions.OnlineCounters`), which the worker
writes to Redis once a second, so the trainer judges a canary on every worker's lists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from tailstream.configs import AttributionConfig
from tailstream.contract import INTERACTION_KINDS, TAIL, Event
from tailstream.metrics import Metrics
from tailstream.redis_io import RedisHealth
from tailstream.streams.stores.impressions import (
    Impression,
    OnlineCounters,
    load_impressions,
    position_bucket,
)

log = logging.getLogger(__name__)

ABSENT_FOR_S = 60.0
"""A user Redis had no impression for is not looked up again this long (unless a list is
published for them here meanwhile)."""
LOOKUP_TIMEOUT_S = 0.5
"""Longest a batch waits for the impressions of users this worker does not know."""


class Attribution:
    """Each user's last served list, and what their interactions did with it."""

    def __init__(self, cfg: AttributionConfig, metrics: Metrics,
                 counters: OnlineCounters | None = None, *, redis: Any = None,
                 prefix: str = "tailstream", health: RedisHealth | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.counters = counters
        self.redis = redis
        self.prefix = prefix
        self.health = health
        """The client's circuit breaker: no lookup while Redis is treated as down."""
        self.lists: OrderedDict[str, Impression] = OrderedDict()
        """User → the last impression (oldest first, bounded by ``cfg.max_users``)."""
        self.judged: set[str] = set()
        """Users whose last list was judged already (by their first interaction after it)."""
        self.taken: dict[str, dict[str, tuple[Impression, int]]] = {}
        """User → items they took from a list → (that list, the item's position)."""
        self.absent: OrderedDict[str, float] = OrderedDict()
        self._children: dict[tuple[str, ...], Any] = {}
        self.metrics.tail_target.set(cfg.tail_target)

    # ------------------------------------------------------------------ impressions
    def shown(self, impressions: Iterable[Impression]) -> None:
        """Lists just published: each replaces its user's last one (and is counted)."""
        lists, judged = self.lists, self.judged
        for imp in impressions:
            user = imp.user_id
            lists.pop(user, None)
            lists[user] = imp
            judged.discard(user)
            self.absent.pop(user, None)
            self._count_shown(imp)
        while len(lists) > self.cfg.max_users:
            user, _ = lists.popitem(last=False)
            judged.discard(user)
            self.taken.pop(user, None)

    def _count_shown(self, imp: Impression) -> None:
        v = imp.model_version
        self._child("lists", v, imp.arm).inc()
        tiers: dict[str, int] = {}
        for tier in imp.tiers:
            tiers[tier] = tiers.get(tier, 0) + 1
        for tier, n in tiers.items():
            self._child("items", v, tier).inc(n)
        if self.counters is not None:
            self.counters.add(v, "lists")
            for tier, n in tiers.items():
                self.counters.add(v, f"items:{tier}", n)

    async def prefetch(self, users: Iterable[str]) -> int:
        """Read from Redis (one ``MGET``, bounded wait) the last impression of ``users``
        this worker does not hold (their partition moved here, or the worker restarted);
        returns how many were found. Never raises: attribution is advisory."""
        if self.redis is None:
            return 0
        now = time.monotonic()
        wanted = [u for u in dict.fromkeys(users) if u not in self.lists
                  and now - self.absent.get(u, -ABSENT_FOR_S) >= ABSENT_FOR_S]
        if not wanted or (self.health is not None and not self.health.allow()):
            return 0
        try:
            found = await asyncio.wait_for(load_impressions(self.redis, self.prefix, wanted),
                                           LOOKUP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the next batch tries again
            log.debug("could not read %d impressions from redis: %r", len(wanted), exc)
            if self.health is not None:
                self.health.failed("attribution", exc)
            return 0
        if self.health is not None:
            self.health.succeeded()
        for user in wanted:
            imp = found.get(user)
            if imp is None:
                self.absent.pop(user, None)
                self.absent[user] = now
            elif user not in self.lists:  # a list published here meanwhile is newer
                self.lists[user] = imp
        while len(self.absent) > self.cfg.max_users:
            self.absent.popitem(last=False)
        return len(found)

    # ------------------------------------------------------------------ interactions
    def observe(self, applied: Iterable[tuple[Event, Any]]) -> int:
        """Judge and attribute the interactions just applied; returns how many were
        attributed to a list."""
        if not self.lists:
            return 0
        window = self.cfg.window_s
        attributed = 0
        for event, _ in applied:
            if event.kind not in INTERACTION_KINDS or event.item_id is None:
                continue
            user = event.user_id
            imp = self.lists.get(user)
            if imp is None:
                continue
            if event.ts > imp.published_at + window:  # the list is too old to count
                del self.lists[user]
                self.judged.discard(user)
                self.taken.pop(user, None)
                continue
            if event.ts < imp.published_at:  # happened before this list existed
                continue
            position = imp.position(event.item_id)
            if user not in self.judged:
                self.judged.add(user)
                self._judge(imp, position > 0)
            if position:
                self.taken.setdefault(user, {})[event.item_id] = (imp, position)
                self._attribute(imp, position, event.kind)
                attributed += 1
                continue
            earlier = self.taken.get(user, {}).get(event.item_id)
            if earlier is not None and event.ts <= earlier[0].published_at + window:
                self._attribute(earlier[0], earlier[1], event.kind)
                attributed += 1
        return attributed

    def _judge(self, imp: Impression, hit: bool) -> None:
        outcome = "hit" if hit else "miss"
        self._child("judged", imp.model_version, outcome).inc()
        if self.counters is not None:
            self.counters.add(imp.model_version, "judged")
            if hit:
                self.counters.add(imp.model_version, "hits")

    def _attribute(self, imp: Impression, position: int, cls: str) -> None:
        tier = imp.tiers[position - 1] if position <= len(imp.tiers) else TAIL
        bucket = position_bucket(position)
        self._child("attributed", imp.model_version, tier, cls).inc()
        self._child("position", bucket).inc()
        if self.counters is not None:
            v = imp.model_version
            self.counters.add(v, cls)
            self.counters.add(v, f"{cls}:{tier}")
            self.counters.add(v, f"pos:{bucket}")

    def _child(self, *key: str) -> Any:
        """A metric's labelled child, resolved once (label lookups cost more than the
        increments)."""
        child = self._children.get(key)
        if child is None:
            metric = {"lists": self.metrics.impression_lists,
                      "items": self.metrics.impressions,
                      "judged": self.metrics.judged_lists,
                      "attributed": self.metrics.attributed,
                      "position": self.metrics.attributed_positions}[key[0]]
            child = metric.labels(*key[1:])
            self._children[key] = child
        return child

    async def flush(self) -> int:
        """Write the online counters added since the last flush to Redis (the timer's)."""
        return await self.counters.flush() if self.counters is not None else 0
