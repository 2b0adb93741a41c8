"""Publishing recommendation lists to Redis (atomically) and to the recommendations topic.

Redis layout (see docs/events.md):

* ``{prefix}:recs:{user_id}``: sorted set item_id → score.
* ``{prefix}:recs:{user_id}:meta``: hash with model_version, generated_at, trigger,
  event_id (empty when the list was not caused by an event), items (JSON).

Each list is replaced by one server-side script (:data:`REPLACE_LIST_LUA`): Redis runs a
script atomically, so a reader sees the old list or the new one, never a mix. The scripts
of a batch go in one pipelined round trip, one reply per user. Failed writes are
retried after a backoff (a circuit breaker: no I/O while it is open); lists that wait are
kept (latest per user, bounded), so a Redis outage costs freshness, not ingest.

:class:`RedisHealth` is that circuit breaker. One instance is shared by everything that
uses the same Redis client (lists, de-duplication, the minority buffer), so an outage is
detected once, logged once, skipped by all of them until the next retry, and logged once
more when Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

from tailstream.metrics import Metrics

log = logging.getLogger(__name__)

CREDENTIALS_HINT = "check the user and password in TAILSTREAM_REDIS_URL"


class RedisConfigError(RuntimeError):
    """Redis refused tailstream's credentials or permissions: a configuration error that
    retrying will not fix. The message never contains the password."""


def is_credentials_error(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis refused the credentials or an ACL permission."""
    if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError |
                  AuthenticationWrongNumberOfArgsError | RedisConfigError):
        return True
    if isinstance(exc, ResponseError):
        head = str(exc).split(" ", 1)[0].upper()
        return head in {"NOAUTH", "WRONGPASS", "NOPERM"}
    return False


def client_identity(client: Any) -> tuple[str, str, list[str]]:
    """(``host:port``, user, secrets to mask) of a redis-py client, sync or asyncio."""
    try:
        kw = client.connection_pool.connection_kwargs
    except AttributeError:
        return "redis", "default", []
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    secrets = [str(kw["password"])] if kw.get("password") else []
    return str(where), str(kw.get("username") or "default"), secrets


def masked(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``.

    >>> masked("AUTH alice hunter2 failed", ["hunter2"])
    'AUTH alice *** failed'
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class RedisHealth:
    """A circuit breaker for one Redis client, shared by its users.

    After a failed operation the circuit *opens*: :meth:`allow` is false (callers skip
    Redis and fall back: the local de-dup window, queued lists and buffer writes) until a
    retry time that backs off exponentially from ``backoff_s`` to ``max_backoff_s`` (with
    10 % jitter). The first call after that time tries Redis again; its success closes
    the circuit. Logged once when an outage starts (an ERROR naming the user when Redis
    refused the credentials) and once when it ends, never per batch. Thread-safe (the
    text-vector cache uses it from the scoring thread).

    >>> h = RedisHealth(backoff_s=10.0)
    >>> h.allow(), h.is_down
    (True, False)
    >>> h.failed("test", OSError("connection refused"))
    >>> h.allow(), h.is_down, h.failures
    (False, True, 1)
    >>> h.succeeded(); h.allow(), h.is_down
    (True, False)
    """

    _shared: weakref.WeakKeyDictionary[Any, RedisHealth] = weakref.WeakKeyDictionary()
    _shared_lock = threading.Lock()

    def __init__(self, *, name: str = "redis", where: str = "redis", user: str = "default",
                 secrets: Iterable[str] = (), backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0, metrics: Metrics | None = None) -> None:
        self.name = name
        self.where = where
        self.user = user
        self.secrets = [s for s in secrets if s]
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.metrics = metrics
        self.failures = 0
        self.skipped = 0
        self.down_since: float | None = None
        self.last_outage_s: float | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self.warn_every_s = 60.0
        self._last_warned = -float("inf")
        self._unwarned = 0

    @classmethod
    def of(cls, client: Any, **options: Any) -> RedisHealth:
        """The breaker shared by every user of ``client`` (made on first use)."""
        with cls._shared_lock:
            health = cls._shared.get(client)
            if health is None:
                where, user, secrets = client_identity(client)
                health = cls(where=where, user=user, secrets=secrets, **options)
                cls._shared[client] = health
            return health

    @classmethod
    def for_client(cls, client: Any, **options: Any) -> RedisHealth:
        """A breaker of its own for ``client`` (not shared), e.g. for a cache that should
        back off longer than the stream's writes."""
        where, user, secrets = client_identity(client)
        return cls(where=where, user=user, secrets=secrets, **options)

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def allow(self) -> bool:
        """Whether to try Redis now (closed circuit, or the retry time has come)."""
        if self.down_since is None or time.monotonic() >= self._retry_at:
            return True
        self.skipped += 1
        return False

    def retry_in(self) -> float:
        """Seconds until the next try is allowed (0 when the circuit is closed)."""
        return max(0.0, self._retry_at - time.monotonic()) if self.is_down else 0.0

    def describe(self, exc: BaseException) -> str:
        """The error as text, without any secret of the client."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return masked(text[:300], self.secrets)

    def failed(self, component: str, exc: BaseException) -> None:
        """Record a failed operation of ``component``; opens the circuit (backoff)."""
        now = time.monotonic()
        with self._lock:
            self.failures += 1
            delay = min(self.backoff_s * 2 ** min(self.failures - 1, 30), self.max_backoff_s)
            delay *= 1.0 + 0.1 * random.random()  # noqa: S311 - jitter, not crypto
            self._retry_at = now + delay
            starting = self.down_since is None
            if starting:
                self.down_since = now
                self.skipped = 0
        m = self.metrics
        if m is not None:
            m.redis_errors.labels(component).inc()
            m.redis_up.set(0)
            m.redis_circuit_open.set(1)
            if starting:
                m.redis_outages.inc()
        if not starting:
            return
        # A flapping Redis starts many short outages: one warning a minute at most.
        refused = is_credentials_error(exc)
        if not refused and now - self._last_warned < self.warn_every_s:
            self._unwarned += 1
            log.debug("%s at %s unavailable again (%s)", self.name, self.where,
                      self.describe(exc))
            return
        self._last_warned = now
        also = (f"; {self._unwarned} more outages since the last warning"
                if self._unwarned else "")
        self._unwarned = 0
        if refused:
            log.error("%s at %s refused the credentials or permissions of user %r (%s): %s; "
                      "until it accepts them, tailstream works without it (local "
                      "de-duplication, lists and buffer writes held back)%s",
                      self.name, self.where, self.user, self.describe(exc), CREDENTIALS_HINT,
                      also)
        else:
            log.warning("%s at %s unavailable (%s, in %s); working without it: de-duplication "
                        "falls back to the local window, lists and buffer writes wait "
                        "(bounded) and are retried with backoff up to %.1fs. Logged once "
                        "per outage%s.", self.name, self.where, self.describe(exc), component,
                        self.max_backoff_s, also)

    def succeeded(self) -> None:
        """Record a successful operation; closes the circuit (logs the end of an outage)."""
        m = self.metrics
        if self.down_since is None and self.failures == 0:
            if m is not None:
                m.redis_up.set(1)
            return
        with self._lock:
            down_since, failures, skipped = self.down_since, self.failures, self.skipped
            self.down_since = None
            self.failures = 0
            self._retry_at = 0.0
        if m is not None:
            m.redis_up.set(1)
            m.redis_circuit_open.set(0)
        if down_since is not None:
            self.last_outage_s = time.monotonic() - down_since
            if m is not None:
                m.redis_last_outage.set(self.last_outage_s)
            log.log(logging.DEBUG if self._unwarned else logging.INFO,
                    "%s at %s available again after %.1fs (%d failed attempts, %d "
                    "operations skipped meanwhile)", self.name, self.where,
                    self.last_outage_s, failures, skipped)


def check_redis(url: str, *, prefix: str = "tailstream", timeout_s: float = 5.0) -> str:
    """Connect, authenticate and write one scratch key, once, at start.

    Raises :class:`RedisConfigError` with a clear message (user and address, never the
    password) when Redis refuses the credentials or an ACL permission tailstream needs;
    returns ``"ok"``, or ``"unreachable: …"`` when Redis cannot be reached now (not fatal:
    the worker works through Redis outages).
    """
    import redis as sync_redis

    client = sync_redis.Redis.from_url(url, socket_timeout=timeout_s,
                                       socket_connect_timeout=timeout_s)
    where, user, secrets = client_identity(client)
    key = f"{prefix}:preflight:{random.getrandbits(32):08x}"  # noqa: S311 - a scratch key name
    try:
        client.ping()
        client.set(key, 1, nx=True, ex=10)
        client.eval("return redis.call('DEL', KEYS[1])", 1, key)
    except RedisError as exc:
        detail = masked(f"{type(exc).__name__}: {exc}"[:300], secrets)
        if is_credentials_error(exc):
            raise RedisConfigError(
                f"redis at {where} refused the credentials or permissions of user {user!r} "
                f"({detail}): {CREDENTIALS_HINT}") from None
        return f"unreachable: {detail}"
    except OSError as exc:
        return f"unreachable: {masked(str(exc), secrets)}"
    finally:
        client.close()
    return "ok"


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

    @cached_property
    def items_json(self) -> str:
        return json.dumps(self.items, separators=(",", ":"))

    def message_bytes(self, published_at: float) -> bytes:
        """The recommendations-topic value (docs/schemas/recommendation.json)."""
        head = json.dumps({"user_id": self.user_id, "model_version": self.model_version,
                           "generated_at": self.generated_at, "trigger": self.trigger,
                           "event_id": self.event_id, "event_ts": self.source_ts,
                           "published_at": published_at}, separators=(",", ":"))
        # Splice the items in rather than re-encoding a dict that holds them.
        return f'{head[:-1]},"items":{self.items_json}}}'.encode()


REPLACE_LIST_LUA = """
-- KEYS[1] sorted set, KEYS[2] meta hash
-- ARGV: ttl, model_version, generated_at, trigger, items_json, event_id, then score,
-- member pairs
redis.call('DEL', KEYS[1])
if #ARGV > 6 then
  redis.call('ZADD', KEYS[1], unpack(ARGV, 7))
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'model_version', ARGV[2], 'generated_at', ARGV[3],
           'trigger', ARGV[4], 'items', ARGV[5], 'event_id', ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


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
            "trigger": text.get("trigger", ""), "event_id": text.get("event_id") or None,
            "items": json.loads(text.get("items", "[]"))}


SendToKafka = Callable[[str, bytes], Awaitable[None]]


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
                 remember_users: int = 100_000, health: RedisHealth | None = None) -> None:
        self.redis = redis
        self.send_to_kafka = send_to_kafka
        self.metrics = metrics
        self.prefix = prefix
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
        self._replace = redis.register_script(REPLACE_LIST_LUA)
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
        if not await self._write_redis(batch):
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
        sent: Counter[str] = Counter()
        for rec in batch:
            try:
                await self.send_to_kafka(rec.user_id, rec.message_bytes(published_at))
                sent[rec.trigger] += 1
            except Exception as exc:  # a lost notification; Redis already holds the list
                self.metrics.publish_errors.labels("kafka").inc()
                self._kafka_lost += 1
                if self._kafka_lost == 1:  # once per run of failures, not per list
                    log.warning("publishing lists to the recommendations topic fails (%s: "
                                "%s); the lists are in Redis, their notifications are lost "
                                "until it works again", type(exc).__name__, exc)
        if sent and self._kafka_lost:
            log.info("the recommendations topic works again (%d notifications lost)",
                     self._kafka_lost)
            self._kafka_lost = 0
        for trigger, n in sent.items():
            self.metrics.recs_published.labels("kafka", trigger).inc(n)
        return len(batch)

    async def _write_redis(self, batch: list[RecList]) -> bool:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for rec in batch:
                    args: list[Any] = [self.ttl_s, rec.model_version, repr(rec.generated_at),
                                       rec.trigger, rec.items_json, rec.event_id or ""]
                    for it in rec.items:
                        args.append(float(it["score"]))
                        args.append(it["item_id"])
                    await self._replace(keys=[recs_key(self.prefix, rec.user_id),
                                              meta_key(self.prefix, rec.user_id)],
                                        args=args, client=pipe)
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
