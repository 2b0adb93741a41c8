"""Redis in one place: the health of a client (a circuit breaker shared by its users),
the start-up check, the errors that mean "fix the configuration", and the name of every
key tailstream writes.

Key layout (``{p}`` = ``TAILSTREAM_REDIS_PREFIX``), built only by :class:`Keys`. Every key
is ``{p}:{type}:{one name}``: the type comes before the only part a user controls, and no
type is another's prefix, so no id — whatever it contains, ``:`` included — can make the key
of another user, another type or another id.

=================================  ====================================================
``{p}:recs:{user}``                sorted set item → score: the user's current list
``{p}:recs-meta:{user}``           hash: model_version, generated_at, trigger, event_id,
                                   items (JSON)
``{p}:seen:{event_id}``            the message that first carried an event (de-dup)
``{p}:buffer:minority:{class}``    list of samples (JSON), newest last
``{p}:buffer:tail``                list of tail-item samples of majority classes
``{p}:buffer:reservoir:{class}``   hash slot → sample (Algorithm R)
``{p}:buffer:meta``                hash: reservoir counters, new samples since a take
``{p}:weights``                    hash: the policy, weights and counts in force
``{p}:textvec:{fingerprint}``      hash text digest → float16 vector (shared cache)
``{p}:trainer:replay``             list: the trainer's replay memory
``{p}:trainer:offsets``            hash: the trainer's position in training-requests
``{p}:preflight:{random}``         a scratch key written once by the start-up check
=================================  ====================================================
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Keys:
    """Every Redis key name under one prefix.

    >>> k = Keys("ts")
    >>> k.recs("u1"), k.meta("u1"), k.seen("e9"), k.minority("cart"), k.weights
    ('ts:recs:u1', 'ts:recs-meta:u1', 'ts:seen:e9', 'ts:buffer:minority:cart', 'ts:weights')
    >>> k.meta("victim") != k.recs("victim:meta") != k.meta("victim:meta")
    True
    >>> k.impression("u1"), k.online("v00003"), k.canary
    ('ts:impression:u1', 'ts:online:v00003', 'ts:canary')
    """

    prefix: str

    def recs(self, user_id: str) -> str:
        return f"{self.prefix}:recs:{user_id}"

    def meta(self, user_id: str) -> str:
        return f"{self.prefix}:recs-meta:{user_id}"

    @property
    def meta_pattern(self) -> str:
        """A SCAN pattern matching every user's list metadata."""
        return f"{self.prefix}:recs-meta:*"

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}:seen:{event_id}"

    def minority(self, label: str) -> str:
        return f"{self.prefix}:buffer:minority:{label}"

    @property
    def tail(self) -> str:
        return f"{self.prefix}:buffer:tail"

    def reservoir(self, label: str) -> str:
        return f"{self.prefix}:buffer:reservoir:{label}"

    @property
    def buffer_meta(self) -> str:
        return f"{self.prefix}:buffer:meta"

    @property
    def weights(self) -> str:
        return f"{self.prefix}:weights"

    @property
    def blender(self) -> str:
        """The hybrid lists' blender (JSON), so a restarted worker keeps what it learned."""
        return f"{self.prefix}:blender"

    def text_vectors(self, fingerprint: str) -> str:
        return f"{self.prefix}:textvec:{fingerprint}"

    @property
    def trainer_replay(self) -> str:
        return f"{self.prefix}:trainer:replay"

    @property
    def trainer_offsets(self) -> str:
        return f"{self.prefix}:trainer:offsets"

    @property
    def worker_health(self) -> str:
        """Hash: worker → its recent latency and lag (JSON), for the trainer's back-pressure."""
        return f"{self.prefix}:worker-health"

    def impression(self, user_id: str) -> str:
        """The user's last served list as an impression record (JSON), with a TTL of the
        attribution window: what their next interaction is attributed to."""
        return f"{self.prefix}:impression:{user_id}"

    def online(self, version: str) -> str:
        """Hash: a model version's online figures summed over every worker (lists served,
        items by tier, judged lists and hits, attributed events by class and tier)."""
        return f"{self.prefix}:online:{version}"

    @property
    def online_versions(self) -> str:
        """Set: the versions that have online figures (what readers list, not SCAN)."""
        return f"{self.prefix}:online-versions"

    def letter(self, source: str) -> str:
        """String: a malformed record's dead letter was claimed (``source``: topic,
        partition, offset, element, CRC-32), so the workers that each read it — the
        catalogue is read whole by every worker — write it once."""
        return f"{self.prefix}:letter:{source}"

    @property
    def canary(self) -> str:
        """Hash: the canary in progress (version, share, when it ends); absent when none."""
        return f"{self.prefix}:canary"

    def preflight(self) -> str:
        return f"{self.prefix}:preflight:{random.getrandbits(32):08x}"  # noqa: S311 - a name


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
    key = Keys(prefix).preflight()
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
