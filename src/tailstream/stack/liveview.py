"""The terminal view of ``tailstream up`` and ``tailstream demo``.

It knows the system only through the Prometheus ``/metrics`` pages of the workers (and
of the trainer, when one runs): every refresh scrapes them into a flat *snapshot*
(``{"name": value, "name{label=value}": value, ...}``), and pure functions turn the
current snapshot, an earlier one and the seconds between them into a :class:`View`
(rates, shares, histogram percentiles), which :func:`render` draws with rich.
:class:`LiveMonitor` is the refresh loop (a thread driving a ``rich.live.Live``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from tailstream.contract import EVENT_KINDS

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from tailstream.settings import Settings

Snapshot = Mapping[str, float]

LATENCY = "tailstream_recommendation_latency_seconds"


# --------------------------------------------------------------------------- snapshots
def parse_metrics(text: str) -> dict[str, float]:
    """Flatten a Prometheus text page: every sample summed by name, by ``name{label=value}``
    for each of its labels, and histogram buckets by ``name_bucket{le=bound}`` (summed over
    their other labels). The same keys as :func:`tailstream.stack.processes.scrape`, plus ``le``.

    >>> page = '''# TYPE lat_seconds histogram
    ... lat_seconds_bucket{trigger="event",le="0.1"} 3.0
    ... lat_seconds_bucket{trigger="event",le="+Inf"} 4.0
    ... lat_seconds_bucket{trigger="ttl",le="0.1"} 1.0
    ... lat_seconds_bucket{trigger="ttl",le="+Inf"} 1.0
    ... '''
    >>> snap = parse_metrics(page)
    >>> snap["lat_seconds_bucket{le=0.1}"], snap["lat_seconds_bucket{le=+Inf}"]
    (4.0, 5.0)
    """
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] += sample.value
            for label, value in sample.labels.items():
                out[f"{sample.name}{{{label}={value}}}"] += sample.value
    return dict(out)


def scrape_snapshot(url: str, timeout: float = 2.0) -> dict[str, float]:
    """GET ``url`` (a ``/metrics`` page) and :func:`parse_metrics` it."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL
        return parse_metrics(resp.read().decode())


def merge(snapshots: Sequence[Snapshot]) -> dict[str, float]:
    """One snapshot for several workers: counters, histograms and per-worker gauges add
    up; ``*_ratio`` gauges (shares, weights) are averaged; model versions take the lowest
    (the version every worker serves).

    >>> merge([{"a_total": 2, "x_ratio": 0.2, "v_version_number": 3},
    ...        {"a_total": 3, "x_ratio": 0.4, "v_version_number": 2}])
    {'a_total': 5, 'x_ratio': 0.30000000000000004, 'v_version_number': 2}
    """
    if len(snapshots) == 1:
        return dict(snapshots[0])
    keys: dict[str, list[float]] = defaultdict(list)
    for snap in snapshots:
        for k, v in snap.items():
            keys[k].append(v)
    out: dict[str, float] = {}
    for k, values in keys.items():
        name = k.split("{", 1)[0]
        if name.endswith("_version_number"):
            out[k] = min(values)
        elif name.endswith("_ratio"):
            out[k] = sum(values) / len(values)
        else:
            out[k] = sum(values)
    return out


def labelled(snap: Snapshot, name: str, label: str) -> dict[str, float]:
    """The values of ``name`` by one label, from a snapshot's ``name{label=value}`` keys.

    >>> labelled({"m_total": 3, "m_total{reason=a}": 1, "m_total{reason=b}": 2,
    ...           "m_total{sink=x}": 3}, "m_total", "reason")
    {'a': 1, 'b': 2}
    """
    prefix = f"{name}{{{label}="
    return {k[len(prefix):-1]: v for k, v in snap.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- the math
def counter_delta(cur: float, prev: float | None) -> float:
    """Increase of a counter; a counter that went down was reset (process restart), so
    all of its current value is new (Prometheus' ``rate`` does the same).

    >>> counter_delta(15, 10), counter_delta(4, 10), counter_delta(7, None)
    (5, 4, 7)
    """
    if prev is None or cur < prev:
        return cur
    return cur - prev


def rate(cur: Snapshot, prev: Snapshot | None, key: str, seconds: float) -> float | None:
    """Per-second increase of the counter ``key`` between two snapshots ``seconds`` apart;
    None without an earlier snapshot or elapsed time.

    >>> rate({"e_total": 130.0}, {"e_total": 100.0}, "e_total", 2.0)
    15.0
    >>> rate({"e_total": 130.0}, None, "e_total", 2.0) is None
    True
    """
    if prev is None or seconds <= 0:
        return None
    return counter_delta(cur.get(key, 0.0), prev.get(key, 0.0)) / seconds


def histogram_buckets(snap: Snapshot, name: str) -> list[tuple[float, float]]:
    """``(upper bound, cumulative count)`` of histogram ``name``, by bound (+Inf last).

    >>> histogram_buckets({"h_bucket{le=+Inf}": 5, "h_bucket{le=0.5}": 4,
    ...                    "h_bucket{le=0.1}": 1}, "h")
    [(0.1, 1), (0.5, 4), (inf, 5)]
    """
    out = [(float(le), n) for le, n in labelled(snap, f"{name}_bucket", "le").items()]
    return sorted(out)


def bucket_delta(cur: Sequence[tuple[float, float]],
                 prev: Sequence[tuple[float, float]] | None) -> list[tuple[float, float]]:
    """The buckets of the observations made between two snapshots (all of ``cur`` if the
    histogram was reset in between).

    >>> bucket_delta([(0.1, 5), (math.inf, 9)], [(0.1, 2), (math.inf, 3)])
    [(0.1, 3), (inf, 6)]
    """
    if not prev:
        return list(cur)
    before = dict(prev)
    delta = [(le, n - before.get(le, 0.0)) for le, n in cur]
    if any(n < 0 for _, n in delta):
        return list(cur)
    return delta


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1) of a histogram from its cumulative buckets, interpolated
    linearly inside the bucket that holds it, like PromQL's ``histogram_quantile``: the
    lowest bucket starts at 0, and a quantile in the +Inf bucket is the highest finite
    bound. None when the histogram holds no observations.

    >>> b = [(0.1, 50.0), (0.5, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    >>> histogram_quantile(0.5, b)
    0.1
    >>> round(histogram_quantile(0.7, b), 3)
    0.3
    >>> histogram_quantile(0.99, b)
    0.95
    >>> histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    True
    """
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0 or math.isnan(total):
        return None
    target = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= target and count > lower_count:
            if math.isinf(bound):
                return lower_bound  # the highest finite bound
            if bound <= 0:
                return bound
            return lower_bound + (bound - lower_bound) * (target - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


# --------------------------------------------------------------------------- view model
@dataclass(frozen=True)
class ClassRow:
    name: str
    per_s: float | None
    total: float
    share: float | None
    weight: float | None
    buffer: float | None


@dataclass(frozen=True)
class View:
    """Everything the terminal view shows; None means "not known (yet)"."""

    title: str
    uptime_s: float
    window_s: float | None
    status: str
    classes: list[ClassRow]
    policy: str | None
    tail_buffer: float | None
    events_in_total: float
    events_in_per_s: float | None
    recs_total: float
    recs_per_s: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_all_p50_ms: float | None
    latency_all_p99_ms: float | None
    dlq_total: float
    dlq_by_reason: dict[str, float]
    lag: float | None
    partitions: float | None
    serving_version: int | None
    finetune_requests: float | None
    trainer: bool
    finetune_running: bool = False
    finetune_runs: float = 0.0
    finetune_outcomes: dict[str, float] = field(default_factory=dict)
    promoted_version: int | None = None
    latency_top_ms: float | None = None
    """The histogram's highest finite bound: a percentile there may be anything above."""
    latency_during_ms: tuple[float | None, float | None] = (None, None)
    """(p50, p99) of the lists published while a fine-tune ran, since the view started."""
    latency_outside_ms: tuple[float | None, float | None] = (None, None)
    """(p50, p99) of the lists published while none ran."""
    model_update_s: float | None = None
    """The last promotion's trigger → first list with the new version (worker's gauge)."""
    finetune_paused_s: float | None = None
    """Seconds fine-tunes paused for the workers (back-pressure)."""
    online: OnlineView | None = None
    """Impressions and what was attributed to them (None: no worker answered yet)."""


@dataclass(frozen=True)
class OnlineView:
    """The online attribution of served lists and the canary, as the view shows them."""

    lists_total: float = 0.0
    lists_per_s: float | None = None
    judged: float = 0.0
    hits: float = 0.0
    attributed: dict[str, float] = field(default_factory=dict)
    tail_share: float | None = None
    """Tail items' share of the list slots served (all time)."""
    tail_target: float | None = None
    hit_rate_by_role: dict[str, float] = field(default_factory=dict)
    """The trainer's figures (every worker's): serving, previous, canary."""
    canary_version: int | None = None
    canary_share: float | None = None
    canaries: dict[str, float] = field(default_factory=dict)
    """Canaries by outcome: started, promoted, rolled_back."""

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.judged if self.judged else None


def online_view(c: Snapshot, prev: Snapshot | None, seconds: float,
                trainer: Snapshot | None) -> OnlineView:
    """The online rows' figures from the workers' (merged) and the trainer's snapshots.

    >>> v = online_view({"tailstream_impression_lists_total": 10,
    ...                  "tailstream_judged_lists_total{outcome=hit}": 3,
    ...                  "tailstream_judged_lists_total{outcome=miss}": 9,
    ...                  "tailstream_impressions_total{tier=tail}": 30,
    ...                  "tailstream_impressions_total{tier=head}": 70,
    ...                  "tailstream_attributed_total{class=click}": 4}, None, 0.0, None)
    >>> v.hit_rate, v.tail_share, v.attributed
    (0.25, 0.3, {'click': 4})
    """
    t = trainer or {}
    outcomes = labelled(c, "tailstream_judged_lists_total", "outcome")
    tiers = labelled(c, "tailstream_impressions_total", "tier")
    slots = sum(tiers.values())
    version = t.get("tailstream_canary_model_version_number") or \
        c.get("tailstream_canary_model_version_number")
    return OnlineView(
        lists_total=c.get("tailstream_impression_lists_total", 0.0),
        lists_per_s=rate(c, prev, "tailstream_impression_lists_total", seconds),
        judged=sum(outcomes.values()), hits=outcomes.get("hit", 0.0),
        attributed=labelled(c, "tailstream_attributed_total", "class"),
        tail_share=tiers.get("tail", 0.0) / slots if slots else None,
        tail_target=c.get("tailstream_tail_exposure_target_ratio"),
        hit_rate_by_role=labelled(t, "tailstream_online_hit_rate_ratio", "role"),
        canary_version=int(version) if version else None,
        canary_share=c.get("tailstream_canary_share_ratio"),
        canaries=labelled(t, "tailstream_canaries_total", "outcome"))


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000.0 * x


def _quantiles_ms(buckets: Sequence[tuple[float, float]] | None
                  ) -> tuple[float | None, float | None]:
    if not buckets:
        return (None, None)
    return (_ms(histogram_quantile(0.5, buckets)), _ms(histogram_quantile(0.99, buckets)))


def build_view(cur: Snapshot | None, prev: Snapshot | None = None, seconds: float = 0.0, *,
               trainer: Snapshot | None = None, title: str = "tailstream",
               uptime_s: float = 0.0, status: str = "",
               during: Sequence[tuple[float, float]] | None = None,
               outside: Sequence[tuple[float, float]] | None = None) -> View:
    """Turn the workers' (merged) snapshot ``cur``, the one taken ``seconds`` earlier
    (``prev``, for rates and the recent latency) and the trainer's snapshot into a View.
    ``cur`` None: no worker answered yet. ``during`` / ``outside``: latency buckets of the
    lists published while a fine-tune ran / while none did (:class:`FinetuneSplit`)."""
    have = cur is not None
    c: Snapshot = cur if cur is not None else {}
    window = seconds if prev is not None and seconds > 0 else None
    shares = labelled(c, "tailstream_class_share_ratio", "event_class")
    weights = labelled(c, "tailstream_loss_weight_ratio", "event_class")
    buffers = labelled(c, "tailstream_buffer_samples", "bucket")
    policies = labelled(c, "tailstream_loss_weight_ratio", "policy")
    classes = []
    for k in EVENT_KINDS:
        key = f"tailstream_events_processed_total{{kind={k}}}"
        classes.append(ClassRow(k, rate(c, prev, key, seconds), c.get(key, 0.0),
                                shares.get(k), weights.get(k),
                                buffers.get(k, 0.0) if have else None))
    now_b = histogram_buckets(c, LATENCY)
    recent = bucket_delta(now_b, histogram_buckets(prev, LATENCY) if prev else None)
    recs_key = "tailstream_recommendations_published_total{sink=redis}"
    outcomes = labelled(trainer or {}, "tailstream_finetune_runs_total", "outcome")
    version = c.get("tailstream_serving_model_version_number")
    promoted = (trainer or {}).get("tailstream_model_version_number")
    return View(
        title=title, uptime_s=uptime_s, window_s=window, status=status, classes=classes,
        policy=next(iter(sorted(policies)), None),
        tail_buffer=buffers.get("tail", 0.0) if have else None,
        events_in_total=c.get("tailstream_events_in_total", 0.0),
        events_in_per_s=rate(c, prev, "tailstream_events_in_total", seconds),
        recs_total=c.get(recs_key, 0.0),
        recs_per_s=rate(c, prev, recs_key, seconds),
        latency_p50_ms=_ms(histogram_quantile(0.5, recent)) if window else None,
        latency_p99_ms=_ms(histogram_quantile(0.99, recent)) if window else None,
        latency_all_p50_ms=_ms(histogram_quantile(0.5, now_b)),
        latency_all_p99_ms=_ms(histogram_quantile(0.99, now_b)),
        dlq_total=c.get("tailstream_dlq_total", 0.0),
        dlq_by_reason=dict(sorted(labelled(c, "tailstream_dlq_total", "reason").items())),
        lag=c.get("tailstream_consumer_lag_messages") if have else None,
        partitions=c.get("tailstream_assigned_partitions"),
        serving_version=None if version is None else int(version),
        finetune_requests=c.get("tailstream_finetune_requests_total") if have else None,
        trainer=trainer is not None,
        finetune_running=(trainer or {}).get("tailstream_finetune_running", 0.0) > 0,
        finetune_runs=(trainer or {}).get("tailstream_finetune_runs_total", 0.0),
        finetune_outcomes=outcomes,
        promoted_version=None if promoted is None else int(promoted),
        latency_top_ms=_ms(max((b for b, _ in now_b if not math.isinf(b)), default=None)),
        latency_during_ms=_quantiles_ms(during), latency_outside_ms=_quantiles_ms(outside),
        model_update_s=c.get("tailstream_model_update_seconds{stage=first_list}"),
        finetune_paused_s=(trainer or {}).get("tailstream_trainer_paused_seconds_total"),
        online=online_view(c, prev, seconds, trainer) if have else None,
    )


class FinetuneSplit:
    """Latency observations split by whether a fine-tune was running: each poll's new
    observations (the histogram's difference to the last poll) go to ``during`` or
    ``outside`` by the trainer's ``tailstream_finetune_running`` gauge at that poll.

    >>> f = FinetuneSplit()
    >>> f.add({"h_bucket{le=0.1}": 4, "h_bucket{le=+Inf}": 4}, running=False, name="h")
    >>> f.add({"h_bucket{le=0.1}": 5, "h_bucket{le=+Inf}": 9}, running=True, name="h")
    >>> f.during, f.outside
    ([(0.1, 1.0), (inf, 5.0)], [(0.1, 4.0), (inf, 4.0)])
    """

    def __init__(self) -> None:
        self._last: list[tuple[float, float]] | None = None
        self._during: dict[float, float] = {}
        self._outside: dict[float, float] = {}

    def add(self, snap: Snapshot, running: bool, name: str = LATENCY) -> None:
        now = histogram_buckets(snap, name)
        target = self._during if running else self._outside
        for bound, n in bucket_delta(now, self._last):
            target[bound] = target.get(bound, 0.0) + float(n)
        self._last = now

    @property
    def during(self) -> list[tuple[float, float]]:
        return sorted(self._during.items())

    @property
    def outside(self) -> list[tuple[float, float]]:
        return sorted(self._outside.items())


# --------------------------------------------------------------------------- rendering
def _f(x: float | None, fmt: str = ",.0f", none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def lines(view: View) -> list[tuple[str, str]]:
    """The view's figures below the class table, as (label, text) rows."""
    per = f"/s (last {view.window_s:.0f} s)" if view.window_s else "/s"
    dlq = f"{view.dlq_total:,.0f}"
    if view.dlq_by_reason:
        dlq += "  (" + ", ".join(f"{r} {n:,.0f}" for r, n in view.dlq_by_reason.items()) + ")"
    if view.trainer:
        o = view.finetune_outcomes
        ft = (f"runs {view.finetune_runs:,.0f}: promoted {o.get('promoted', 0):,.0f}, "
              f"to canary {o.get('canary', 0):,.0f}, "
              f"rejected {o.get('rejected', 0):,.0f}, failed {o.get('failed', 0):,.0f}"
              + (", running now" if view.finetune_running else ""))
    else:
        ft = "no trainer running"
    if view.finetune_requests is not None:
        ft += f"; {view.finetune_requests:,.0f} requested"

    def lat(ms: float | None) -> str:
        top = view.latency_top_ms
        return ("≥" if ms is not None and top is not None and ms >= top else "") + _f(ms)

    model = f"serving v{_f(view.serving_version, 'd', '?')}"
    if view.promoted_version is not None:
        model += f", promoted v{view.promoted_version}"
    during, outside = view.latency_during_ms, view.latency_outside_ms
    freshness = (f"p50/p99 {lat(during[0])}/{lat(during[1])} ms during fine-tunes, "
                 f"{lat(outside[0])}/{lat(outside[1])} ms outside; model update "
                 f"{_f(view.model_update_s, ',.1f')} s (trigger → first list)")
    if view.finetune_paused_s:
        freshness += f"; fine-tunes paused {view.finetune_paused_s:,.1f} s for the stream"
    return [
        ("events read", f"{_f(view.events_in_per_s, ',.1f')}{per}, "
                        f"{view.events_in_total:,.0f} in all"),
        ("recommendations", f"{_f(view.recs_per_s, ',.1f')} lists{per} to Redis, "
                            f"{view.recs_total:,.0f} in all"),
        ("latency event→Redis", f"p50 {lat(view.latency_p50_ms)} ms, "
                                f"p99 {lat(view.latency_p99_ms)} ms recently; since start "
                                f"p50 {lat(view.latency_all_p50_ms)} ms, "
                                f"p99 {lat(view.latency_all_p99_ms)} ms"),
        ("freshness", freshness),
        ("fine-tunes", ft),
        ("model", model),
        *online_lines(view.online, per),
        ("dead-lettered", dlq),
        ("consumer lag", f"{_f(view.lag)} messages on {_f(view.partitions)} partitions"),
    ]


def online_lines(o: OnlineView | None, per: str = "/s") -> list[tuple[str, str]]:
    """The rows of the online attribution and the canary.

    >>> for label, text in online_lines(OnlineView(
    ...         lists_total=900, lists_per_s=12.0, judged=400, hits=100,
    ...         attributed={"click": 80, "purchase": 2}, tail_share=0.31, tail_target=0.2,
    ...         hit_rate_by_role={"serving": 0.25}, canaries={"started": 1})):
    ...     print(f"{label}: {text}")  # doctest: +NORMALIZE_WHITESPACE
    online: 12.0 lists/s, 900 in all; hit rate 0.250 of 400 judged; attributed click 80,
      purchase 2; tail 31 % of slots (target 20 %)
    canary: none running (started 1, promoted 0, rolled back 0); hit rate serving 0.250
    """
    if o is None:
        return []
    attributed = ", ".join(f"{c} {n:,.0f}" for c, n in o.attributed.items() if n) or "none"
    tail = "—" if o.tail_share is None else f"{100 * o.tail_share:.0f} %"
    tail += " of slots"
    if o.tail_target is not None:
        tail += f" (target {100 * o.tail_target:.0f} %)"
    hit = "—" if o.hit_rate is None else f"{o.hit_rate:.3f}"
    running = (f"v{o.canary_version} on {100 * (o.canary_share or 0):.0f} % of users"
               if o.canary_version else "none running")
    counts = (f"started {o.canaries.get('started', 0):,.0f}, promoted "
              f"{o.canaries.get('promoted', 0):,.0f}, rolled back "
              f"{o.canaries.get('rolled_back', 0):,.0f}")
    roles = ", ".join(f"{r} {v:.3f}" for r, v in o.hit_rate_by_role.items())
    return [
        ("online", f"{_f(o.lists_per_s, ',.1f')} lists{per}, {o.lists_total:,.0f} in all; "
                   f"hit rate {hit} of {o.judged:,.0f} judged; attributed {attributed}; "
                   f"tail {tail}"),
        ("canary", f"{running} ({counts})" + (f"; hit rate {roles}" if roles else "")),
    ]


def render(view: View) -> RenderableType:
    """A rich renderable of the view: a table of the classes, then the other figures."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    head = Text(f"{view.title}  ·  up {view.uptime_s:,.0f} s", style="bold")
    if view.status:
        head.append(f"  ·  {view.status}", style="yellow")
    weight_head = f"loss weight ({view.policy})" if view.policy else "loss weight"
    classes = Table(expand=False, title_justify="left")
    for col in ("class", "events/s", "events", "share", weight_head, "buffer"):
        classes.add_column(col, justify="left" if col == "class" else "right")
    for row in view.classes:
        classes.add_row(row.name, _f(row.per_s, ",.1f"), _f(row.total),
                        _f(row.share, ".1%"), _f(row.weight, ".2f"), _f(row.buffer))
    classes.add_row("tail items", "", "", "", "", _f(view.tail_buffer), style="dim")
    rest = Table(show_header=False, box=None, padding=(0, 1))
    rest.add_column(style="cyan", no_wrap=True)
    rest.add_column()
    for k, v in lines(view):
        rest.add_row(k, v)
    return Group(head, classes, rest)


def render_text(view: View, width: int = 120) -> str:
    """The view as plain text (what a terminal of ``width`` columns shows)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(render(view))
    return console.export_text()


# --------------------------------------------------------------------------- refresh loop
def pin_ports(settings: Settings) -> Settings:
    """The settings with a worker and a trainer port that are free now, so a view started
    before the processes knows their /metrics URLs (they take a configured port when it
    is free, and any free one otherwise)."""
    from tailstream.stack.embedded import free_port

    def free(port: int) -> bool:
        with socket.socket() as sock:
            try:
                sock.bind((settings.web_host, port))
            except OSError:
                return False
        return True

    web = settings.web_port if settings.web_port and free(settings.web_port) else free_port()
    trainer = (settings.trainer_port if settings.trainer_port and free(settings.trainer_port)
               and settings.trainer_port != web else free_port())
    return settings.replace(web_port=web, trainer_port=trainer)


def ui_wanted(flag: bool | None, stream: Any) -> bool:
    """``--ui``/``--no-ui`` when given, else on only when ``stream`` is a terminal.

    >>> import io
    >>> ui_wanted(None, io.StringIO()), ui_wanted(True, io.StringIO()), ui_wanted(False, None)
    (False, True, False)
    """
    if flag is not None:
        return flag
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LiveMonitor:
    """Scrape the /metrics pages every ``interval`` seconds and redraw the view, in a
    daemon thread, until :meth:`stop`. Rates and the recent latency cover the last
    ``window_s`` seconds. Log lines are printed above the view while it runs; ``quiet``
    names loggers held at WARNING meanwhile (their INFO lines repeat what the view shows).
    """

    def __init__(self, worker_urls: Iterable[str], trainer_url: str | None = None, *,
                 title: str = "tailstream", interval: float = 1.0, window_s: float = 10.0,
                 console: Console | None = None, quiet: Sequence[str] = ()) -> None:
        self.worker_urls = list(worker_urls)
        self.trainer_url = trainer_url
        self.title, self.interval, self.window_s = title, interval, window_s
        self.console = console
        self.quiet = list(quiet)
        self.history: deque[tuple[float, dict[str, float]]] = deque()
        self.last: View | None = None
        self._last_trainer: dict[str, float] | None = None
        self.split = FinetuneSplit()
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Any = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._levels: list[tuple[logging.Logger, int]] = []

    # one refresh, without the thread (tests, and the loop below)
    def poll(self) -> View:
        now = time.monotonic()
        snaps, status = [], ""
        for url in self.worker_urls:
            try:
                snaps.append(scrape_snapshot(url))
            except (urllib.error.URLError, OSError, ValueError):
                pass
        if not snaps:
            status = "waiting for the worker's /metrics …"
        elif len(snaps) < len(self.worker_urls):
            status = f"{len(self.worker_urls) - len(snaps)} worker(s) not answering"
        if not snaps and self.history and self.last is not None:
            # Too busy to answer, or stopped at the end: keep the last figures on screen.
            self.last = dataclasses.replace(
                self.last, uptime_s=now - self._started,
                status="the worker is not answering: last figures shown")
            return self.last
        trainer = self._last_trainer
        if self.trainer_url:
            try:
                trainer = self._last_trainer = scrape_snapshot(self.trainer_url)
            except (urllib.error.URLError, OSError, ValueError):
                if trainer is not None and not status:
                    status = "the trainer is not answering: its last figures shown"
        cur = merge(snaps) if snaps else None
        prev, seconds = None, 0.0
        if cur is not None:
            while self.history and now - self.history[0][0] > self.window_s:
                self.history.popleft()
            if self.history:
                t0, prev = self.history[0]
                seconds = now - t0
            self.history.append((now, cur))
        if cur is not None:
            self.split.add(cur, (trainer or {}).get("tailstream_finetune_running", 0.0) > 0)
        self.last = build_view(cur, prev, seconds, trainer=trainer, title=self.title,
                               uptime_s=now - self._started, status=status,
                               during=self.split.during, outside=self.split.outside)
        return self.last

    def start(self) -> LiveMonitor:
        import sys

        from rich.console import Console
        from rich.live import Live

        console = self.console or Console()
        self._live = Live(render(self.poll()), console=console, refresh_per_second=4,
                          transient=False, redirect_stdout=True, redirect_stderr=True)
        self._live.start()
        # Logging handlers hold the real stderr: point them at rich's proxy, so log lines
        # scroll above the view instead of tearing it.
        for handler in logging.getLogger().handlers:
            if (isinstance(handler, logging.StreamHandler)
                    and handler.stream in (sys.__stderr__, sys.__stdout__)
                    and sys.stderr is not sys.__stderr__):
                self._handlers.append((handler, handler.setStream(sys.stderr)))
        for name in self.quiet:
            logger = logging.getLogger(name)
            self._levels.append((logger, logger.level))
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        self._thread = threading.Thread(target=self._run, name="liveview", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._live.update(render(self.poll()))
            except Exception:  # noqa: BLE001 - a view must never take the stack down
                logging.getLogger(__name__).debug("live view refresh failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._live is not None:
            try:
                self._live.update(render(self.poll()))
            except Exception:  # noqa: BLE001, S110 - keep the last frame drawn
                pass
            for handler, stream in self._handlers:
                handler.setStream(stream)
            self._handlers.clear()
            self._live.stop()
            self._live = None
        for logger, level in self._levels:
            logger.setLevel(level)
        self._levels.clear()

    def __enter__(self) -> LiveMonitor:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
