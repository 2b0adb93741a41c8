"""The terminal view's math and rendering, from metrics pages a real registry writes."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tailstream.metrics import Metrics, TrainerMetrics
from tailstream.stack.liveview import (
    LATENCY,
    LiveMonitor,
    bucket_delta,
    build_view,
    histogram_buckets,
    histogram_quantile,
    merge,
    parse_metrics,
    rate,
    render_text,
    ui_wanted,
)


def page(m: Metrics | TrainerMetrics) -> str:
    return generate_latest(m.registry).decode()


def worker_metrics() -> Metrics:
    """A worker registry as it looks after a while: events, lists, DLQ, loop state."""
    m = Metrics(CollectorRegistry())
    for kind, n in {"click": 800, "cart": 60, "fav": 40, "purchase": 20, "search": 80}.items():
        m.events_in.labels(kind).inc(n)
        m.events_processed.labels(kind).inc(n)
    m.dlq.labels("invalid_json").inc(3)
    m.dlq.labels("missing_field").inc(2)
    m.recs_published.labels("redis", "event").inc(500)
    m.recs_published.labels("kafka", "event").inc(500)
    for kind, share in {"click": 0.8, "cart": 0.06, "fav": 0.04, "purchase": 0.02,
                        "search": 0.08}.items():
        m.class_share.labels(kind).set(share)
    for kind, w in {"click": 0.25, "cart": 1.5, "fav": 1.75, "purchase": 3.5}.items():
        m.loss_weight.labels(kind, "class_balanced").set(w)
    for bucket, n in {"cart": 60, "fav": 40, "purchase": 20, "tail": 123}.items():
        m.buffer_samples.labels(bucket).set(n)
    m.consumer_lag.labels("clicks", "0").set(7)
    m.consumer_lag.labels("carts", "0").set(5)
    m.assigned_partitions.set(5)
    m.serving_version.set(2)
    m.triggers.labels("buffer").inc(3)
    return m


# ------------------------------------------------------------------ rates
def test_rates_come_from_the_difference_of_two_snapshots() -> None:
    m = worker_metrics()
    before = parse_metrics(page(m))
    m.events_in.labels("click").inc(100)
    m.events_processed.labels("click").inc(100)
    m.events_processed.labels("purchase").inc(4)
    m.events_in.labels("purchase").inc(4)
    m.recs_published.labels("redis", "event").inc(50)
    after = parse_metrics(page(m))

    assert rate(after, before, "tailstream_events_in_total", 2.0) == pytest.approx(52.0)
    view = build_view(after, before, 2.0)
    per_s = {row.name: row.per_s for row in view.classes}
    assert per_s == {"click": 50.0, "cart": 0.0, "fav": 0.0, "purchase": 2.0, "search": 0.0}
    assert view.events_in_per_s == pytest.approx(52.0)
    assert view.recs_per_s == pytest.approx(25.0)  # the redis sink only, not kafka too
    assert view.recs_total == 550
    assert view.window_s == 2.0


def test_no_rate_without_an_earlier_snapshot_and_a_reset_counter_counts_from_zero() -> None:
    cur = {"e_total": 40.0}
    assert rate(cur, None, "e_total", 1.0) is None
    assert rate(cur, {"e_total": 10.0}, "e_total", 0.0) is None
    assert rate(cur, {"e_total": 1000.0}, "e_total", 4.0) == 10.0  # worker restarted
    view = build_view(parse_metrics(page(worker_metrics())))
    assert view.events_in_per_s is None and view.window_s is None
    assert all(row.per_s is None for row in view.classes)


# ------------------------------------------------------------------ percentiles
def test_histogram_percentiles_from_cumulative_buckets() -> None:
    m = Metrics(CollectorRegistry())
    # 100 observations: 50 in (0.075, 0.1], 40 in (0.1, 0.15], 10 in (0.25, 0.3].
    for _ in range(50):
        m.rec_latency.labels("event").observe(0.09)
    for _ in range(40):
        m.rec_latency.labels("event").observe(0.12)
    for _ in range(10):
        m.rec_latency.labels("promotion").observe(0.3)  # another label: summed in
    buckets = histogram_buckets(parse_metrics(page(m)), LATENCY)
    assert buckets[-1] == (math.inf, 100.0)
    assert dict(buckets)[0.1] == 50.0 and dict(buckets)[0.15] == 90.0
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    # rank 99 lies in (0.25, 0.3], 9 of its 10: 0.25 + 0.05 * 9/10
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.295)
    # rank 70: (0.1, 0.15], 20 of 40 → 0.125
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.125)


def test_quantile_edge_cases() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    # all above the last finite bound: the bound (PromQL does the same)
    assert histogram_quantile(0.99, [(0.5, 0.0), (10.0, 0.0), (math.inf, 7.0)]) == 10.0
    # the first bucket starts at 0
    assert histogram_quantile(0.5, [(0.2, 4.0), (math.inf, 4.0)]) == pytest.approx(0.1)


def test_recent_latency_uses_only_the_observations_between_the_snapshots() -> None:
    m = Metrics(CollectorRegistry())
    for _ in range(1000):
        m.rec_latency.labels("event").observe(0.004)  # fast at first
    before = parse_metrics(page(m))
    for _ in range(10):
        m.rec_latency.labels("event").observe(2.0)  # then slow
    after = parse_metrics(page(m))
    view = build_view(after, before, 5.0)
    assert view.latency_p50_ms == pytest.approx(2500.0 * 0.5 + 1000.0 * 0.5)  # (1, 2.5]
    for _ in range(100):
        m.rec_latency.labels("event").observe(30.0)  # beyond the last bound (10 s)
    text = render_text(build_view(parse_metrics(page(m)), after, 5.0))
    assert ("p50 ≥10,000 ms, p99 ≥10,000 ms recently; since start p50 3 ms, "
            "p99 ≥10,000 ms") in text, text
    assert view.latency_all_p50_ms == pytest.approx(2.525)  # rank 505 of 1000 in (0, 5 ms]
    assert bucket_delta([(0.1, 1.0), (math.inf, 2.0)], [(0.1, 5.0), (math.inf, 9.0)]) == [
        (0.1, 1.0), (math.inf, 2.0)]  # reset: all of the current histogram


# ------------------------------------------------------------------ view and rendering
def test_rendering_a_snapshot_shows_its_numbers() -> None:
    m = worker_metrics()
    for _ in range(98):
        m.rec_latency.labels("event").observe(0.04)
    for _ in range(2):
        m.rec_latency.labels("event").observe(0.9)
    before = parse_metrics(page(m))
    m.events_processed.labels("cart").inc(30)
    m.events_in.labels("cart").inc(30)
    m.recs_published.labels("redis", "event").inc(12)
    after = parse_metrics(page(m))
    t = TrainerMetrics(CollectorRegistry())
    t.runs.labels("promoted").inc(2)
    t.runs.labels("rejected").inc(1)
    t.runs.labels("canary").inc(1)  # passed the gate; the canary decides the promotion
    t.version.set(3)
    t.running.set(1)
    view = build_view(after, before, 10.0, trainer=parse_metrics(page(t)), title="test view",
                      uptime_s=42)
    text = render_text(view)
    print(text)
    row = next(line for line in text.splitlines() if line.strip("│┃ ").startswith("cart"))
    assert all(x in row for x in ("3.0", "90", "6.0%", "1.50", "60")), row
    purchase = next(line for line in text.splitlines() if "purchase" in line)
    assert "3.50" in purchase and "2.0%" in purchase
    assert "class_balanced" in text
    assert "123" in text  # tail items in the buffer
    assert "1.2 lists/s (last 10 s)" in text and "512 in all" in text
    # p50: rank 50 of 98 in (25, 50 ms] → 37.8; p99: rank 99, 1 of 2 in (0.75, 1 s] → 875
    assert "since start p50 38 ms, p99 875 ms" in text
    assert "p50 — ms, p99 — ms recently" in text  # no lists in the last 10 s
    assert "runs 4: promoted 2, to canary 1, rejected 1, failed 0, running now; 3 requested" in text
    assert "serving v2, promoted v3" in text
    assert "5  (invalid_json 3, missing_field 2)" in text
    assert "12 messages on 5 partitions" in text
    assert "test view" in text and "up 42 s" in text


def test_view_before_any_worker_answers() -> None:
    text = render_text(build_view(None, status="waiting for the worker's /metrics …"))
    assert "waiting for the worker" in text
    assert "no trainer running" in text
    assert "serving v?" in text


def test_merging_workers_adds_counters_and_averages_shares() -> None:
    a, b = worker_metrics(), worker_metrics()
    b.class_share.labels("click").set(0.7)
    b.serving_version.set(1)
    snap = merge([parse_metrics(page(a)), parse_metrics(page(b))])
    assert snap["tailstream_events_in_total"] == 2000
    assert snap["tailstream_class_share_ratio{event_class=click}"] == pytest.approx(0.75)
    assert snap["tailstream_serving_model_version_number"] == 1
    assert snap["tailstream_consumer_lag_messages"] == 24


def test_ui_default_follows_the_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert ui_wanted(None, Tty()) is True
    assert ui_wanted(None, io.StringIO()) is False
    assert ui_wanted(False, Tty()) is False
    assert ui_wanted(True, io.StringIO()) is True


# ------------------------------------------------------------------ the refresh loop
@pytest.fixture()
def metrics_server() -> Iterator[tuple[str, Metrics]]:
    m = worker_metrics()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = generate_latest(m.registry)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", m
    finally:
        server.shutdown()
        server.server_close()


def test_monitor_scrapes_a_metrics_page_and_draws_it(
        metrics_server: tuple[str, Metrics]) -> None:
    from rich.console import Console

    url, m = metrics_server
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    monitor = LiveMonitor([url], "http://127.0.0.1:9/metrics", console=console,
                          interval=0.05, window_s=60)
    first = monitor.poll()
    assert first.events_in_total == 1000 and first.events_in_per_s is None
    assert not first.trainer  # nothing listens on port 9
    m.events_in.labels("click").inc(500)
    second = monitor.poll()
    assert second.window_s is not None and second.events_in_per_s is not None
    assert second.events_in_per_s == pytest.approx(500 / second.window_s)
    with monitor:
        threading.Event().wait(0.2)
    assert "1,500 in all" in out.getvalue()
    assert "invalid_json 3" in out.getvalue()


def test_monitor_keeps_the_last_figures_when_the_worker_stops_answering(
        metrics_server: tuple[str, Metrics]) -> None:
    url, _ = metrics_server
    monitor = LiveMonitor([url])
    assert monitor.poll().events_in_total == 1000
    monitor.worker_urls = ["http://127.0.0.1:9/metrics"]  # as after the worker stopped
    last = monitor.poll()
    assert last.events_in_total == 1000
    assert "not answering" in last.status
    assert "1,000 in all" in render_text(last)
    fresh = LiveMonitor(["http://127.0.0.1:9/metrics"]).poll()
    assert fresh.status.startswith("waiting") and fresh.events_in_total == 0
