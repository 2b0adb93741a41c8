"""The minority buffer's home in Redis: it survives worker restarts and the trainer reads it.

Layout (``{p}`` = ``TAILSTREAM_REDIS_PREFIX``):

* ``{p}:buffer:minority:{class}``: list of samples (JSON), newest last, trimmed to capacity;
* ``{p}:buffer:tail``: list of tail-item interactions of majority classes, trimmed;
* ``{p}:buffer:reservoir:{class}``: hash slot → sample (Algorithm R overwrites slots);
* ``{p}:buffer:meta``: hash with ``seen:{class}`` (reservoir counters) and
  ``new_since_last_take``;
* ``{p}:weights``: the loss weights in force (policy, weights, counts used, updated_at).

Every batch's changes go in one pipelined round trip, so the lists are bounded by LTRIM
and never grow past the buffer's own capacity.
"""

from __future__ import annotations

import json
import random
from typing import Any

import redis.asyncio as aioredis

from tailstream.models.buffer import STATE_VERSION, MinorityBuffer, Sample


def _keys(prefix: str) -> dict[str, str]:
    return {"minority": f"{prefix}:buffer:minority:", "tail": f"{prefix}:buffer:tail",
            "reservoir": f"{prefix}:buffer:reservoir:", "meta": f"{prefix}:buffer:meta"}


class RedisBufferStore:
    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = _keys(prefix)

    async def apply(self, changes: list[tuple[str, int | None, Sample]],
                    buffer: MinorityBuffer) -> None:
        if not changes:
            return
        k = self.keys
        trims: dict[str, int] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for route, slot, sample in changes:
                blob = json.dumps(sample.to_dict(), separators=(",", ":"))
                if route == "minority":
                    key = k["minority"] + sample.label
                    pipe.rpush(key, blob)
                    trims[key] = buffer.capacity_per_class
                elif route == "tail":
                    pipe.rpush(k["tail"], blob)
                    trims[k["tail"]] = buffer.tail_capacity
                else:
                    pipe.hset(k["reservoir"] + sample.label, str(slot), blob)
            for key, cap in trims.items():
                pipe.ltrim(key, -cap, -1)
            for label in {s.label for _, _, s in changes}:
                pipe.hset(k["meta"], f"seen:{label}", buffer.seen(label))
            pipe.hset(k["meta"], "new_since_last_take", buffer.new_since_last_take)
            await pipe.execute()

    async def write_weights(self, policy: dict[str, Any], weights: dict[str, float],
                            counts: dict[str, float], at: float) -> None:
        """The weights in force, for the trainer: hash ``{prefix}:weights``."""
        await self.redis.hset(f"{self.prefix}:weights", mapping={
            "policy": json.dumps(policy), "weights": json.dumps(weights),
            "counts": json.dumps(counts), "updated_at": repr(at)})

    async def mark_consumed(self) -> None:
        await self.redis.hset(self.keys["meta"], "new_since_last_take", 0)

    async def load(self, capacity_per_class: int, minority_share: float, tail_capacity: int,
                   seed: int = 0) -> MinorityBuffer:
        """Rebuild the buffer from Redis (empty if nothing is stored)."""
        k = self.keys
        minority: dict[str, list[dict[str, Any]]] = {}
        reservoir: dict[str, list[dict[str, Any]]] = {}
        async for raw in self.redis.scan_iter(match=k["minority"] + "*"):
            key = raw.decode() if isinstance(raw, bytes) else raw
            rows = await self.redis.lrange(key, -capacity_per_class, -1)
            minority[key[len(k["minority"]):]] = [json.loads(r) for r in rows]
        async for raw in self.redis.scan_iter(match=k["reservoir"] + "*"):
            key = raw.decode() if isinstance(raw, bytes) else raw
            slots = await self.redis.hgetall(key)
            ordered = sorted(((int(s), json.loads(v)) for s, v in slots.items()))
            reservoir[key[len(k["reservoir"]):]] = [v for s, v in ordered
                                                    if s < capacity_per_class]
        tail = [json.loads(r) for r in await self.redis.lrange(k["tail"], -tail_capacity, -1)]
        meta = {(a.decode() if isinstance(a, bytes) else a): int(b)
                for a, b in (await self.redis.hgetall(k["meta"])).items()}
        version, internal, gauss = random.Random(seed).getstate()
        return MinorityBuffer.from_state({
            "version": STATE_VERSION,
            "params": {"capacity_per_class": capacity_per_class, "minority_share": minority_share,
                       "tail_capacity": tail_capacity, "seed": seed},
            "rng": [version, list(internal), gauss],
            "minority": minority, "tail": tail, "reservoir": reservoir,
            "seen": {key[5:]: n for key, n in meta.items() if key.startswith("seen:")},
            "new_since_last_take": meta.get("new_since_last_take", 0),
        })
