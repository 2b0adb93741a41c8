"""Text vectors shared through Redis, so the trainer reuses what workers encoded.

One hash per encoder fingerprint, ``{prefix}:textvec:{fingerprint}``: field = the first
16 bytes of the text's SHA-256 (hex), value = the pooled vector as float16 bytes (768 B
for MiniLM's 384 dimensions). The hash expires ``ttl_s`` after its last write. It is a
cache: a Redis error is treated as a miss, never raised.

While Redis is unavailable the cache costs nothing: a circuit breaker of its own
(:class:`~tailstream.redis_io.RedisHealth`, backing off up to ``max_backoff_s``,
longer than the stream's writes since a cache can wait) skips Redis, so a hung server
costs one socket timeout per backoff, not one per call; the outage is logged once, and
again when it ends. Vectors computed meanwhile wait (at most ``max_pending``, oldest
dropped) and are written when Redis is back.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import redis
import torch

from tailstream.redis_io import Keys, RedisHealth

log = logging.getLogger(__name__)


def text_field(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RedisVectorStore:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int = 7 * 86_400, *,
                 max_pending: int = 8192, max_backoff_s: float = 30.0,
                 health: RedisHealth | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.health = health if health is not None else RedisHealth.for_client(
            client, name="redis (text-vector cache)", backoff_s=0.5, max_backoff_s=max_backoff_s)
        # (hash key, field) → float16 bytes, written when Redis is back (oldest dropped).
        self._pending: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def key(self, fingerprint: str) -> str:
        return Keys(self.prefix).text_vectors(fingerprint)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def get_many(self, fingerprint: str, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not texts or not self.health.allow():
            return {}
        try:
            raw = self.client.hmget(self.key(fingerprint), [text_field(t) for t in texts])
        except (redis.RedisError, OSError) as exc:
            self.health.failed("vectors", exc)
            return {}
        self._recovered()
        out: dict[str, torch.Tensor] = {}
        for text, blob in zip(texts, raw, strict=True):
            if isinstance(blob, bytes) and blob:
                out[text] = torch.from_numpy(np.frombuffer(blob, dtype=np.float16).copy())
        return out

    def put_many(self, fingerprint: str, vectors: dict[str, torch.Tensor]) -> None:
        if not vectors:
            return
        key = self.key(fingerprint)
        for t, v in vectors.items():
            entry = (key, text_field(t))
            self._pending.pop(entry, None)
            self._pending[entry] = v.detach().to(torch.float16).cpu().numpy().tobytes()
        while len(self._pending) > self.max_pending:  # bounded memory: a cache may forget
            self._pending.popitem(last=False)
        if self.health.allow():
            self._flush()

    def _recovered(self) -> None:
        was_down = self.health.is_down
        self.health.succeeded()
        if was_down and self._pending:
            self._flush()

    def _flush(self) -> None:
        """Write the waiting vectors (one HSET + EXPIRE per hash, one round trip)."""
        by_key: dict[str, dict[bytes | bytearray | memoryview | str | int | float,
                               bytes | bytearray | memoryview | str | int | float]] = {}
        for (key, field), blob in self._pending.items():
            by_key.setdefault(key, {})[field] = blob
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key, mapping in by_key.items():
                    pipe.hset(key, mapping=mapping)
                    pipe.expire(key, self.ttl_s)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.health.failed("vectors", exc)
            return
        self._pending.clear()
        self.health.succeeded()
