"""De-duplication by event_id, bounded in time and memory.

Redis holds the shared memory of seen ids (``SET key 1 NX EX ttl``, one pipelined round
trip per batch), so duplicates are caught across workers and restarts. A local LRU in
front absorbs duplicates within a process and keeps working while Redis is down.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class LocalSeen:
    """A bounded set of recently seen ids (least recently seen evicted first).

    >>> s = LocalSeen(capacity=2)
    >>> [s.add(x) for x in ["a", "b", "a", "c", "b"]]
    [True, True, False, True, True]
    """

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> bool:
        """True if the id was not in the set (it is now)."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True


class Deduper:
    def __init__(self, redis: aioredis.Redis | None, *, prefix: str = "tailstream",
                 ttl_s: int = 86_400, local_capacity: int = 200_000) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.local = LocalSeen(local_capacity)

    async def first_seen(self, event_ids: list[str]) -> list[bool]:
        """For each id, whether this is its first occurrence (marks them all seen)."""
        local = [self.local.add(e) for e in event_ids]
        if self.redis is None:
            return local
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for event_id, new in zip(event_ids, local, strict=True):
                    if new:
                        pipe.set(f"{self.prefix}:seen:{event_id}", 1, nx=True, ex=self.ttl_s)
                results = iter(await pipe.execute())
        except (RedisError, OSError) as exc:
            log.warning("dedupe falls back to the local window: redis unavailable (%s)", exc)
            return local
        return [bool(next(results)) if new else False for new in local]
