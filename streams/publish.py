"""Publishing recommendation lists to Redis (atomically) and to the recommendations topic.

Redis layout (see docs/events.md):

* ``{prefix}:recs:{user_id}``: sorted set item_id → score.
* ``{prefix}:recs:{user_id}:meta``: hash with model_version, generated_at, trigger, items (JSON).

A batch of lists is written in one MULTI/EXEC transaction: each user's key is deleted
and rewritten inside it, so a reader never sees a half-written list. Failed writes are
retried with backoff; lists that still fail are kept (latest per user, bounded) and
retried with the next batch, so a Redis outage costs freshness, not ingest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tailstream.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RecList:
    """One user's list, ready to publish."""

    user_id: str
    items: list[dict[str, Any]]
    model_version: str
    trigger: str
    generated_at: float
    event_id: str | None
    source_ts: float | None  # Kafka timestamp of the triggering event (latency origin)

    def to_message(self, published_at: float) -> dict[str, Any]:
        return {"user_id": self.user_id, "items": self.items, "model_version": self.model_version,
                "generated_at": self.generated_at, "trigger": self.trigger,
                "event_id": self.event_id, "event_ts": self.source_ts,
                "published_at": published_at}


def recs_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:recs:{user_id}"


def meta_key(prefix: str, user_id: str) -> str:
    return f"{prefix}:recs:{user_id}:meta"


def parse_meta(user_id: str, meta: Mapping[Any, Any]) -> dict[str, Any] | None:
    """A user's list as JSON-ready dict, from the raw meta hash (None when absent)."""
    if not meta:
        return None
    text = {(k.decode() if isinstance(k, bytes) else str(k)):
            (v.decode() if isinstance(v, bytes) else str(v)) for k, v in meta.items()}
    return {"user_id": user_id, "model_version": text.get("model_version", ""),
            "generated_at": float(text.get("generated_at", "0")),
            "trigger": text.get("trigger", ""), "items": json.loads(text.get("items", "[]"))}


SendToKafka = Callable[[str, bytes], Awaitable[None]]


class Publisher:
    """Writes lists to Redis then to Kafka; never raises into the caller's stream."""

    def __init__(self, redis: aioredis.Redis, send_to_kafka: SendToKafka, metrics: Metrics, *,
                 prefix: str = "tailstream", ttl_s: int = 86_400, retries: int = 3,
                 backoff_s: float = 0.05, max_pending: int = 50_000) -> None:
        self.redis = redis
        self.send_to_kafka = send_to_kafka
        self.metrics = metrics
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_pending = max_pending
        self._pending: OrderedDict[str, RecList] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def publish(self, lists: list[RecList]) -> int:
        """Publish lists (plus any left over from a failed batch); returns lists written."""
        for rec in lists:
            self._pending.pop(rec.user_id, None)
            self._pending[rec.user_id] = rec
        while len(self._pending) > self.max_pending:  # bounded memory: drop the oldest
            self._pending.popitem(last=False)
        if not self._pending:
            return 0
        batch = list(self._pending.values())
        if not await self._write_redis(batch):
            return 0
        self._pending.clear()
        published_at = time.time()
        for rec in batch:
            if rec.source_ts is not None:
                self.metrics.rec_latency.labels(rec.trigger).observe(
                    max(0.0, published_at - rec.source_ts))
            self.metrics.recs_published.labels("redis", rec.trigger).inc()
            for item in rec.items:
                self.metrics.tail_items_published.labels(item.get("tier", "tail")).inc()
        for rec in batch:
            payload = json.dumps(rec.to_message(published_at), separators=(",", ":")).encode()
            try:
                await self.send_to_kafka(rec.user_id, payload)
                self.metrics.recs_published.labels("kafka", rec.trigger).inc()
            except Exception:  # a lost notification; Redis already holds the list
                self.metrics.publish_errors.labels("kafka").inc()
                log.exception("publishing a list to Kafka failed")
        return len(batch)

    async def _write_redis(self, batch: list[RecList]) -> bool:
        delay = self.backoff_s
        for attempt in range(self.retries):
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for rec in batch:
                        key, meta = recs_key(self.prefix, rec.user_id), meta_key(
                            self.prefix, rec.user_id)
                        pipe.delete(key)
                        if rec.items:
                            pipe.zadd(key, {it["item_id"]: float(it["score"]) for it in rec.items})
                        pipe.hset(meta, mapping={
                            "model_version": rec.model_version,
                            "generated_at": repr(rec.generated_at),
                            "trigger": rec.trigger,
                            "items": json.dumps(rec.items, separators=(",", ":")),
                        })
                        pipe.expire(key, self.ttl_s)
                        pipe.expire(meta, self.ttl_s)
                    await pipe.execute()
                return True
            except (RedisError, OSError) as exc:
                self.metrics.publish_errors.labels("redis").inc()
                if attempt + 1 < self.retries:
                    await asyncio.sleep(delay)
                    delay *= 4
                else:
                    log.warning("redis write failed %d times (%s); %d lists kept for retry",
                                self.retries, exc, len(self._pending))
        return False
