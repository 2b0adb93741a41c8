"""``tailstream demo``: the whole embedded system for N seconds, with a live view and a summary.

Broker and Redis (embedded unless configured) → worker process → producer thread
(synthetic shop or a replayed log) → recommendations on Kafka and in Redis →
metrics. The summary JSON is computed from what actually arrived: the
recommendations and DLQ topics are read back, Redis is scanned, the worker's
/metrics page is scraped; ``online`` (impressions and what was attributed to them, by
class, tier and version) comes from the versions' online figures in Redis, ``canary``
from the trainer's metrics and the store's ``canaries.jsonl``. The synthetic shop reacts
to the lists (its users read theirs from Redis and sometimes take an item from them).
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from tailstream import configs
from tailstream.configs import BASE_VERSION
from tailstream.contract import CLASSES, EVENT_KINDS, RARE_CLASSES, TAIL
from tailstream.kafka_io import TopicCounter, create_topics
from tailstream.producers.records import ProducedRecord
from tailstream.producers.sender import SendStats, send_records
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess, ServiceStack
from tailstream.stack.processes import (
    metrics_url,
    scrape,
    stage_ms,
    start_trainer,
    start_worker,
    trainer_metrics_url,
    wait_ready,
    wait_trainer_ready,
)

if TYPE_CHECKING:
    from tailstream.models.towers.store import ModelStore

log = logging.getLogger(__name__)

DEMO_DEFAULTS: dict[str, Any] = {"trigger_min_samples": 1000, "trigger_cooldown_s": 20.0,
                                 "canary_window_s": 20.0, "canary_min_lists": 100}
"""Settings a one- or two-minute demo changes (unless set by env var or flag), so
fine-tunes and a canary happen within it: production defaults judge a canary after ten
minutes and 200 judged lists (the trigger values are the production ones, kept here so a
change of the defaults does not slow the demo down)."""


@dataclass
class RecsWatcher:
    """Collects latency and model versions from the recommendations topic."""

    latencies_ms: list[float] = field(default_factory=list)
    versions: Counter[str] = field(default_factory=Counter)
    users: set[str] = field(default_factory=set)
    triggers: Counter[str] = field(default_factory=Counter)
    published: list[float] = field(default_factory=list)
    """When each list of ``latencies_ms`` reached Redis (same order)."""
    first_list: dict[str, float] = field(default_factory=dict)
    """Model version → when its first list reached Redis."""

    def __call__(self, record: Any) -> None:
        try:
            msg = json.loads(record.value)
        except (TypeError, ValueError):
            return
        version = str(msg.get("model_version"))
        self.versions[version] += 1
        self.users.add(str(msg.get("user_id")))
        self.triggers[str(msg.get("trigger"))] += 1
        at = msg.get("published_at")
        if at is not None and (version not in self.first_list or at < self.first_list[version]):
            self.first_list[version] = at
        if msg.get("event_ts") is not None and at is not None:
            self.latencies_ms.append(1000.0 * (at - msg["event_ts"]))
            self.published.append(at)


@dataclass
class UpdatesWatcher:
    """Collects the promotions announced on the model-updates topic."""

    updates: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, record: Any) -> None:
        try:
            msg = json.loads(record.value)
        except (TypeError, ValueError):
            return
        if isinstance(msg, dict) and msg.get("action") == "promote":
            self.updates.append(msg)


def model_updates(updates: list[dict[str, Any]], first_list: dict[str, float]
                  ) -> list[dict[str, Any]]:
    """Each promotion's model-update latency: seconds from its trigger (the training
    request) to the candidate, the promotion, and the first list carrying the version.

    >>> model_updates([{"version": "v00002", "requested_at": 10.0, "candidate_at": 40.0,
    ...                 "promoted_at": 41.0}], {"v00002": 43.5})
    [{'version': 'v00002', 'candidate_s': 30.0, 'promotion_s': 31.0, 'first_list_s': 33.5}]
    """
    out = []
    for u in updates:
        start = u.get("requested_at")
        if not isinstance(start, int | float):
            continue
        first = first_list.get(str(u.get("version")))
        row: dict[str, Any] = {"version": u.get("version")}
        for key, at in (("candidate_s", u.get("candidate_at")),
                        ("promotion_s", u.get("promoted_at")), ("first_list_s", first)):
            row[key] = round(float(at) - start, 1) if isinstance(at, int | float) else None
        out.append(row)
    return out


def split_latencies(latencies_ms: list[float], published: list[float],
                    spans: list[list[float]]) -> tuple[list[float], list[float]]:
    """Latencies of the lists published during a fine-tune span, and of the others.

    >>> split_latencies([10.0, 20.0, 30.0], [1.0, 5.0, 9.0], [[4.0, 6.0]])
    ([20.0], [10.0, 30.0])
    """
    during: list[float] = []
    outside: list[float] = []
    for lat, at in zip(latencies_ms, published, strict=False):
        (during if any(a <= at <= b for a, b in spans) else outside).append(lat)
    return during, outside


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no data.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.0
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def count_users_in_redis(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.redis_url.reveal())
    try:
        pattern = Keys(settings.redis_prefix).meta_pattern
        return sum(1 for _ in client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def run_demo_view(settings: Settings, *, records: Iterable[ProducedRecord], source: str,
                  rate: float | None, seconds: float | None, summary_json: Path | None,
                  ui: bool | None, trainer: bool) -> dict[str, Any]:
    """:func:`run_demo` under the live terminal view when it is wanted (``ui``, or stdout
    is a terminal): the view scrapes /metrics, so the ports are fixed first."""
    from tailstream.stack.liveview import LiveMonitor, pin_ports, ui_wanted

    view: LiveMonitor | None = None
    if ui_wanted(ui, sys.stdout):
        settings = pin_ports(settings)
        view = LiveMonitor([metrics_url(settings)],
                           trainer_metrics_url(settings) if trainer else None,
                           title=f"tailstream demo · {source}", quiet=[__name__])
    try:
        if view is not None:
            view.start()
        return run_demo(settings, seconds=seconds, summary_json=summary_json, records=records,
                        rate=rate, ui=False, source=source, trainer=trainer)
    finally:
        if view is not None:
            view.stop()


def run_demo(settings: Settings, *, seconds: float | None, summary_json: Path | None,
             records: Iterable[ProducedRecord], rate: float | None, ui: bool,
             source: str, trainer: bool = True) -> dict[str, Any]:
    """Run the embedded system until ``seconds`` pass or the source ends; return the summary."""
    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    with ServiceStack(settings) as s:
        create_topics(s)
        watcher = RecsWatcher()
        # Both read once a second: the latencies come from the timestamps in the lists,
        # and every fetch costs the embedded broker a listing of the partition's batches.
        recs = TopicCounter(s, [s.topic(s.topic_recommendations)], on_record=watcher,
                            every_s=1.0)
        dlq = TopicCounter(s, [s.topic(s.topic_dlq)], every_s=1.0)
        promotions = UpdatesWatcher()
        updates = TopicCounter(s, [s.topic(s.topic_model_updates)], on_record=promotions)
        recs.start()
        dlq.start()
        updates.start()
        worker, ws = start_worker(s)
        tr: tuple[ManagedProcess, Settings] | None = start_trainer(ws) if trainer else None
        view: LiveView | None = None
        lists = react_to_lists(records, ws)
        try:
            log.info("waiting for the worker to join its group …")
            wait_ready(worker, ws)
            wait_model(worker, ws)
            if tr is not None:
                wait_trainer_ready(*tr)
            visits, opening = open_catalogue(records, s, worker, ws)
            stop = threading.Event()
            result: dict[str, SendStats] = {}

            def produce() -> None:
                result["stats"] = send_records(visits, s, rate=rate, stop=stop)

            producer = threading.Thread(target=produce, name="producer", daemon=True)
            started = time.monotonic()
            shop_s: float | None = None
            clock = ShopClock(seconds, tr[1] if tr else None)
            producer.start()
            view = LiveView(ws, tr[1] if tr else None, watcher, recs, dlq, ui=ui, source=source)
            try:
                while producer.is_alive():
                    view.update(time.monotonic() - started)
                    producer.join(1.0)
                    if not worker.alive():
                        raise RuntimeError(f"the worker died:\n{worker.tail(40)}")
                    if not stop.is_set() and clock.up(time.monotonic() - started):
                        stop.set()
                        shop_s = time.monotonic() - started
            finally:
                stop.set()
                producer.join(30)
            stats = result.get("stats")
            if stats is None:
                raise RuntimeError("the producer failed; see the log above")
            stats.by_kind["item"] = stats.by_kind.get("item", 0) + opening["catalogue_records"]
            _drain(ws, stats, worker, view, started)
            if tr is not None:
                _settle_finetunes(ws, tr[1], view, started)
            summary = _summary(ws, tr[1] if tr else None, stats, watcher, recs, dlq, view,
                               time.monotonic() - started)
            summary.update(_freshness(watcher, promotions, view))
            summary["catalogue_indexed_s"] = opening["catalogue_indexed_s"]
            summary["online"] = online_summary(ws, records)
            if shop_s is not None and seconds is not None:
                summary["online"]["shop_extended_s"] = round(max(0.0, shop_s - seconds), 1)
            summary["canary"] = canary_summary(ts=tr[1] if tr else None, ws=ws)
        finally:
            if lists is not None:
                lists.close()
            if view is not None:
                view.close()
            if tr is not None:
                tr[0].stop()
            worker.stop()
            recs.stop()
            dlq.stop()
            updates.stop()
    if summary_json is not None:
        summary_json.write_text(json.dumps(summary, indent=2))
    return summary


def _online_row(m: dict[str, float], t: dict[str, float]) -> str:
    """Judged lists, their hit rate, attributed interactions and the canary, for the log.

    >>> _online_row({"tailstream_judged_lists_total": 40.0,
    ...              "tailstream_judged_lists_total{outcome=hit}": 10.0,
    ...              "tailstream_attributed_total": 12.0},
    ...             {"tailstream_canary_running": 1.0,
    ...              "tailstream_canary_model_version_number": 3.0})
    'judged 40 lists, hit rate 0.250, attributed 12; canary v3 running'
    """
    judged = m.get("tailstream_judged_lists_total", 0.0)
    hits = m.get("tailstream_judged_lists_total{outcome=hit}", 0.0)
    rate = f"{hits / judged:.3f}" if judged else "—"
    canary = (f"canary v{int(t.get('tailstream_canary_model_version_number', 0))} running"
              if t.get("tailstream_canary_running", 0.0) > 0 else "no canary running")
    return (f"judged {judged:,.0f} lists, hit rate {rate}, attributed "
            f"{m.get('tailstream_attributed_total', 0.0):,.0f}; {canary}")


def run_allowance(ts: Settings) -> float:
    """The longest a fine-tune run may take: each policy it trains — the current one and,
    with policy selection, its challengers — may take ``finetune_max_seconds`` (pauses
    included).

    >>> run_allowance(Settings().replace(finetune_max_seconds=30.0))
    60.0
    >>> run_allowance(Settings().replace(finetune_max_seconds=30.0, selection_challengers=0))
    30.0
    """
    selection = configs.selection_config(ts)
    return (1 + (selection.challengers if selection.enabled else 0)) * ts.finetune_max_seconds


class ShopClock:
    """When the shop stops: after ``seconds`` — unless the loop is deciding then. A canary
    being served is judged on the users' interactions, and the fine-tune running then may
    end in one; so the shop goes on until that canary, or the first promotion or canary a
    run going then or after it makes, is decided — a run the gate rejects is followed by
    the one queued behind it, whose canary would otherwise be judged on no traffic at all
    (at most a run's allowance — :func:`run_allowance`, every policy it trains — and three
    canary windows' time more, and once a run has been rejected since, a second run's:
    the queued run gets its own allowance; on a slow machine a rejected run and its
    successor had outlasted one allowance, and until 2026-12-06 the allowance was one
    policy's while a selection run trains two, so the second run's canary started just
    after the shop closed): the summary then shows a canary decided on traffic."""

    def __init__(self, seconds: float | None, ts: Settings | None) -> None:
        self.seconds = seconds
        self.ts = ts
        self.then: dict[str, float] | None = None
        """The trainer's figures when ``seconds`` had passed."""

    def up(self, elapsed: float) -> bool:
        if self.seconds is None or elapsed < self.seconds:
            return False
        ts = self.ts
        if ts is None:
            return True
        allowance = run_allowance(ts)
        bound = self.seconds + allowance + 30.0 + 3 * ts.canary_window_s
        if elapsed >= bound + allowance:
            return True
        t = _scrape_or_empty(trainer_metrics_url(ts))
        now = {"runs": t.get("tailstream_finetune_runs_total", 0.0),
               "not_kept": sum(t.get(f"tailstream_finetune_runs_total{{outcome={o}}}", 0.0)
                               for o in ("rejected", "failed", "skipped")),
               "running": t.get("tailstream_finetune_running", 0.0),
               "canary": t.get("tailstream_canary_running", 0.0)
               * t.get("tailstream_canary_model_version_number", 0.0),
               "started": t.get("tailstream_canaries_total{outcome=started}", 0.0)}
        then = self.then = self.then or now
        if elapsed >= bound and now["not_kept"] == then["not_kept"]:
            return True  # no run rejected since: one fine-tune's allowance
        if now["canary"] and (now["canary"] == then["canary"] or (
                then["running"] and now["started"] == then["started"] + 1)):
            return False  # the canary of then, or the first one started since
        # The run going then, or one after it while every run decided since kept nothing
        # (the gate rejected it): a promotion or a canary since ends the wait.
        return not (then["running"] and now["running"] and now["started"] == then["started"]
                    and now["runs"] - then["runs"] == now["not_kept"] - then["not_kept"])


def wait_model(worker: ManagedProcess, ws: Settings, timeout: float = 120.0) -> None:
    """Until a transformer worker has loaded its model (or given up on it), so the shop's
    first events do not queue behind the load (the worker waits for its model before its
    first batch, ``TAILSTREAM_SCORER_START_WAIT_S``)."""
    if ws.scorer != "transformer":
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.alive():
        m = _scrape_or_empty(metrics_url(ws))
        if any(m.get(f"tailstream_model_loads_total{{outcome={o}}}", 0.0) > 0
               for o in ("loaded", "failed")):
            return
        time.sleep(0.25)


def open_catalogue(records: Iterable[ProducedRecord], s: Settings, worker: ManagedProcess,
                   ws: Settings, timeout: float = 600.0
                   ) -> tuple[Iterator[ProducedRecord], dict[str, Any]]:
    """Send the source's leading catalogue records and wait until the worker has applied
    and embedded them; return the records after them (the visits) and how long it took.

    A shop's catalogue exists before its visitors, and an item the worker has not embedded
    yet cannot be in a list: opening the shop on a cold index made the demo's first half
    minute of lists wait behind the embedding (docs/benchmarks.md). A worker that does not
    finish within ``timeout`` gets the visits anyway (logged)."""
    it = iter(records)
    items: list[ProducedRecord] = []
    first: list[ProducedRecord] = []
    for rec in it:
        if rec.kind != "item":
            first = [rec]
            break
        items.append(rec)
    started = time.monotonic()
    if items:
        log.info("sending the catalogue (%d items) before the shop opens …", len(items))
        send_records(items, s)
        if not wait_catalogue(worker, ws, len(items), timeout):
            log.warning("the catalogue was not indexed within %.0f s; opening anyway", timeout)
    return (itertools.chain(first, it),
            {"catalogue_records": len(items),
             "catalogue_indexed_s": round(time.monotonic() - started, 1)})


def wait_catalogue(worker: ManagedProcess, ws: Settings, n: int, timeout: float) -> bool:
    """Until the worker has applied (or dead-lettered) ``n`` catalogue records and, with the
    transformer scorer, has none left to embed. False on timeout or a dead worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.alive():
        m = _scrape_or_empty(metrics_url(ws))
        applied = m.get("tailstream_catalogue_updates_total", 0.0) + \
            m.get("tailstream_dlq_total", 0.0)
        embedded = ws.scorer != "transformer" or (
            m.get("tailstream_index_items", 0.0) > 0
            and m.get("tailstream_index_pending_items", 1.0) == 0)
        if applied >= n and embedded:
            return True
        time.sleep(0.25)
    return False


def _drain(ws: Settings, stats: SendStats, worker: Any, view: LiveView, started: float,
           timeout: float = 1800.0, stall_s: float = 30.0) -> None:
    """Wait until the worker has read every event produced, as long as it makes progress."""
    deadline = time.monotonic() + timeout
    last, last_change = -1.0, time.monotonic()
    while time.monotonic() < deadline and worker.alive():
        consumed = scrape(metrics_url(ws)).get("tailstream_events_in_total", 0.0)
        view.update(time.monotonic() - started, shop_open=False)
        if consumed >= stats.sent:
            time.sleep(1.0)  # let the last batch's lists reach the topic readers
            return
        if consumed != last:
            last, last_change = consumed, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            log.warning("worker stopped making progress at %d of %d events", consumed, stats.sent)
            return
        time.sleep(0.5)


def _settle_finetunes(ws: Settings, ts: Settings, view: LiveView, started: float) -> None:
    """Let a fine-tune that is still running finish, and the worker swap to what it
    promoted and refresh active users, so the summary reports whole runs."""
    deadline = time.monotonic() + run_allowance(ts) + 120.0 + ts.canary_window_s * 3
    while time.monotonic() < deadline:
        view.update(time.monotonic() - started, shop_open=False)
        t = _scrape_or_empty(trainer_metrics_url(ts))
        w = _scrape_or_empty(metrics_url(ws))
        running = t.get("tailstream_finetune_running", 0.0) > 0 or \
            t.get("tailstream_canary_running", 0.0) > 0
        promoted = t.get("tailstream_model_version_number", 0.0)
        serving = w.get("tailstream_serving_model_version_number", 0.0)
        refreshing = w.get("tailstream_refresh_pending_users", 0.0) > 0
        if not running and serving >= promoted and not refreshing:
            time.sleep(1.0)  # the refreshed lists reach the topic readers
            return
        time.sleep(0.5)
    log.warning("gave up waiting for the fine-tune to settle")


def _scrape_or_empty(url: str) -> dict[str, float]:
    try:
        return scrape(url)
    except (OSError, ValueError):
        return {}


def _summary(ws: Settings, ts: Settings | None, stats: SendStats, watcher: RecsWatcher,
             recs: TopicCounter, dlq: TopicCounter, view: LiveView,
             elapsed: float) -> dict[str, Any]:
    m = scrape(metrics_url(ws))
    t = _scrape_or_empty(trainer_metrics_url(ts)) if ts is not None else {}
    imbalance = fetch_json(f"http://{ws.web_host}:{ws.web_port}/imbalance")
    lat = watcher.latencies_ms
    by_class = {k: int(m.get(f"tailstream_events_processed_total{{kind={k}}}", 0))
                for k in EVENT_KINDS}
    during, outside = view.rates()
    return {
        "seconds": round(elapsed, 1),
        "events_produced": stats.sent,
        "events_by_kind": {k: v for k, v in stats.by_kind.items() if k != "item"},
        "catalogue_items_produced": stats.by_kind.get("item", 0),
        "events_consumed": int(m.get("tailstream_events_in_total", 0)),
        "events_processed": by_class,
        "duplicates": int(m.get("tailstream_duplicates_total", 0)),
        "malformed_injected": stats.malformed,
        "dlq": dlq.count,
        "recommendations_published": recs.count,
        "users_with_recs_in_redis": count_users_in_redis(ws),
        "model_versions_published": sorted(watcher.versions),
        "lists_by_model_version": dict(sorted(watcher.versions.items())),
        "lists_by_trigger": dict(sorted(watcher.triggers.items())),
        "serving_model_version": int(m.get("tailstream_serving_model_version_number", 0)),
        "latency_ms_p50": _round(percentile(lat, 50)),
        "latency_ms_p99": _round(percentile(lat, 99)),
        # Where it went (means over the run): a read that grows with the run is the
        # broker's fetches, a queue that grows is scoring falling behind.
        "latency_stages_ms": stage_ms(m),
        "event_loop_stalls": int(m.get("tailstream_event_loop_stalls_total", 0)),
        "events_per_s": round(int(m.get("tailstream_events_in_total", 0)) / max(elapsed, 1e-9), 1),
        "finetunes": {k: int(t.get(f"tailstream_finetune_runs_total{{outcome={k}}}", 0))
                      for k in ("promoted", "canary", "rejected", "failed", "skipped")}
                     | {"runs": int(t.get("tailstream_finetune_runs_total", 0))},
        "events_per_s_during_finetune": _round(during),
        "events_per_s_outside_finetune": _round(outside),
        "class_counts": imbalance["class_counts"],
        "class_shares": imbalance["class_shares"],
        "loss_weights": imbalance["loss_weights"],
        "buffer_sizes": imbalance["buffer_sizes"],
        "triggers_fired": imbalance["triggers_fired"],
        "drift_detections": imbalance["drift_detections"],
        "item_tiers": imbalance["item_tiers"],
        "online_model": imbalance["online"],
        "model": model_summary(ts or ws, m),
    }


def _served_decisions(store: ModelStore, version: str) -> dict[str, Any] | None:
    """The serving version's decision layer in brief (rule, window, offsets, and whether
    a rejected trigger refitted it; None for a version without one — the base model
    until a refresh)."""
    from tailstream.models.towers.loading import with_refreshed_decisions

    try:
        served = with_refreshed_decisions(
            store, version, store.manifest(version) if version != BASE_VERSION else {})
    except Exception:  # a summary must not fail on a store it cannot read
        return None
    layer = served.get("decisions")
    if not layer:
        return None
    return {**{k: layer.get(k) for k in ("rule", "objective", "fitted_on", "offsets")},
            "refreshed": "decisions_refreshed_at" in served}


def model_summary(s: Settings, worker_metrics: dict[str, float]) -> dict[str, Any]:
    """What the loop served and decided: the serving version and the policy it trained
    with, every gate decision (policy, promoted or not, why), the promotion count, the
    policies selection tried, the list mode and the blender's source weights."""
    from tailstream.models.towers.store import ModelStore

    store = ModelStore(s.model_store_dir)
    runs = read_jsonl(store.root / "runs.jsonl")
    decided = [r for r in runs if r.get("outcome") in ("promoted", "canary", "rejected")]
    canaries = {c.get("version"): c.get("verdict", {}).get("decision")
                for c in read_jsonl(store.root / "canaries.jsonl")}

    def promoted(r: dict[str, Any]) -> bool:
        return r.get("outcome") == "promoted" or (
            r.get("outcome") == "canary" and canaries.get(r.get("version")) == "promote")

    current = store.current()
    served_policy = next((r.get("policy") for r in reversed(runs)
                          if r.get("version") == current), None)
    layer = _served_decisions(store, current)
    return {
        "serving_version": current, "served_policy": served_policy or "base (untrained)",
        "served_decisions": layer,
        "decision_prior": {k.split("event_class=")[1].rstrip("}"): round(v, 4)
                           for k, v in worker_metrics.items()
                           if k.startswith("tailstream_decision_prior_ratio{")},
        "promotions": sum(promoted(r) for r in runs),
        "gate": [{"version": r.get("version"), "policy": r.get("policy"),
                  "promoted": promoted(r), "canary": r.get("outcome") == "canary",
                  "tried": [t.get("policy") for t in r.get("selection", {}).get("tried", [])],
                  "reason": str(r.get("reason", ""))[:200]} for r in decided],
        "ranking": s.rank_mode,
        "blend_rank1_weights": {k.split("source=")[1].rstrip("}"): round(v, 3)
                                for k, v in worker_metrics.items()
                                if k.startswith("tailstream_blend_weight{")},
        "blend_updates": {o: int(worker_metrics.get(
            f"tailstream_blend_updates_total{{outcome={o}}}", 0)) for o in ("hit", "miss")},
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none when it is missing; unreadable lines skipped)."""
    out: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def react_to_lists(records: Iterable[ProducedRecord], ws: Settings) -> Any:
    """Let the synthetic shop's users read their current lists from Redis (they sometimes
    take an item from them); returns the reader to close, or None (a replayed log cannot
    react: its events happened whatever was shown)."""
    from tailstream.stack.client import ListReader

    if not isinstance(records, ShopRecords) or records.sim.uptake <= 0 or not ws.redis_url:
        return None
    reader = ListReader(ws)
    records.sim.lists = reader
    return reader


def online_summary(ws: Settings, records: Iterable[ProducedRecord] | None = None
                   ) -> dict[str, Any]:
    """What the served lists did, every worker's (the versions' online figures in Redis):
    impressions (lists and items, by tier and version), interactions attributed to them
    (by class, tier, position and version), the online hit rate, CTR/CVR-like rates and
    the tail's shares, overall and by version."""
    from tailstream.streams.stores.impressions import OnlineFigures, read_online

    client = redis.Redis.from_url(ws.redis_url.reveal(), socket_timeout=5)
    try:
        figs = read_online(client, ws.redis_prefix)
    finally:
        client.close()
    total = OnlineFigures.total(figs.values()).to_dict()
    out: dict[str, Any] = {
        "impressions": {"lists": total["lists"], "items": sum(total["items_by_tier"].values()),
                        "by_tier": total["items_by_tier"],
                        "by_version": {v: f.lists for v, f in figs.items()}},
        "attributed": {"total": sum(total["attributed_by_class"].values()),
                       "by_class": total["attributed_by_class"],
                       "by_tier": total["attributed_by_tier"],
                       "by_position": total["attributed_by_position"],
                       "by_version": {v: dict(f.attributed) for v, f in figs.items()}},
        "judged_lists": total["judged"], "hit_rate": total["hit_rate"], "ctr": total["ctr"],
        "cvr": total["cvr"], "tail_share_of_impressions": total["tail_share"],
        "tail_share_of_conversions": total["tail_conversion_share"],
        "by_version": {v: {k: f.to_dict()[k] for k in ("lists", "judged", "hit_rate", "ctr",
                                                       "cvr", "tail_share")}
                       for v, f in figs.items()},
    }
    if isinstance(records, ShopRecords):
        out["shop"] = {"uptake": records.sim.uptake, "items_taken_from_lists": records.sim.taken}
    return out


def canary_summary(ts: Settings | None, ws: Settings) -> dict[str, Any]:
    """The canaries the trainer ran: how many started, were promoted, were rolled back,
    and each decision with its figures and reason."""
    from tailstream.models.towers.store import ModelStore

    t = _scrape_or_empty(trainer_metrics_url(ts)) if ts is not None else {}
    out: dict[str, Any] = {k: int(t.get(f"tailstream_canaries_total{{outcome={k}}}", 0))
                           for k in ("started", "promoted", "rolled_back")}
    out.update({"share": ws.canary_share, "window_s": ws.canary_window_s,
                "confidence": ws.canary_confidence, "min_lists": ws.canary_min_lists})
    out["decisions"] = [
        {"version": c.get("version"), "serving": c.get("serving"),
         **{k: c.get("verdict", {}).get(k) for k in (
             "decision", "code", "candidate_rate", "candidate_lists", "serving_rate",
             "serving_lists", "z", "p_value", "reason")}}
        for c in read_jsonl(ModelStore((ts or ws).model_store_dir).root / "canaries.jsonl")]
    # The trainer's counters were scraped while it ran; a canary it decided while shutting
    # down is only in the decisions file, so the counts also follow that file.
    decided = [d.get("decision") for d in out["decisions"]]
    out["promoted"] = max(out["promoted"], decided.count("promote"))
    out["rolled_back"] = max(out["rolled_back"], decided.count("roll_back"))
    out["started"] = max(out["started"], len(decided))
    return out


def _freshness(watcher: RecsWatcher, promotions: UpdatesWatcher, view: LiveView
               ) -> dict[str, Any]:
    """Latency during and outside fine-tunes, the model-update latency of each promotion
    (``model_update_s``: the slowest, trigger → first list), and the trainer's pauses."""
    during, outside = split_latencies(watcher.latencies_ms, watcher.published, view.spans)
    updates = model_updates(promotions.updates, watcher.first_list)
    firsts = [u["first_list_s"] for u in updates if u["first_list_s"] is not None]
    return {
        "latency_ms_p50_during_finetune": _round(percentile(during, 50)),
        "latency_ms_p99_during_finetune": _round(percentile(during, 99)),
        "latency_ms_p50_outside_finetune": _round(percentile(outside, 50)),
        "latency_ms_p99_outside_finetune": _round(percentile(outside, 99)),
        "lists_during_finetune": len(during),
        "finetune_seconds": round(sum(b - a for a, b in view.spans), 1),
        "finetune_paused_s": view.paused_s,
        "finetune_unhelpful_pauses": view.unhelpful_pauses,
        "model_update_s": max(firsts) if firsts else None,
        "model_updates": updates,
    }


def finetune_row(trainer: dict[str, float], running: bool, worker: dict[str, float]) -> str:
    """The live line's fine-tune figures: runs by outcome and the version served. A run the
    gate passes ends as ``canary`` when canaries are on (its promotion, if any, comes
    from the canary: the online row counts those), so "promoted" alone would read 0
    while a canary-promoted version serves.

    >>> finetune_row({"tailstream_finetune_runs_total{outcome=canary}": 2.0}, False,
    ...              {"tailstream_serving_model_version_number": 1.0})
    'promoted 0, to canary 2, rejected 0, failed 0; serving v1'
    """
    runs = {k: int(trainer.get(f"tailstream_finetune_runs_total{{outcome={k}}}", 0))
            for k in ("promoted", "canary", "rejected", "failed")}
    return (("running, " if running else "")
            + ", ".join(f"{'to canary' if k == 'canary' else k} {v}" for k, v in runs.items())
            + f"; serving v{int(worker.get('tailstream_serving_model_version_number', 0))}")


def fetch_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL
        return json.loads(resp.read())


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


class LiveView:
    """A log line every 5 s (quiet while the rich view of :mod:`tailstream.stack.liveview` runs).

    It also samples the consumed-events counter together with the trainer's "running"
    gauge, so the summary can compare events/s during fine-tunes with events/s outside
    them, measured in the same run — only while the shop sends (``shop_open``): after it
    closes, the drain and the settling fine-tunes read no events, and counting those
    seconds as "outside" made any rate during fine-tunes look ahead of them.
    """

    def __init__(self, ws: Settings, ts: Settings | None, watcher: RecsWatcher,
                 recs: TopicCounter, dlq: TopicCounter, *, ui: bool, source: str) -> None:
        self.ws, self.ts, self.watcher, self.recs, self.dlq = ws, ts, watcher, recs, dlq
        self.ui = ui
        self.source = source
        self._prev: tuple[float, float] | None = None
        self._last_log = 0.0
        # (seconds, events) accumulated while a fine-tune ran / while none did.
        self.during = [0.0, 0.0]
        self.outside = [0.0, 0.0]
        self.spans: list[list[float]] = []
        """Wall-clock [from, to] while the trainer said a fine-tune was running (each
        sample that saw it running covers the time since the sample before)."""
        self.paused_s: float | None = None
        self.unhelpful_pauses: int | None = None
        """Pauses that ran to their bound with the worker still over budget (each bought
        the fine-tune a run of steps: the trainer's duty floor)."""
        self._sampled_at: float | None = None

    def rates(self) -> tuple[float | None, float | None]:
        """Events/s while a fine-tune was running, and while none was (the shop open)."""
        return tuple(  # type: ignore[return-value]
            (n / sec if sec > 0 else None) for sec, n in (self.during, self.outside))

    def note_rate(self, elapsed: float, consumed: float, running: bool, shop_open: bool
                  ) -> float:
        """Count the events consumed since the last sample into the fine-tune's bucket
        or the other (only while the shop is open); returns the rate since then."""
        rate = 0.0
        if self._prev is not None and elapsed > self._prev[0]:
            rate = (consumed - self._prev[1]) / (elapsed - self._prev[0])
            if shop_open:
                bucket = self.during if running else self.outside
                bucket[0] += elapsed - self._prev[0]
                bucket[1] += consumed - self._prev[1]
        self._prev = (elapsed, consumed)
        return rate

    def update(self, elapsed: float, shop_open: bool = True) -> None:
        try:
            m = scrape(metrics_url(self.ws))
        except OSError:
            return
        t = _scrape_or_empty(trainer_metrics_url(self.ts)) if self.ts is not None else {}
        running = t.get("tailstream_finetune_running", 0.0) > 0
        self._note_finetune(running, t)
        consumed = m.get("tailstream_events_in_total", 0.0)
        rate = self.note_rate(elapsed, consumed, running, shop_open)
        lat = self.watcher.latencies_ms[-5000:]
        rows = [
            ("source", self.source),
            ("elapsed", f"{elapsed:6.1f} s"),
            ("events consumed", f"{int(consumed):,} ({rate:,.0f}/s)"),
            ("by class", ", ".join(
                f"{k} {int(m.get(f'tailstream_events_processed_total{{kind={k}}}', 0)):,}"
                for k in EVENT_KINDS)),
            ("loss weights", ", ".join(
                f"{k} {m.get(f'tailstream_loss_weight_ratio{{event_class={k}}}', 0):.2f}"
                for k in CLASSES)),
            ("buffer", ", ".join(
                f"{k} {int(m.get(f'tailstream_buffer_samples{{bucket={k}}}', 0)):,}"
                for k in (*RARE_CLASSES, TAIL))),
            ("fine-tunes", finetune_row(t, running, m)),
            ("items indexed", f"{int(m.get('tailstream_index_items', 0)):,}"),
            ("dead-lettered", f"{self.dlq.count:,}"),
            ("duplicates skipped", f"{int(m.get('tailstream_duplicates_total', 0)):,}"),
            ("lists published", f"{self.recs.count:,} for {len(self.watcher.users):,} users"),
            ("latency event→Redis", f"p50 {percentile(lat, 50) or 0:.0f} ms, "
                                    f"p99 {percentile(lat, 99) or 0:.0f} ms"),
            ("online", _online_row(m, t)),
            ("metrics", metrics_url(self.ws)),
        ]
        if elapsed - self._last_log >= 5:
            self._last_log = elapsed
            log.info(" | ".join(f"{k}: {v}" for k, v in rows[1:]
                                if k not in ("by class", "metrics")))

    def _note_finetune(self, running: bool, trainer: dict[str, float]) -> None:
        now = time.time()
        if running:
            start = self._sampled_at if self._sampled_at is not None else now
            if self.spans and self.spans[-1][1] == self._sampled_at:
                self.spans[-1][1] = now
            else:
                self.spans.append([start, now])
        self._sampled_at = now
        paused = trainer.get("tailstream_trainer_paused_seconds_total")
        if paused is not None:
            self.paused_s = round(paused, 1)
        unhelpful = trainer.get("tailstream_trainer_unhelpful_pauses_total")
        if unhelpful is not None:
            self.unhelpful_pauses = int(unhelpful)

    def close(self) -> None:
        """Nothing to release (kept for symmetry with the callers' try/finally)."""


@dataclass
class ShopRecords:
    """The synthetic shop's records (its catalogue, then endless visits), with the shop
    itself at hand: :func:`react_to_lists` gives it the users' lists once Redis is up."""

    sim: Any

    def __iter__(self) -> Iterator[ProducedRecord]:
        return itertools.chain(self.sim.catalogue(), self.sim.events())


def synthetic_records(n_users: int, n_items: int, seed: int, malformed_every: int,
                      uptake: float = 0.0) -> ShopRecords:
    from tailstream.producers.synthetic import ShopSimulator

    return ShopRecords(ShopSimulator(n_users=n_users, n_items=n_items, seed=seed,
                                     malformed_every=malformed_every, uptake=uptake))
