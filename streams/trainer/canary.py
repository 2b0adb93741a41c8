"""The canary: between the offline gate and a promotion, the candidate serves a share of
the users, and is promoted only if its online hit rate was not worse.

:meth:`CanaryController.start` (a candidate passed the gate) saves the canary in Redis
(``{prefix}:canary``: what workers that start meanwhile join) and announces it on
``model-updates`` (``action: "canary"``, the version and the share): every worker serves
the candidate to that share of users (hashed ids, sticky) and the serving version to the
rest, and counts both arms' judged lists and hits into the versions' online figures in
Redis. The controller notes both versions' figures at the start; :meth:`tick` (called by
the trainer's loop every turn) judges the canary when its window has passed, on what was
added since (:func:`~tailstream.models.serving.canary.judge_canary`: a one-sided pooled
two-proportion z-test at ``TAILSTREAM_CANARY_CONFIDENCE``):

* **not worse** → the store promotes it (``CURRENT``) and ``action: "promote"`` is
  announced (workers put the canary's scorer in the serving one's place);
* **worse** → it is kept as ``rolled_back`` with the reason and ``action:
  "canary_rollback"`` is announced; the serving version never changed;
* **too few judged lists** → it waits, at most ``max_windows`` windows, then is rolled back
  (a version nobody could judge online is not promoted).

Every decision goes to the version's manifest (``canary``: figures, z, p-value, reason),
to ``canaries.jsonl`` in the store, and to ``tailstream_canaries_total{outcome}``. Every
``GAUGES_EVERY_S`` the controller also publishes the online figures of the serving, the
previous and the canary version as gauges (what the alerts compare).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import RedisError

from tailstream import configs
from tailstream.configs import version_number
from tailstream.metrics import TrainerMetrics
from tailstream.models.serving.canary import CanaryVerdict, judge_canary
from tailstream.models.towers.store import ModelStore
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.stores.impressions import OnlineFigures, figures_of, read_online

log = logging.getLogger(__name__)

GAUGES_EVERY_S = 10.0
CANARIES_FILE = "canaries.jsonl"


@dataclass
class Canary:
    """A canary in progress (kept in Redis, so a restarted trainer carries on)."""

    version: str
    parent: str
    share: float
    started_at: float
    window_s: float
    ends_by: float
    """When it is rolled back at the latest for lack of judged lists."""
    reason: str
    """The offline gate's reason."""
    baseline: dict[str, dict[str, int]] = field(default_factory=dict)
    """Both versions' online figures (hash fields) when it started."""
    update: dict[str, Any] = field(default_factory=dict)
    """What the promotion's announcement carries besides (model-update latency stages)."""

    @property
    def ends_at(self) -> float:
        return self.started_at + self.window_s

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Canary:
        return cls(**json.loads(raw))


class CanaryController:
    def __init__(self, settings: Settings, store: ModelStore, metrics: TrainerMetrics,
                 redis: Any, publish_update: Callable[[dict[str, Any]], None], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = configs.canary_config(settings)
        self.store = store
        self.metrics = metrics
        self.redis = redis
        self.prefix = settings.redis_prefix
        self.keys = Keys(settings.redis_prefix)
        self.publish_update = publish_update
        self.clock = clock
        self.active: Canary | None = None
        self.after_promotion: Callable[[str], None] | None = None
        """Called with the version once a canary promoted it (the replay memory)."""
        self._gauges_at = -GAUGES_EVERY_S
        self._waiting_said = False

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    # ------------------------------------------------------------------ start
    def restore(self) -> Canary | None:
        """The canary a previous trainer left running (None: none, or Redis unreadable)."""
        try:
            raw = self.redis.hget(self.keys.canary, "state")
        except RedisError as exc:
            log.warning("could not read a running canary from redis (%s)", exc)
            return None
        if raw:
            try:
                self.active = Canary.from_json(raw)
            except (TypeError, ValueError) as exc:
                log.warning("ignoring an unreadable canary in redis (%s)", exc)
                return None
            self._set_running(self.active)
            log.info("carrying on with the canary of %s (ends at %.0f)", self.active.version,
                     self.active.ends_at)
        return self.active

    def start(self, version: str, parent: str, reason: str,
              update: dict[str, Any] | None = None) -> Canary:
        """Serve ``version`` (it passed the offline gate) to the canary's share of users."""
        now = self.clock()
        canary = Canary(version, parent, self.cfg.share, now, self.cfg.window_s,
                        now + self.cfg.window_s * self.cfg.max_windows, reason,
                        {v: f.fields() for v, f in self._figures([version, parent]).items()},
                        dict(update or {}))
        self.redis.hset(self.keys.canary, mapping={
            "version": version, "parent": parent, "share": str(canary.share),
            "started_at": repr(now), "ends_at": repr(canary.ends_at),
            "ends_by": repr(canary.ends_by), "state": canary.to_json()})
        self.store.update_manifest(version, status="canary", canary={
            "share": canary.share, "started_at": now, "window_s": canary.window_s,
            "serving": parent})
        self.active = canary
        self._waiting_said = False
        self.metrics.canaries.labels("started").inc()
        self._set_running(canary)
        self.publish_update({"version": version, "parent": parent, "action": "canary",
                             "share": canary.share, "window_s": canary.window_s,
                             "ends_at": canary.ends_at, "reason": reason})
        log.info("canary: %s serves %.0f%% of users beside %s for %.0fs", version,
                 100 * canary.share, parent, canary.window_s)
        return canary

    def _set_running(self, canary: Canary | None) -> None:
        self.metrics.canary_running.set(1 if canary is not None else 0)
        self.metrics.canary_version.set(version_number(canary.version) if canary else 0)

    def _figures(self, versions: list[str]) -> dict[str, OnlineFigures]:
        """Each version's figures (``base``: its lists' ``base-<fingerprint>`` label)."""
        found = read_online(self.redis, self.prefix, [v for v in versions if v])
        return {v: f for v in versions if (f := figures_of(found, v)) is not None}

    # ------------------------------------------------------------------ every turn
    def tick(self) -> CanaryVerdict | None:
        """Publish the online gauges now and then; judge the canary once it is due.
        Returns the verdict of a canary that ended now (None otherwise). Redis being away
        only postpones both."""
        now = self.clock()
        try:
            if now - self._gauges_at >= GAUGES_EVERY_S:
                self._gauges_at = now
                self.publish_gauges()
            canary = self.active
            if canary is None or now < canary.ends_at:
                return None
            return self.conclude(final=now >= canary.ends_by)
        except RedisError as exc:
            log.warning("could not read the online figures (%s); the canary waits", exc)
            return None

    def conclude(self, *, final: bool = False) -> CanaryVerdict | None:
        """Judge the canary on what both arms added since it started; promote it, roll
        it back, or (too few judged lists, not ``final``) let it wait."""
        canary = self.active
        if canary is None:
            return None
        now_figs = self._figures([canary.version, canary.parent])
        added = {v: now_figs.get(v, OnlineFigures()).minus(
            OnlineFigures.from_hash(canary.baseline.get(v, {})))
            for v in (canary.version, canary.parent)}
        cand, serv = added[canary.version], added[canary.parent]
        verdict = judge_canary((cand.hits, cand.judged), (serv.hits, serv.judged),
                               confidence=self.cfg.confidence, min_lists=self.cfg.min_lists,
                               final=final)
        if verdict.decision == "wait":
            if not self._waiting_said:
                self._waiting_said = True
                log.info("canary %s waits for judged lists (%s)", canary.version,
                         verdict.reason)
            return None
        self.metrics.canary_z.set(verdict.z if verdict.z is not None else 0.0)
        record = {"version": canary.version, "serving": canary.parent, "share": canary.share,
                  "started_at": canary.started_at, "ended_at": self.clock(),
                  "verdict": verdict.to_dict(),
                  "online": {"candidate": cand.to_dict(), "serving": serv.to_dict()}}
        if verdict.decision == "promote":
            self._promote(canary, verdict, record)
        else:
            self._roll_back(canary, verdict, record)
        self._finish(record)
        return verdict

    def _promote(self, canary: Canary, verdict: CanaryVerdict, record: dict[str, Any]) -> None:
        reason = f"{canary.reason} | canary: {verdict.reason}"
        entry = self.store.promote(canary.version, reason, {"canary": verdict.to_dict()})
        self.store.update_manifest(canary.version, canary=record)
        self.metrics.canaries.labels("promoted").inc()
        self.metrics.version.set(version_number(canary.version))
        self.metrics.last_promotion.set(time.time())
        self.publish_update({**canary.update, "version": canary.version,
                             "parent": canary.parent, "action": "promote", "reason": reason,
                             "promoted_at": entry["at"], "canary": verdict.to_dict()})
        log.info("canary %s promoted: %s", canary.version, verdict.reason)
        if self.after_promotion is not None:
            try:
                self.after_promotion(canary.version)
            except Exception as exc:  # noqa: BLE001 - the promotion stands
                log.warning("after the promotion of %s: %r", canary.version, exc)

    def _roll_back(self, canary: Canary, verdict: CanaryVerdict,
                   record: dict[str, Any]) -> None:
        reason = f"canary rolled back: {verdict.reason}"
        self.store.reject(canary.version, reason, status="rolled_back")
        self.store.update_manifest(canary.version, canary=record)
        self.metrics.canaries.labels("rolled_back").inc()
        self.publish_update({"version": canary.version, "parent": canary.parent,
                             "action": "canary_rollback", "share": canary.share,
                             "reason": reason})
        log.warning("canary %s rolled back, %s keeps serving: %s", canary.version,
                    canary.parent, verdict.reason)

    def _finish(self, record: dict[str, Any]) -> None:
        self.active = None
        self._set_running(None)
        try:
            self.redis.delete(self.keys.canary)
        except RedisError as exc:  # workers ignore a canary past its end
            log.warning("could not clear the canary in redis (%s)", exc)
        self.store.root.mkdir(parents=True, exist_ok=True)
        with open(self.store.root / CANARIES_FILE, "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    # ------------------------------------------------------------------ gauges
    def roles(self) -> dict[str, str]:
        """role → version: serving (CURRENT), previous (the promotion before it) and
        canary (the candidate being tried), where there is one."""
        out = {"serving": self.store.current()}
        lineage = self.store.lineage()
        if len(lineage) >= 2 and lineage[-1] == out["serving"]:
            out["previous"] = lineage[-2]
        if self.active is not None:
            out["canary"] = self.active.version
        return out

    def publish_gauges(self) -> dict[str, OnlineFigures]:
        """The online figures of each role's version as gauges (every worker's, all time)."""
        roles = self.roles()
        figures = self._figures(list(roles.values()))
        out: dict[str, OnlineFigures] = {}
        for role, version in roles.items():
            f = figures.get(version)
            if f is None:
                continue
            out[role] = f
            m = self.metrics
            m.online_judged.labels(role).set(f.judged)
            for gauge, value in ((m.online_hit_rate, f.hit_rate), (m.online_ctr, f.ctr),
                                 (m.online_cvr, f.cvr),
                                 (m.online_tail_conversions, f.tail_conversion_share)):
                if value is not None:
                    gauge.labels(role).set(value)
        return out

