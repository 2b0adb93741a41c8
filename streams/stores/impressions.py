"""What was shown, and how it did: impression records and per-version online figures.

* An :class:`Impression` is one published list as the attribution sees it: user, list
  id, model version, arm (``serving`` or ``canary``), policy (what made the list:
  ``hybrid``, ``towers`` or ``baseline``), trigger, when it was published, and its items
  with their tiers (an item's position is its index + 1). The publisher writes it to
  Redis beside the list (``{prefix}:impression:{user}``, TTL = the attribution window,
  same pipelined round trip) and to the ``impressions`` topic (key = user, compacted).
* A version's **online figures** (:class:`OnlineFigures`) are counters summed over every
  worker in one Redis hash per version (``{prefix}:online:{version}``): lists served,
  list slots by tier, judged lists (followed by an interaction of their user within the
  window) and hits among them, attributed interactions by class, by class and tier, and
  by position. Workers add to them once a second (:class:`OnlineCounters`: one pipelined
  round trip); the trainer's canary, ``tailstream model list`` and the demo read them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tailstream.configs import BASE_VERSION
from tailstream.contract import CLASSES, TAIL, TIERS
from tailstream.redis_io import Keys, RedisHealth

log = logging.getLogger(__name__)

CLICK, PURCHASE = CLASSES[0], CLASSES[-1]
POSITION_BUCKETS: tuple[str, ...] = ("1", "2-3", "4-7", "8-15", "16+")
ONLINE_TTL_S = 90 * 86_400
"""A version's online figures are kept this long after its last update."""


def position_bucket(position: int) -> str:
    """The bucket of a 1-based list position (a label of few values).

    >>> [position_bucket(p) for p in (1, 2, 3, 4, 8, 15, 16, 20)]
    ['1', '2-3', '2-3', '4-7', '8-15', '8-15', '16+', '16+']
    """
    if position <= 1:
        return "1"
    if position <= 3:
        return "2-3"
    if position <= 7:
        return "4-7"
    if position <= 15:
        return "8-15"
    return "16+"


@dataclass(frozen=True, slots=True)
class Impression:
    """One published list, as the attribution needs it (positions are index + 1)."""

    user_id: str
    list_id: str
    model_version: str
    arm: str
    policy: str
    trigger: str
    published_at: float
    items: tuple[str, ...]
    tiers: tuple[str, ...]

    def position(self, item_id: str) -> int:
        """1-based position of ``item_id`` in the list (0: not in it)."""
        try:
            return self.items.index(item_id) + 1
        except ValueError:
            return 0

    def to_json(self) -> bytes:
        """The record (Redis value and impressions-topic message; docs/events.md).

        >>> imp = Impression("u1", "l1", "v00002", "serving", "hybrid", "event", 10.0,
        ...                  ("i1", "i2"), ("head", "tail"))
        >>> Impression.from_json(imp.to_json()) == imp
        True
        """
        return json.dumps({
            "user_id": self.user_id, "list_id": self.list_id,
            "model_version": self.model_version, "arm": self.arm, "policy": self.policy,
            "trigger": self.trigger, "published_at": self.published_at,
            "items": [{"item_id": i, "position": n, "tier": t} for n, (i, t) in
                      enumerate(zip(self.items, self.tiers, strict=True), 1)]},
            separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Impression:
        d = json.loads(raw)
        items = sorted(d.get("items", []), key=lambda it: int(it.get("position", 0)))
        return cls(str(d["user_id"]), str(d.get("list_id", "")), str(d["model_version"]),
                   str(d.get("arm", "serving")), str(d.get("policy", "")),
                   str(d.get("trigger", "")), float(d["published_at"]),
                   tuple(str(it["item_id"]) for it in items),
                   tuple(str(it.get("tier", TAIL)) for it in items))


# --------------------------------------------------------------------------- figures
@dataclass
class OnlineFigures:
    """A version's online figures (the fields of its Redis hash, parsed).

    >>> f = OnlineFigures.from_hash({b"lists": b"10", b"judged": b"8", b"hits": b"2",
    ...                              b"items:tail": b"30", b"items:head": b"70",
    ...                              b"click": b"3", b"click:tail": b"1",
    ...                              b"purchase": b"1", b"purchase:tail": b"1"})
    >>> f.hit_rate, f.ctr, f.cvr, f.tail_share, f.tail_conversion_share
    (0.25, 0.03, 0.333333, 0.3, 1.0)
    """

    lists: int = 0
    judged: int = 0
    hits: int = 0
    items: dict[str, int] = field(default_factory=dict)
    """List slots by tier."""
    attributed: dict[str, int] = field(default_factory=dict)
    """Attributed interactions by class."""
    attributed_tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    """Attributed interactions by class, then tier."""
    positions: dict[str, int] = field(default_factory=dict)
    """Attributed interactions by position bucket."""

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> OnlineFigures:
        out = cls()
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            try:
                n = int(float(v.decode() if isinstance(v, bytes) else v))
            except (TypeError, ValueError):
                continue
            out._add(key, n)
        return out

    def _add(self, key: str, n: int) -> None:
        if key in ("lists", "judged", "hits"):
            setattr(self, key, getattr(self, key) + n)
        elif key.startswith("items:"):
            tier = key[6:]
            self.items[tier] = self.items.get(tier, 0) + n
        elif key.startswith("pos:"):
            self.positions[key[4:]] = self.positions.get(key[4:], 0) + n
        elif ":" in key:
            cls_, tier = key.split(":", 1)
            by = self.attributed_tiers.setdefault(cls_, {})
            by[tier] = by.get(tier, 0) + n
        elif key in CLASSES:
            self.attributed[key] = self.attributed.get(key, 0) + n

    def fields(self) -> dict[str, int]:
        """The hash fields these figures are made of (the inverse of :meth:`from_hash`)."""
        out: dict[str, int] = {"lists": self.lists, "judged": self.judged, "hits": self.hits}
        out.update({f"items:{t}": n for t, n in self.items.items()})
        out.update({f"pos:{b}": n for b, n in self.positions.items()})
        out.update(self.attributed)
        for c, by in self.attributed_tiers.items():
            out.update({f"{c}:{t}": n for t, n in by.items()})
        return out

    @classmethod
    def total(cls, figures: Iterable[OnlineFigures]) -> OnlineFigures:
        """Several versions' figures added up.

        >>> OnlineFigures.total([OnlineFigures(lists=2, attributed={"click": 1}),
        ...                      OnlineFigures(lists=3, attributed={"click": 2})]).attributed
        {'click': 3}
        """
        out = cls()
        for f in figures:
            for key, n in f.fields().items():
                out._add(key, n)
        return out

    def minus(self, earlier: OnlineFigures) -> OnlineFigures:
        """What was added since ``earlier`` (a canary's window: now − at its start).

        >>> (OnlineFigures(lists=9, judged=5, hits=2)
        ...  .minus(OnlineFigures(lists=4, judged=1, hits=1))).judged
        4
        """
        mine, theirs = self.fields(), earlier.fields()
        out = OnlineFigures()
        for key, n in mine.items():
            if n - theirs.get(key, 0):
                out._add(key, n - theirs.get(key, 0))
        return out

    @property
    def hit_rate(self) -> float | None:
        """Judged lists whose user's next interaction was on one of their items."""
        return _ratio(self.hits, self.judged)

    @property
    def ctr(self) -> float | None:
        """CTR-like: attributed clicks per impression (an item shown in a list)."""
        return _ratio(self.attributed.get(CLICK, 0), sum(self.items.values()))

    @property
    def cvr(self) -> float | None:
        """CVR-like: attributed purchases per attributed click."""
        return _ratio(self.attributed.get(PURCHASE, 0), self.attributed.get(CLICK, 0))

    @property
    def tail_share(self) -> float | None:
        """Tail items' share of the list slots served."""
        return _ratio(self.items.get(TAIL, 0), sum(self.items.values()))

    @property
    def tail_conversion_share(self) -> float | None:
        """Tail items' share of the attributed purchases."""
        by = self.attributed_tiers.get(PURCHASE, {})
        return _ratio(by.get(TAIL, 0), sum(by.values()))

    def to_dict(self) -> dict[str, Any]:
        """For summaries, manifests and ``tailstream model list --json``."""
        return {"lists": self.lists, "judged": self.judged, "hits": self.hits,
                "hit_rate": self.hit_rate, "ctr": self.ctr, "cvr": self.cvr,
                "tail_share": self.tail_share,
                "tail_conversion_share": self.tail_conversion_share,
                "items_by_tier": {t: self.items.get(t, 0) for t in TIERS},
                "attributed_by_class": {c: self.attributed.get(c, 0) for c in CLASSES},
                "attributed_by_tier": {t: sum(by.get(t, 0)
                                              for by in self.attributed_tiers.values())
                                       for t in TIERS},
                "attributed_by_class_and_tier": {c: dict(by) for c, by in
                                                 sorted(self.attributed_tiers.items())},
                "attributed_by_position": {b: self.positions.get(b, 0)
                                           for b in POSITION_BUCKETS if b in self.positions}}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 6) if b else None


def online_versions(client: Any, prefix: str) -> list[str]:
    """The versions that have online figures in Redis (a sync client)."""
    return sorted((v.decode() if isinstance(v, bytes) else str(v))
                  for v in client.smembers(Keys(prefix).online_versions))


def read_online(client: Any, prefix: str, versions: Iterable[str] | None = None
                ) -> dict[str, OnlineFigures]:
    """Every version's online figures from Redis (a sync client), or those of
    ``versions`` only (absent ones are left out), in one pipelined round trip. ``base``
    stands for the lists of the untrained base model (labelled ``base-<fingerprint>``)."""
    keys = Keys(prefix)
    wanted = online_versions(client, prefix) if versions is None else list(versions)
    names = [v for v in dict.fromkeys(wanted) if v and v != BASE_VERSION]
    if BASE_VERSION in wanted:
        names += [v for v in online_versions(client, prefix)
                  if v.startswith(f"{BASE_VERSION}-") and v not in names]
    pipe = client.pipeline(transaction=False)
    for v in names:
        pipe.hgetall(keys.online(v))
    return {v: OnlineFigures.from_hash(raw) for v, raw in zip(names, pipe.execute(),
                                                               strict=True) if raw}


def figures_of(figures: Mapping[str, OnlineFigures], version: str) -> OnlineFigures | None:
    """``version``'s figures; for ``base``, those of the base model's lists (the most
    served, should the encoder have changed).

    >>> figures_of({"base-53aa5117": OnlineFigures(lists=3)}, "base").lists
    3
    """
    if version in figures or version != BASE_VERSION:
        return figures.get(version)
    based = [f for v, f in figures.items() if v.startswith(f"{BASE_VERSION}-")]
    return max(based, key=lambda f: f.lists) if based else None


# --------------------------------------------------------------------------- the worker
class OnlineCounters:
    """The worker's additions to the per-version online figures since its last flush,
    written to Redis once a second in one pipelined round trip (``HINCRBY`` per changed
    field). Redis being away keeps them (counters only grow; bounded by the versions ×
    fields in play) for the next flush."""

    def __init__(self, redis: Any, prefix: str, health: RedisHealth | None = None) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.health = health
        self.pending: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def add(self, version: str, key: str, n: int = 1) -> None:
        self.pending[version][key] += n

    async def flush(self) -> int:
        """Write what was added since the last flush; returns the fields written."""
        if not self.pending or (self.health is not None and not self.health.allow()):
            return 0
        pending, self.pending = self.pending, defaultdict(Counter)
        written = 0
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for version, counts in pending.items():
                    key = self.keys.online(version)
                    for name, n in counts.items():
                        pipe.hincrby(key, name, n)
                        written += 1
                    pipe.expire(key, ONLINE_TTL_S)
                pipe.sadd(self.keys.online_versions, *pending)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - kept for the next flush
            for version, counts in pending.items():
                self.pending[version].update(counts)
            if self.health is not None:
                self.health.failed("online", exc)
            log.debug("could not write the online figures: %r", exc)
            return 0
        if self.health is not None:
            self.health.succeeded()
        return written


async def load_impressions(redis: Any, prefix: str, users: list[str]) -> dict[str, Impression]:
    """The impressions Redis holds for ``users`` (one ``MGET``); unreadable ones skipped."""
    if not users:
        return {}
    keys = Keys(prefix)
    raw = await redis.mget([keys.impression(u) for u in users])
    out: dict[str, Impression] = {}
    for user, value in zip(users, raw, strict=True):
        if value:
            try:
                out[user] = Impression.from_json(value)
            except (ValueError, KeyError, TypeError):
                continue
    return out
