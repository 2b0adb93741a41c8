"""Where a fine-tune's inputs come from: the buffered samples, the live policy and weights
the workers published, and the trainer's replay memory.

* :class:`TrainingData` reads what the workers wrote to Redis (the minority buffer,
  :class:`~tailstream.streams.stores.buffer_store.LiveWeights`) and keeps the replay
  memory there — the production source.
* :class:`InMemorySource` holds the same things in lists — offline runs and unit tests.
  Given a policy instead of published weights, it computes them from its samples the way
  a worker would.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import redis
import redis.asyncio as aioredis

from tailstream.configs import Policy
from tailstream.contract import CLASSES
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.policies import class_weights
from tailstream.models.training.routine import remember
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import LiveWeights, RedisBufferStore


class TrainingSource(Protocol):
    """Where a run's samples, the workers' policy and weights, and replay memory come from."""

    def buffer(self) -> list[Sample]: ...

    def live_weights(self) -> LiveWeights | None: ...

    def replay(self) -> list[Sample]: ...

    def remember(self, samples: list[Sample], rng: random.Random) -> None: ...


@dataclass
class InMemorySource:
    """A :class:`TrainingSource` over lists (offline runs, unit tests).

    ``weights``: what the workers published; or ``policy``: compute the weights from the
    samples' class counts as a worker would (neither: nothing is published).
    """

    samples: list[Sample]
    weights: LiveWeights | None = None
    policy: Policy | None = None
    memory: list[Sample] = field(default_factory=list)
    capacity: int = 20_000

    def buffer(self) -> list[Sample]:
        return list(self.samples)

    def live_weights(self) -> LiveWeights | None:
        if self.weights is not None or self.policy is None:
            return self.weights
        n = Counter(s.label for s in self.samples)
        counts = {c: float(n.get(c, 0)) for c in CLASSES}
        return LiveWeights(self.policy, class_weights(self.policy, counts), counts, 0.0)

    def replay(self) -> list[Sample]:
        return list(self.memory)

    def remember(self, samples: list[Sample], rng: random.Random) -> None:
        self.memory = remember(self.memory, samples, self.capacity, rng)


class TrainingData:
    """Reads what the workers wrote to Redis, and keeps the trainer's replay memory there."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.redis = redis.Redis.from_url(settings.redis_url.reveal(), socket_timeout=10)

    def close(self) -> None:
        self.redis.close()

    def buffer(self) -> list[Sample]:
        """Every sample of the minority buffer (minority FIFOs, tail, reservoirs)."""
        s = self.settings

        async def read() -> list[Sample]:
            client = aioredis.Redis.from_url(s.redis_url.reveal())
            try:
                buf = await RedisBufferStore(client, s.redis_prefix).load(
                    s.buffer_capacity, s.minority_share, s.tail_capacity)
            finally:
                await client.aclose()
            return buf.all()

        return asyncio.run(read())

    def live_weights(self) -> LiveWeights | None:
        """The policy, weights and counts last published by the imbalance loop, if any."""
        return LiveWeights.from_hash(self.redis.hgetall(self.keys.weights))

    def replay(self) -> list[Sample]:
        rows = self.redis.lrange(self.keys.trainer_replay, 0, -1)
        return [Sample.from_dict(json.loads(r)) for r in rows]

    def remember(self, samples: list[Sample], rng: random.Random) -> None:
        """Keep what :func:`~tailstream.models.training.routine.remember` chooses of what a
        promoted model learned (appended in Redis, trimmed to the capacity)."""
        cap = self.settings.finetune_replay_capacity
        chosen = remember([], samples, cap, rng)
        if not chosen:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(self.keys.trainer_replay,
                       *[json.dumps(s.to_dict(), separators=(",", ":")) for s in chosen])
            pipe.ltrim(self.keys.trainer_replay, -cap, -1)
            pipe.execute()
