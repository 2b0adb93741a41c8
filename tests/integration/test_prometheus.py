"""A real Prometheus server scrapes a real worker; the deploy/ queries run against it.

The server (Debian's ``prometheus`` binary) is started once per session on a free loopback
port with its own data folder, scraping every 1 s the targets written to a file_sd file,
and loading deploy/prometheus/alerts.yml. Skipped, naming the binary, where it is missing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.client import ListReader
from tailstream.stack.embedded import ManagedProcess, free_port

from .conftest import poll

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS_YML = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tailstream.json"
JOB = "tailstream-worker"
INTERACTIONS = ("click", "cart", "fav", "purchase")

T = TypeVar("T")


class PrometheusServer:
    """A running Prometheus with a file_sd target list the tests rewrite."""

    def __init__(self, proc: ManagedProcess, url: str, targets_file: Path) -> None:
        self.proc = proc
        self.url = url
        self.targets_file = targets_file

    def set_targets(self, targets: list[str]) -> None:
        """Scrape these ``host:port`` targets as job tailstream-worker (atomic rewrite)."""
        tmp = self.targets_file.with_name(".targets.tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": {}}]))
        os.replace(tmp, self.targets_file)

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad query, with the reason
            body = json.loads(exc.read())
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: "
                                 f"{body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data["resultType"]
        return list(data["result"])

    def values(self, promql: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(promql)}

    def wait(self, what: str, check: Callable[[], T | None], timeout: float = 90.0) -> T:
        """:func:`poll` ``check`` (a query: errors while series are missing count as not
        yet), failing with the server's log tail after ``timeout`` s."""
        return poll(check, timeout, what, 0.5,
                    ignore=(AssertionError, urllib.error.URLError, OSError),
                    detail=lambda: f"prometheus log:\n{self.proc.tail(20)}")


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None)
    if found is None:
        pytest.skip("prometheus binary not installed (Debian package `prometheus`; "
                    "run .ci/install-services)")
    return found


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    binary = _prometheus_binary()
    home = tmp_path_factory.mktemp("prometheus")
    targets = home / "targets.json"
    targets.write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_YML)],
        "scrape_configs": [{"job_name": JOB,
                            "file_sd_configs": [{"files": [str(targets)],
                                                 "refresh_interval": "1s"}]}],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = ManagedProcess("prometheus", [
        binary, f"--config.file={home / 'prometheus.yml'}",
        f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
        "--log.level=warn",
    ], home / "prometheus.log")
    server = PrometheusServer(proc, f"http://127.0.0.1:{port}", targets)
    try:
        deadline = time.monotonic() + 60
        while True:
            if not proc.alive():
                raise RuntimeError(f"prometheus exited during start:\n{proc.tail(40)}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready after 60 s:\n{proc.tail(40)}")
            time.sleep(0.2)
        yield server
    finally:
        proc.stop()
        assert not proc.alive()


def dashboard_exprs(rate_interval: str) -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []
    stack = list(dash["panels"])
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels") or [])
        for target in panel.get("targets", []):
            out.append((panel["title"],
                        target["expr"].replace("$__rate_interval", rate_interval)))
    return out


def test_every_dashboard_and_alert_query_evaluates(prometheus: PrometheusServer) -> None:
    """Real PromQL engine: every query parses and evaluates (empty results are fine here)."""
    exprs = dashboard_exprs("1m")
    exprs += [(r["alert"], r["expr"]) for g in yaml.safe_load(ALERTS_YML.read_text())["groups"]
              for r in g["rules"]]
    assert len(exprs) > 15
    errors = []
    for title, expr in exprs:
        try:
            prometheus.query(expr)
        except AssertionError as exc:
            errors.append(f"{title}: {exc}")
    assert not errors, "\n".join(errors)


def test_prometheus_scrapes_a_running_worker(
        prometheus: PrometheusServer, worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = worker
    target = f"{ws.web_host}:{ws.web_port}"
    prometheus.set_targets([target])
    # Scraped at least once before any event, so counters have a zero to rise from
    # (rate() needs two samples).
    prometheus.wait("the idle worker scraped",
                    lambda: prometheus.values(f'up{{job="{JOB}"}} == 1', "instance").get(target),
                    timeout=30)
    sim = ShopSimulator(n_users=200, n_items=400, seed=21)
    stats = send_records(itertools.islice(sim.events(), 3000), ws)
    assert stats.sent == 3000
    # Then the shop's users see their lists (read from Redis) and sometimes take an item
    # from them: impressions, judged lists and attributed interactions.
    sim.uptake, sim.lists = 0.6, ListReader(ws)
    try:
        more = send_records(itertools.islice(sim.events(), 1500), ws, rate=300.0)
    finally:
        sim.lists.close()
    stats.sent += more.sent
    for kind, n in more.by_kind.items():
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + n

    # Prometheus reads back every event the worker counted, and at least ten distinct
    # tailstream metrics with non-zero values.
    def everything_scraped() -> set[str] | None:
        total = prometheus.query(f'sum(tailstream_events_in_total{{job="{JOB}"}})')
        if not total or float(total[0]["value"][1]) < stats.sent:
            return None
        # _created series are timestamps, not measurements: not counted.
        series = prometheus.query(
            f'{{__name__=~"tailstream_.+", __name__!~".+_created", job="{JOB}"}} != 0')
        names = {s["metric"]["__name__"] for s in series}
        return names if len(names) >= 10 else None

    started = time.monotonic()
    names = prometheus.wait("all events and 10 non-zero tailstream metrics in Prometheus",
                            everything_scraped)
    print(f"\n{len(names)} non-zero tailstream metrics read back from Prometheus after "
          f"{time.monotonic() - started:.1f} s: {sorted(names)}")

    up = prometheus.values(f'up{{job="{JOB}"}}', "instance")
    assert up == {target: 1.0}
    events = prometheus.values("sum by (kind) (tailstream_events_in_total)", "kind")
    assert sum(events.values()) == stats.sent
    for kind, sent in stats.by_kind.items():
        if kind != "item":  # catalogue records are not events
            assert events.get(kind, 0) == sent, (kind, events)
    processed = prometheus.values("sum by (kind) (tailstream_events_processed_total)", "kind")
    assert all(processed.get(k, 0) > 0 for k in INTERACTIONS), processed

    weights = prometheus.values("avg by (event_class) (tailstream_loss_weight_ratio)",
                                "event_class")
    assert set(INTERACTIONS) <= set(weights), weights
    assert all(weights[k] > 0 for k in INTERACTIONS), weights
    assert weights["purchase"] > weights["click"], weights  # the minority weighs more
    shares = prometheus.values("avg by (event_class) (tailstream_class_share_ratio)",
                               "event_class")
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert shares["click"] > shares["purchase"] > 0

    # The dashboard's panels have data: rates, latency quantiles, tier shares that add up
    # to one. (A 5 min window: the events were sent in a burst, maybe a minute ago.)
    panels: dict[str, str] = {}
    for title, expr in dashboard_exprs("5m"):
        panels.setdefault(title, expr)  # a panel's first query

    def has_rates() -> dict[str, float] | None:
        rates = prometheus.values(panels["Events/s by class"], "kind")
        return rates if rates.get("click", 0) > 0 else None

    prometheus.wait("events/s by class", has_rates)
    (p50_expr, p99_expr) = [e for t, e in dashboard_exprs("5m")
                            if t == "Recommendation latency p50 / p99"]
    def finite(expr: str) -> list[dict[str, Any]] | None:
        found = prometheus.query(expr)
        return found if found and math.isfinite(float(found[0]["value"][1])) else None

    p50 = prometheus.wait("latency p50", lambda: finite(p50_expr))
    p99 = prometheus.wait("latency p99", lambda: finite(p99_expr))
    assert 0 < float(p50[0]["value"][1]) <= float(p99[0]["value"][1])
    def finite_shares() -> dict[str, float] | None:
        # A ratio of rates reads NaN (0/0) while its series have fewer than two samples
        # that differ in the window: wait for real shares (a fresh-clone suite once read
        # NaN for every tier).
        shares = prometheus.values(panels["Tail exposure share"], "tier")
        return shares if shares and all(map(math.isfinite, shares.values())) else None

    tiers = prometheus.wait("tail exposure share", finite_shares)
    assert sum(tiers.values()) == pytest.approx(1.0, abs=1e-6), tiers

    # The online attribution's series are scraped, and its panels have data.
    def positive(name: str) -> float | None:
        value = prometheus.values(f"sum({name})", "").get("")
        return value if value else None

    online = {name: prometheus.wait(name, lambda name=name: positive(name))
              for name in ("tailstream_impression_lists_total", "tailstream_impressions_total",
                     "tailstream_judged_lists_total", "tailstream_attributed_total",
                     "tailstream_attributed_position_total",
                     "tailstream_tail_exposure_target_ratio")}
    print(f"online series: {online}, items taken from lists: {sim.taken}")
    assert online["tailstream_impressions_total"] >= online["tailstream_impression_lists_total"]
    assert online["tailstream_attributed_total"] > 0 and sim.taken > 0
    def some_finite(expr: str) -> list[float] | None:
        values = [float(r["value"][1]) for r in prometheus.query(expr)]
        return [v for v in values if math.isfinite(v)] or None

    for title in ("Online HitRate of served lists", "Attributed interactions by class",
                  "Tail: share of impressions (SLO) and of attributed conversions",
                  "CTR / CVR of served lists", "Impressions by version and arm"):
        found = prometheus.wait(title, lambda title=title: some_finite(panels[title]))
        assert all(v >= 0 for v in found), (title, found)

    # Every alert rule evaluates without error on real series.
    def rules_evaluated() -> list[dict[str, Any]] | None:
        rules = [r for g in prometheus.api("/api/v1/rules")["groups"] for r in g["rules"]]
        done = all(r.get("lastEvaluation", "").startswith("2") for r in rules)
        return rules if rules and done else None

    rules = prometheus.wait("alert rules evaluated", rules_evaluated, timeout=30)
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad
