"""De-duplication by event_id, bounded in time and memory.

Redis holds the shared memory of seen ids (``SET key source NX EX ttl``), so duplicates are
caught across workers and restarts. A batch's ids go to Redis in **one command**: a Lua
script (:data:`FIRST_SEEN_LUA`) sets every id not seen before and returns, for the
others, the message that carried them first — one round trip and one command to pack
instead of two per id. A local LRU in
front absorbs duplicates within a process and keeps working while Redis is down.

During a Redis outage the check is local only, and fast: the client's circuit breaker
(:class:`~tailstream.redis_io.RedisHealth`, shared with the publisher and the
buffer) skips Redis until its next retry, and each round trip has a deadline, so a hung
Redis costs one deadline per backoff, not a timeout per batch. Ids seen during the outage
are remembered (bounded) and marked in Redis when it is back, so a duplicate that reaches
another worker after a rebalance is still caught.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict, deque

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from tailstream.redis_io import Keys, RedisHealth

log = logging.getLogger(__name__)

FIRST_SEEN_LUA = """
-- KEYS: one seen-key per id (the batch's new ids, then ids to mark after an outage)
-- ARGV[1] ttl, ARGV[2] how many KEYS are asked (the rest are only marked), ARGV[3] '1':
-- answer with the stored source, ARGV[4..]: the source of each key
-- Reply per asked key: 1 = first time (set now), else the stored source (0: expired since)
local asked = tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local set = redis.call('SET', key, ARGV[i + 3], 'NX', 'EX', ARGV[1])
  if i <= asked then
    if set then
      out[i] = 1
    elseif ARGV[3] == '1' then
      out[i] = redis.call('GET', key) or 0
    else
      out[i] = 0
    end
  end
end
return out
"""


class LocalSeen:
    """A bounded map of recently seen ids to the message that carried them (least recently
    seen evicted first).

    ``add(id)`` is true the first time. With a ``source`` (the carrying message,
    ``topic/partition/offset``), it is also true when the id comes again *from the same
    message*: a redelivery after a crash, whose effects may not be in the state yet.

    >>> s = LocalSeen(capacity=2)
    >>> [s.add(x) for x in ["a", "b", "a", "c", "b"]]
    [True, True, False, True, True]
    >>> s.add("d", "t/0/7"), s.add("d", "t/0/7"), s.add("d", "t/1/3")
    (True, True, False)
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, str | None] = OrderedDict()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def remember(self, event_id: str, source: str | None) -> None:
        """Record which message an id belongs to (what Redis says, when it knew first)."""
        if event_id in self._ids:
            self._ids[event_id] = source

    def add(self, event_id: str, source: str | None = None) -> bool:
        """True if the id was not in the set (it is now), or came from the same source."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return source is not None and self._ids[event_id] == source
        self._ids[event_id] = source
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


class Deduper:
    """``first_seen(ids, sources)``: the local window, then Redis (shared across workers).

    Redis stores, per id, the message that first carried it (``SET key source NX EX``),
    so an id is a duplicate when it comes again from *another* message, and not when the
    same message is redelivered (at-least-once after a crash: its effects may be missing).
    An id repeated within one call is always a duplicate (the same event twice in one
    envelope).

    ``timeout_s`` (+ ``per_id_s`` per id) bounds one Redis round trip; ``backfill_max``
    bounds the ids kept for marking in Redis after an outage (oldest forgotten first).
    """

    def __init__(self, redis: aioredis.Redis | None, *, prefix: str = "tailstream",
                 ttl_s: int = 86_400, local_capacity: int = 200_000, timeout_s: float = 1.0,
                 per_id_s: float = 2e-5, backfill_max: int = 50_000,
                 backfill_per_batch: int = 2000, health: RedisHealth | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.local = LocalSeen(local_capacity)
        self.timeout_s = timeout_s
        self.per_id_s = per_id_s
        self.health = health if health is not None or redis is None else RedisHealth.of(redis)
        self._backfill: deque[tuple[str, str]] = deque(maxlen=backfill_max)
        self.backfill_per_batch = backfill_per_batch
        #: Every id seen is in this process's state (no crash since): a redelivery of the
        #: same message is a duplicate too. Set after a broker reset, until the next
        #: assignment that recovers state from changelogs.
        self.trust_seen = False
        self._script: AsyncScript | None = None

    @property
    def backfill_pending(self) -> int:
        """Ids seen while Redis was unavailable, not marked there yet."""
        return len(self._backfill)

    def _local_only(self, fresh: list[tuple[int, str, str]]) -> None:
        self._backfill.extend((e, src) for _, e, src in fresh)
        metrics = self.health.metrics if self.health is not None else None
        if metrics is not None:
            metrics.dedupe_local_only.inc(len(fresh))

    async def first_seen(self, event_ids: list[str],
                         sources: list[str] | None = None) -> list[bool]:
        """For each id, whether to apply it: its first occurrence, or a redelivery of the
        message (``sources[i]``) that first carried it. Marks them all seen."""
        if sources is not None and len(sources) != len(event_ids):
            raise ValueError("one source per event id")
        if self.trust_seen:
            sources = None
        out: list[bool] = []
        fresh: list[tuple[int, str, str]] = []  # (position, id, source): ask Redis
        in_call: set[str] = set()
        for n, event_id in enumerate(event_ids):
            source = sources[n] if sources is not None else None
            if event_id in in_call:  # the same event twice in one batch or envelope
                self.local.add(event_id, None)
                out.append(False)
                continue
            in_call.add(event_id)
            known = event_id in self.local
            new = self.local.add(event_id, source)
            out.append(new)
            if new and not known:
                fresh.append((n, event_id, source or "1"))
        if self.redis is None or self.health is None or not fresh:
            return out
        if not self.health.allow():  # circuit open: no I/O until the next retry
            self._local_only(fresh)
            return out
        backfill = list(itertools.islice(self._backfill, self.backfill_per_batch))
        check_source = sources is not None
        try:
            deadline = self.timeout_s + self.per_id_s * (len(fresh) + len(backfill))
            replies = await asyncio.wait_for(
                self._ask(fresh, backfill, check_source), deadline)
        except (TimeoutError, RedisError, OSError) as exc:
            self.health.failed("dedupe", exc)
            self._local_only(fresh)
            return out
        self.health.succeeded()
        if backfill:
            for _ in range(len(backfill)):
                self._backfill.popleft()
            if not self._backfill:
                log.info("de-duplication uses redis again; event ids seen during the outage "
                         "are marked there")
        for reply, (n, event_id, source) in zip(replies, fresh, strict=True):
            if reply == 1:
                continue  # first time anywhere
            stored = _text(reply) if check_source and reply != 0 else None
            out[n] = stored is not None and stored == source
            if not out[n]:  # another message carried it first: a redelivery of *this*
                self.local.remember(event_id, stored)  # message is a duplicate too
        return out

    async def _ask(self, fresh: list[tuple[int, str, str]], backfill: list[tuple[str, str]],
                   check_source: bool) -> list[object]:
        """One script call: set the new ids, mark the backfill, answer for the new ids."""
        assert self.redis is not None
        if self._script is None:
            self._script = self.redis.register_script(FIRST_SEEN_LUA)
        key = Keys(self.prefix).seen("")
        keys = [key + e for _, e, _ in fresh] + [key + e for e, _ in backfill]
        args: list[str | int] = [self.ttl_s, len(fresh), "1" if check_source else "0"]
        args += [src for _, _, src in fresh]
        args += [src for _, src in backfill]
        replies = await self._script(keys=keys, args=args)
        return list(replies)


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
