"""Text vectors shared through Redis, so the trainer reuses what workers encoded.

One hash per encoder fingerprint, ``{prefix}:textvec:{fingerprint}``: field = the first
16 bytes of the text's SHA-256 (hex), value = the pooled vector as float16 bytes (768 B
for MiniLM's 384 dimensions). The hash expires ``ttl_s`` after its last write. It is a
cache: a Redis error is logged and treated as a miss, never raised.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import redis
import torch

log = logging.getLogger(__name__)


def text_field(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class RedisVectorStore:
    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int = 7 * 86_400) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def key(self, fingerprint: str) -> str:
        return f"{self.prefix}:textvec:{fingerprint}"

    def get_many(self, fingerprint: str, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not texts:
            return {}
        try:
            raw = self.client.hmget(self.key(fingerprint), [text_field(t) for t in texts])
        except (redis.RedisError, OSError) as exc:
            log.warning("text vector cache unavailable: %s", exc)
            return {}
        out: dict[str, torch.Tensor] = {}
        for text, blob in zip(texts, raw, strict=True):
            if isinstance(blob, bytes) and blob:
                out[text] = torch.from_numpy(np.frombuffer(blob, dtype=np.float16).copy())
        return out

    def put_many(self, fingerprint: str, vectors: dict[str, torch.Tensor]) -> None:
        if not vectors:
            return
        key = self.key(fingerprint)
        mapping: dict[bytes | bytearray | memoryview | str | int | float,
                      bytes | bytearray | memoryview | str | int | float] = {
            text_field(t): v.detach().to(torch.float16).cpu().numpy().tobytes()
            for t, v in vectors.items()}
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, self.ttl_s)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("text vector cache unavailable: %s", exc)
