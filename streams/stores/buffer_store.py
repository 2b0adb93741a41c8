"""The minority buffer's home in Redis: it survives worker restarts and the trainer reads it.

Layout (``{p}`` = ``TAILSTREAM_REDIS_PREFIX``):

* ``{p}:buffer:minority:{class}``: list of samples (JSON), newest last, trimmed to capacity;
* ``{p}:buffer:tail``: list of tail-item interactions of majority classes, trimmed;
* ``{p}:buffer:reservoir:{class}``: hash slot → sample (Algorithm R overwrites slots);
* ``{p}:buffer:meta``: hash with ``seen:{class}`` (reservoir counters) and
  ``new_since_last_take``;
* ``{p}:weights``: the policy and loss weights in force (:class:`LiveWeights`).

Every batch's changes go in one pipelined round trip, so the lists are bounded by LTRIM
and never grow past the buffer's own capacity.

Writes never raise and never wait on an unavailable Redis: changes are queued (bounded:
at most the buffer's capacity per list and reservoir, the latest meta values and weights),
the client's circuit breaker (:class:`~tailstream.redis_io.RedisHealth`, shared
with the publisher and de-dup) decides when to try again, and a background retry flushes
the queue with backoff even when no new batch arrives. Each flush applies the queued
changes in order (RPUSH then LTRIM, HSET of the latest values), so the result in Redis is
what the writes would have made one by one. If Redis comes back *empty* (restarted without
persistence), the whole buffer is written again from the worker's memory, so the trainer
does not see only the changes made since.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tailstream.configs import Policy
from tailstream.models.imbalance.buffer import STATE_VERSION, MinorityBuffer, Sample
from tailstream.redis_io import Keys, RedisConfigError, RedisHealth, is_credentials_error

log = logging.getLogger(__name__)
_encode = msgspec.json.encode  # compact JSON, a fifth of json.dumps's cost


_Value = bytes | bytearray | memoryview | str | int | float


def _mapping(values: dict[str, str] | dict[str, int]) -> dict[_Value, _Value]:
    return {k: v for k, v in values.items()}


@dataclass(frozen=True)
class LiveWeights:
    """What the imbalance loop publishes for the trainer, and the trainer reads: the
    policy the worker decided (all its parameters), the weights it computed with it and
    the decayed class counts they came from. One hash, ``{prefix}:weights``.

    >>> w = LiveWeights(Policy("focal", gamma=1.5), {"click": 0.5}, {"click": 9.0}, 1.0)
    >>> LiveWeights.from_hash({k.encode(): v.encode() for k, v in w.to_hash().items()}) == w
    True
    """

    policy: Policy
    weights: dict[str, float]
    counts: dict[str, float]
    updated_at: float

    def to_hash(self) -> dict[str, str]:
        return {"policy": json.dumps(self.policy.to_dict()), "weights": json.dumps(self.weights),
                "counts": json.dumps(self.counts), "updated_at": repr(self.updated_at)}

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> LiveWeights | None:
        """The hash as read from Redis (bytes or str); None when nothing is published."""
        if not raw:
            return None
        text = {_text(k): _text(v) for k, v in raw.items()}
        return cls(Policy.from_dict(json.loads(text["policy"])), json.loads(text["weights"]),
                   json.loads(text["counts"]), float(text.get("updated_at", "0")))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _keys(prefix: str) -> dict[str, str]:
    """The buffer's keys; ``minority`` and ``reservoir`` are prefixes (one key per class)."""
    k = Keys(prefix)
    return {"minority": k.minority(""), "tail": k.tail, "reservoir": k.reservoir(""),
            "meta": k.buffer_meta, "weights": k.weights}


class RedisBufferStore:
    def __init__(self, redis: aioredis.Redis, prefix: str, *,
                 health: RedisHealth | None = None, timeout_s: float = 5.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = _keys(prefix)
        self.health = health if health is not None else RedisHealth.of(redis)
        self.timeout_s = timeout_s
        # Writes waiting for Redis (all bounded, see the module docstring).
        self._lists: dict[str, deque[str]] = {}
        self._slots: dict[str, dict[str, str]] = {}
        self._meta: dict[str, int] = {}
        self._weights: dict[str, str] | None = None
        self._lock = asyncio.Lock()
        self._retry: asyncio.Task[None] | None = None
        self._buffer: MinorityBuffer | None = None  # the live buffer, for a full rewrite
        self._needs_rewrite = False
        self._meta_written = False  # a flush wrote the meta hash: Redis holds a buffer
        self._missed = False  # writes waited for Redis since the last successful flush

    @property
    def pending(self) -> int:
        """Writes waiting for Redis (list entries, reservoir slots, meta fields, weights)."""
        return (sum(len(q) for q in self._lists.values())
                + sum(len(d) for d in self._slots.values()) + len(self._meta)
                + (self._weights is not None) + self._needs_rewrite)

    def _queue_list(self, key: str, blob: str, capacity: int) -> None:
        q = self._lists.get(key)
        if q is None or q.maxlen != capacity:
            q = self._lists[key] = deque(q or (), maxlen=max(capacity, 1))
        q.append(blob)  # past capacity the oldest goes: LTRIM would drop it anyway

    async def apply(self, changes: list[tuple[str, int | None, Sample]],
                    buffer: MinorityBuffer) -> None:
        """Queue one batch's buffer changes and write what is queued (never raises for
        Redis: a failed write stays queued and is retried)."""
        self._buffer = buffer
        if not changes and not self.pending:
            return
        k = self.keys
        for route, slot, sample in changes:
            blob = _encode(sample.to_dict()).decode()
            if route == "minority":
                self._queue_list(k["minority"] + sample.label, blob, buffer.capacity_per_class)
            elif route == "tail":
                self._queue_list(k["tail"], blob, buffer.tail_capacity)
            else:
                self._slots.setdefault(k["reservoir"] + sample.label, {})[str(slot)] = blob
        for label in {s.label for _, _, s in changes}:
            self._meta[f"seen:{label}"] = buffer.seen(label)
        if changes:
            self._meta["new_since_last_take"] = buffer.new_since_last_take
        await self.flush()

    async def write_weights(self, live: LiveWeights) -> None:
        """The policy and weights in force, for the trainer: hash ``{prefix}:weights``
        (queued and retried like the buffer while Redis is unavailable; the latest win)."""
        self._weights = live.to_hash()
        await self.flush()

    async def mark_consumed(self) -> None:
        self._meta["new_since_last_take"] = 0
        await self.flush()

    async def flush(self) -> bool:
        """Write every queued change in one round trip; True when nothing is left queued."""
        if not self.pending:
            return True
        if not self.health.allow():
            self._missed = True
            self._schedule_retry()
            self._report()
            return False
        async with self._lock:
            if not self.pending:  # another flush wrote it meanwhile
                return True
            lists, slots, meta, weights = self._lists, self._slots, self._meta, self._weights
            self._lists, self._slots, self._meta, self._weights = {}, {}, {}, None
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.exists(self.keys["meta"])  # does Redis still hold the buffer?
                    for key, blobs in lists.items():
                        if blobs:
                            pipe.rpush(key, *blobs)
                            pipe.ltrim(key, -(blobs.maxlen or len(blobs)), -1)
                    for key, by_slot in slots.items():
                        if by_slot:
                            pipe.hset(key, mapping=_mapping(by_slot))
                    if meta:
                        pipe.hset(self.keys["meta"], mapping=_mapping(meta))
                    if weights is not None:
                        pipe.hset(self.keys["weights"], mapping=_mapping(weights))
                    replies = await asyncio.wait_for(pipe.execute(), self.timeout_s)
            except (TimeoutError, RedisError, OSError) as exc:
                self._requeue(lists, slots, meta, weights)
                self._missed = True
                self.health.failed("buffer", exc)
                self._schedule_retry()
                self._report()
                return False
            if not replies[0] and self._meta_written and self._buffer is not None and \
                    len(self._buffer):
                self._needs_rewrite = True  # Redis lost it (restarted empty, flushed, …)
            self._meta_written = self._meta_written or bool(meta)
            if self._needs_rewrite and self._buffer is not None:
                try:
                    await self._rewrite(self._buffer)
                except (TimeoutError, RedisError, OSError) as exc:
                    self._missed = True
                    self.health.failed("buffer", exc)
                    self._schedule_retry()
                    self._report()
                    return False
            self._needs_rewrite = False
        self.health.succeeded()
        if self._missed:
            self._missed = False
            log.info("minority buffer and loss weights written to redis again")
        self._report()
        return not self.pending

    async def _rewrite(self, buffer: MinorityBuffer) -> None:
        """Write the whole buffer (Redis lost it): lists and reservoirs replaced, meta set."""
        state = buffer.to_state()
        # The snapshot holds every change queued so far: writing those again would
        # duplicate them (if this write fails, the next rewrite snapshots again).
        self._lists, self._slots, self._meta = {}, {}, {}
        k = self.keys

        def blobs(rows: list[dict[str, Any]]) -> list[str]:
            return [json.dumps(r, separators=(",", ":")) for r in rows]

        async with self.redis.pipeline(transaction=True) as pipe:
            for label, rows in state["minority"].items():
                pipe.delete(k["minority"] + label)
                if rows:
                    pipe.rpush(k["minority"] + label, *blobs(rows))
            pipe.delete(k["tail"])
            if state["tail"]:
                pipe.rpush(k["tail"], *blobs(state["tail"]))
            for label, rows in state["reservoir"].items():
                pipe.delete(k["reservoir"] + label)
                if rows:
                    pipe.hset(k["reservoir"] + label, mapping=_mapping(
                        {str(n): b for n, b in enumerate(blobs(rows))}))
            meta = {f"seen:{label}": n for label, n in state["seen"].items()}
            meta["new_since_last_take"] = state["new_since_last_take"]
            pipe.hset(k["meta"], mapping=_mapping(meta))
            await asyncio.wait_for(pipe.execute(), self.timeout_s)
        log.warning("redis came back without the minority buffer (restarted without "
                    "persistence?): wrote its %d samples again from this worker's memory",
                    len(buffer))

    def _requeue(self, lists: dict[str, deque[str]], slots: dict[str, dict[str, str]],
                 meta: dict[str, int], weights: dict[str, str] | None) -> None:
        """Put back what a failed flush took, in front of what was queued meanwhile."""
        for key, newer in self._lists.items():
            older = lists.get(key)
            if older is None:
                lists[key] = newer
            else:
                lists[key] = deque([*older, *newer], maxlen=newer.maxlen)
        self._lists = lists
        for key, newer_slots in self._slots.items():
            slots.setdefault(key, {}).update(newer_slots)
        self._slots = slots
        meta.update(self._meta)
        self._meta = meta
        self._weights = self._weights if self._weights is not None else weights

    def _report(self) -> None:
        metrics = self.health.metrics
        if metrics is not None:
            metrics.buffer_pending.set(self.pending)

    def _schedule_retry(self) -> None:
        if self._retry is not None and not self._retry.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next write retries
            return
        self._retry = loop.create_task(self._retry_until_flushed())

    async def _retry_until_flushed(self) -> None:
        """Flush queued writes with backoff until they are written (no batch needed)."""
        try:
            while self.pending:
                await asyncio.sleep(max(self.health.retry_in(), 0.05)
                                    + 0.05 * random.random())  # noqa: S311 - jitter
                await self.flush()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, not an outage: say so once; the next batch retries
            log.exception("retrying minority-buffer writes failed")

    async def load(self, capacity_per_class: int, minority_share: float, tail_capacity: int,
                   seed: int = 0) -> MinorityBuffer:
        """Rebuild the buffer from Redis (empty if nothing is stored).

        Raises :class:`~tailstream.redis_io.RedisConfigError` (a clear message
        naming the user, never the password) when Redis refuses the credentials, and the
        Redis error when it is unavailable."""
        try:
            await self.flush()  # queued writes first, so the rebuilt buffer includes them
            return await self._load(capacity_per_class, minority_share, tail_capacity, seed)
        except RedisError as exc:
            self.health.failed("buffer", exc)
            if is_credentials_error(exc):
                h = self.health
                raise RedisConfigError(
                    f"redis at {h.where} refused the credentials or permissions of user "
                    f"{h.user!r} ({h.describe(exc)}): check the user and password in "
                    "TAILSTREAM_REDIS_URL") from None
            raise

    async def _load(self, capacity_per_class: int, minority_share: float, tail_capacity: int,
                    seed: int) -> MinorityBuffer:
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
