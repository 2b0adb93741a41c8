"""Publishing recommendation lists to Redis (atomically) and to the recommendations topic.

Redis keys (:class:`~tailstream.redis_io.Keys`): the sorted set ``recs:{user}`` (item →
score) and the hash ``recs:{user}:meta`` (model_version, generated_at, trigger, event_id,
items as JSON).

Lists are replaced by a server-side script (:data:`REPLACE_LISTS_LUA`): Redis runs a
script atomically, so a reader sees the old list or the new one, never a mix. One script
call replaces up to :data:`LISTS_PER_CALL` lists (a command to pack and parse per hundred
lists, not per list), and a batch's calls go in one pipelined round trip. Failed writes are
retried after a backoff (the client's circuit breaker,
:class:`~tailstream.redis_io.RedisHealth`, shared with de-duplication and the buffer: no
I/O while it is open); lists that wait are kept (latest per user, bounded), so a Redis
outage costs freshness, not ingest.

Each written list is also an **impression**
(:class:`~tailstream.streams.stores.impressions.Impression`): written to Redis in the same
pipelined round trip (``impression:{user}``, TTL = the attribution window), sent to the
``impressions`` topic beside the list's message, and handed to the worker's attribution
(``on_impressions``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tailstream.metrics import Metrics
from tailstream.redis_io import Keys, RedisHealth
from tailstream.streams.stores.impressions import Impression

log = logging.getLogger(__name__)
_encode = msgspec.json.encode


@dataclass
class RecList:
    """One user's list, ready to publish."""

    user_id: str
    items: list[dict[str, Any]]
    model_version: str
    trigger: str
    generated_at: float
    event_id: str | None
    source_ts: float | None  # Kafka timestamp of the triggering event (latency origin)
    arm: str = "serving"
    """Which model made it: ``serving``, or ``canary`` (the candidate being tried)."""
    policy: str = ""
    """What made it: ``hybrid``, ``towers`` or ``baseline``."""

    def impression(self, published_at: float) -> Impression:
        """This list as an impression record (a fresh list id)."""
        return Impression(self.user_id, os.urandom(8).hex(), self.model_version, self.arm,
                          self.policy, self.trigger, published_at,
                          tuple(str(it["item_id"]) for it in self.items),
                          tuple(str(it.get("tier", "tail")) for it in self.items))

    @cached_property
    def items_json(self) -> bytes:
        """The items as compact JSON (msgspec: UTF-8, no ``\\u`` escapes)."""
        return _encode(self.items)

    def message_bytes(self, published_at: float) -> bytes:
        """The recommendations-topic value (docs/schemas/recommendation.json)."""
        head = _encode({"user_id": self.user_id, "model_version": self.model_version,
                        "generated_at": self.generated_at, "trigger": self.trigger,
                        "event_id": self.event_id, "event_ts": self.source_ts,
                        "published_at": published_at})
        # Splice the items in rather than re-encoding a dict that holds them.
        return head[:-1] + b',"items":' + self.items_json + b"}"


LISTS_PER_CALL = 100
"""Lists replaced by one script call (the script holds Redis for about a millisecond)."""

REPLACE_LISTS_LUA = """
-- KEYS: sorted set, meta hash of each list, in pairs
-- ARGV[1] ttl; then per list: model_version, generated_at, trigger, items_json, event_id,
-- n, then n score, member pairs
local ttl = ARGV[1]
local a = 2
for i = 1, #KEYS, 2 do
  local n = tonumber(ARGV[a + 5])
  redis.call('DEL', KEYS[i])
  if n > 0 then
    redis.call('ZADD', KEYS[i], unpack(ARGV, a + 6, a + 5 + 2 * n))
    redis.call('EXPIRE', KEYS[i], ttl)
  end
  redis.call('DEL', KEYS[i + 1])
  redis.call('HSET', KEYS[i + 1], 'model_version', ARGV[a], 'generated_at', ARGV[a + 1],
             'trigger', ARGV[a + 2], 'items', ARGV[a + 3], 'event_id', ARGV[a + 4])
  redis.call('EXPIRE', KEYS[i + 1], ttl)
  a = a + 6 + 2 * n
end
return #KEYS / 2
"""


def parse_meta(user_id: str, meta: Mapping[Any, Any]) -> dict[str, Any] | None:
    """A user's list as JSON-ready dict, from the raw meta hash (None when absent)."""
    if not meta:
        return None
    text = {(k.decode() if isinstance(k, bytes) else str(k)):
            (v.decode() if isinstance(v, bytes) else str(v)) for k, v in meta.items()}
    return {"user_id": user_id, "model_version": text.get("model_version", ""),
            "generated_at": float(text.get("generated_at", "0")),
            "trigger": text.get("trigger", ""), "event_id": text.get("event_id") or None,
            "items": json.loads(text.get("items", "[]"))}


SendToKafka = Callable[[str, bytes], Awaitable[None]]
SendManyToKafka = Callable[[list[tuple[str, bytes]]], Awaitable[None]]
"""[(user_id, message)]: the lists of one publish, in one batched send."""


class ExposureWindow:
    """What the last ``slots`` recommended items were: catalogue coverage and the tail's
    share of exposure over a sliding window (bounded memory).

    >>> w = ExposureWindow(slots=4)
    >>> w.add([("a", "head"), ("b", "tail"), ("a", "head"), ("c", "tail"), ("d", "tail")])
    >>> w.distinct, w.tail_share
    (4, 0.75)
    """

    def __init__(self, slots: int = 50_000) -> None:
        self._items: deque[tuple[str, bool]] = deque()
        self._counts: Counter[str] = Counter()
        self._tail = 0
        self.slots = slots

    def add(self, shown: Iterable[tuple[str, str]]) -> None:
        for item, tier in shown:
            is_tail = tier == "tail"
            self._items.append((item, is_tail))
            self._counts[item] += 1
            self._tail += is_tail
            if len(self._items) > self.slots:
                old, old_tail = self._items.popleft()
                self._tail -= old_tail
                self._counts[old] -= 1
                if not self._counts[old]:
                    del self._counts[old]

    @property
    def distinct(self) -> int:
        return len(self._counts)

    @property
    def tail_share(self) -> float:
        return self._tail / len(self._items) if self._items else 0.0


class Publisher:
    """Writes lists to Redis then to Kafka; never raises into, nor stalls, the stream.

    Redis failures open the client's circuit (:class:`RedisHealth`): while it is open
    (exponential backoff from ``backoff_s`` up to ``max_backoff_s``), publishing only
    queues the newest list of each user (bounded by ``max_pending``, oldest dropped and
    counted) and returns at once, so ingest keeps its pace during an outage. The next
    publish after the backoff tries again; a timer in the worker calls :meth:`publish`
    with nothing new every second, so lists are current again within about
    ``max_backoff_s`` of Redis coming back. Writes are idempotent replacements, so a
    retried write never duplicates anything.
    """

    def __init__(self, redis: aioredis.Redis, send_to_kafka: SendToKafka, metrics: Metrics, *,
                 prefix: str = "tailstream", ttl_s: int = 86_400, backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0, max_pending: int = 50_000,
                 remember_users: int = 100_000, health: RedisHealth | None = None,
                 send_many: SendManyToKafka | None = None,
                 impression_ttl_s: int = 0,
                 send_impressions: SendManyToKafka | None = None,
                 on_impressions: Callable[[list[Impression]], None] | None = None) -> None:
        self.redis = redis
        self.send_to_kafka = send_to_kafka
        self.send_many = send_many
        self.impression_ttl_s = impression_ttl_s
        """TTL of the impression records in Redis (0: none written there)."""
        self.send_impressions = send_impressions
        self.on_impressions = on_impressions
        self.recent_latencies: deque[tuple[float, float]] = deque(maxlen=20_000)
        self.first_published: OrderedDict[str, float] = OrderedDict()
        """Model version → when its first list reached Redis (the last 32 versions)."""
        self.metrics = metrics
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.remember_users = remember_users
        # The breaker is shared with the other users of this client (de-dup, buffer); the
        # publisher owns the worker's metrics, so it hands them to the breaker.
        self.health = health if health is not None else RedisHealth.of(redis)
        self.health.backoff_s = backoff_s
        self.health.max_backoff_s = max_backoff_s
        self.health.metrics = metrics
        self._pending: OrderedDict[str, RecList] = OrderedDict()
        self._dropped_in_outage = 0
        self._held_back = False  # lists waited for Redis since the last successful write
        self._kafka_lost = 0  # notifications lost since the topic last worked
        # The agent and bulk refreshes publish concurrently; one batch at a time.
        self._lock = asyncio.Lock()
        self._replace = redis.register_script(REPLACE_LISTS_LUA)
        self.exposure = ExposureWindow()
        # When each user's list was last written (oldest first), for TTL refreshes.
        self.last_published: OrderedDict[str, float] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        return not self.health.is_down

    async def publish(self, lists: list[RecList]) -> int:
        """Publish lists (plus any left over from failed writes); returns lists written."""
        async with self._lock:
            return await self._publish(lists)

    async def _publish(self, lists: list[RecList]) -> int:
        for rec in lists:
            self._pending.pop(rec.user_id, None)
            self._pending[rec.user_id] = rec
        while len(self._pending) > self.max_pending:  # bounded memory: drop the oldest
            self._pending.popitem(last=False)
            self.metrics.publish_dropped.inc()
            self._dropped_in_outage += 1
        self.metrics.publish_pending.set(len(self._pending))
        if not self._pending:
            return 0
        if not self.health.allow():
            self._held_back = True
            return 0
        batch = list(self._pending.values())
        written_at = time.time()
        impressions = [rec.impression(written_at) for rec in batch]
        if not await self._write_redis(batch, impressions):
            return 0
        for rec in batch:  # lists queued while the write was in flight stay pending
            if self._pending.get(rec.user_id) is rec:
                del self._pending[rec.user_id]
        self.metrics.publish_pending.set(len(self._pending))
        published_at = time.time()
        tiers: Counter[str] = Counter()
        triggers: Counter[str] = Counter()
        for rec in batch:
            if rec.source_ts is not None:
                self.metrics.rec_latency.labels(rec.trigger).observe(
                    max(0.0, published_at - rec.source_ts))
            triggers[rec.trigger] += 1
            shown = [(item["item_id"], item.get("tier", "tail")) for item in rec.items]
            tiers.update(t for _, t in shown)
            self.exposure.add(shown)
            self.last_published.pop(rec.user_id, None)
            self.last_published[rec.user_id] = published_at
        while len(self.last_published) > self.remember_users:
            self.last_published.popitem(last=False)
        for tier, n in tiers.items():
            self.metrics.tail_items_published.labels(tier).inc(n)
        for trigger, n in triggers.items():
            self.metrics.recs_published.labels("redis", trigger).inc(n)
        self._observe_recent(batch, published_at)
        if self.on_impressions is not None:
            self.on_impressions(impressions)
        sent = await self._notify(batch, published_at)
        await self._send_impressions(impressions)
        if sent and self._kafka_lost:
            log.info("the recommendations topic works again (%d notifications lost)",
                     self._kafka_lost)
            self._kafka_lost = 0
        for trigger, n in sent.items():
            self.metrics.recs_published.labels("kafka", trigger).inc(n)
        return len(batch)

    async def _notify(self, batch: list[RecList], published_at: float) -> Counter[str]:
        """The recommendations-topic messages of lists Redis holds now (one batched send
        with ``send_many``, else one send each); returns the lists sent by trigger."""
        sent: Counter[str] = Counter()
        if self.send_many is not None:
            try:
                await self.send_many([(rec.user_id, rec.message_bytes(published_at))
                                      for rec in batch])
                sent.update(rec.trigger for rec in batch)
            except Exception as exc:  # lost notifications; Redis already holds the lists
                self._kafka_failed(exc, len(batch))
            return sent
        for rec in batch:
            try:
                await self.send_to_kafka(rec.user_id, rec.message_bytes(published_at))
                sent[rec.trigger] += 1
            except Exception as exc:  # a lost notification; Redis already holds the list
                self._kafka_failed(exc, 1)
        return sent

    async def _send_impressions(self, impressions: list[Impression]) -> None:
        """The impressions topic's records (key = user: compacted to each user's last
        list), in one batched send; a failure loses records, never the lists."""
        if self.send_impressions is None or not impressions:
            return
        try:
            await self.send_impressions([(imp.user_id, imp.to_json()) for imp in impressions])
        except Exception as exc:  # the lists and Redis' impressions stand
            self.metrics.publish_errors.labels("impressions").inc(len(impressions))
            log.debug("could not send %d impressions: %r", len(impressions), exc)

    def _kafka_failed(self, exc: Exception, lists: int) -> None:
        self.metrics.publish_errors.labels("kafka").inc(lists)
        self._kafka_lost += lists
        if self._kafka_lost == lists:  # once per run of failures, not per list
            log.warning("publishing lists to the recommendations topic fails (%s: %s); the "
                        "lists are in Redis, their notifications are lost until it works "
                        "again", type(exc).__name__, exc)

    def _observe_recent(self, batch: list[RecList], published_at: float) -> None:
        """Remember the event → Redis latency of lists made for an event (last 10 s), and
        when each model version's first list was published."""
        recent = self.recent_latencies
        first = self.first_published
        for rec in batch:
            if rec.source_ts is not None and rec.trigger == "event":
                recent.append((published_at, max(0.0, published_at - rec.source_ts)))
            if rec.model_version not in first:
                first[rec.model_version] = published_at
                while len(first) > 32:
                    first.popitem(last=False)

    def recent_latency(self, q: float, window_s: float = 10.0) -> float | None:
        """Quantile ``q`` (0–1) of the event → Redis latency of the lists published in the
        last ``window_s`` seconds (None: none published).

        >>> from prometheus_client import CollectorRegistry
        >>> p = Publisher.__new__(Publisher); p.recent_latencies = deque()
        >>> now = time.time()
        >>> p.recent_latencies.extend((now, x / 100) for x in range(1, 101))
        >>> p.recent_latency(0.5), p.recent_latency(0.99), p.recent_latency(0.99, -1.0)
        (0.5, 0.99, None)
        """
        cutoff = time.time() - window_s
        recent = self.recent_latencies
        while recent and recent[0][0] < cutoff:
            recent.popleft()
        values = sorted(x for _, x in recent)
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    async def _write_redis(self, batch: list[RecList],
                           impressions: list[Impression] | None = None) -> bool:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if impressions and self.impression_ttl_s > 0:
                    for imp in impressions:
                        pipe.set(self.keys.impression(imp.user_id), imp.to_json(),
                                 ex=self.impression_ttl_s)
                for start in range(0, len(batch), LISTS_PER_CALL):
                    keys: list[Any] = []
                    args: list[Any] = [self.ttl_s]
                    for rec in batch[start:start + LISTS_PER_CALL]:
                        keys += (self.keys.recs(rec.user_id), self.keys.meta(rec.user_id))
                        args += (rec.model_version, repr(rec.generated_at), rec.trigger,
                                 rec.items_json, rec.event_id or "", len(rec.items))
                        for it in rec.items:
                            args.append(float(it["score"]))
                            args.append(it["item_id"])
                    await self._replace(keys=keys, args=args, client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.metrics.publish_errors.labels("redis").inc()
            self._held_back = True
            self.health.failed("lists", exc)
            return False
        self.health.succeeded()
        if self._held_back:
            self._held_back = False
            log.info("wrote %d lists held back during the redis outage (%d dropped: the "
                     "queue holds at most %d users)", len(batch), self._dropped_in_outage,
                     self.max_pending)
            self._dropped_in_outage = 0
        return True
