"""Sending produced records to Kafka with kafka-python: rate limit, stop conditions, progress.

Each record goes to the topic of its kind (:meth:`Settings.topic_for`) keyed by its
``key`` (user id, or item id for catalogue records), so one user's events stay in order
on one partition. Catalogue records (``kind="item"``) are counted in ``by_kind["item"]``
but are neither rate-limited nor counted against ``max_events``: they are set-up, not
traffic.

The rate limiter is a token bucket that sleeps in chunks of at least a few milliseconds
(never per event at high rates) and holds at most ~20 ms of burst, so a stall in the
source or the client is not followed by an unbounded catch-up burst.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tailstream.contract import CATALOGUE, EVENT_KINDS
from tailstream.kafka_io import kafka_python_options, max_message_bytes
from tailstream.producers.records import ProducedRecord
from tailstream.settings import Settings

KINDS = (*EVENT_KINDS, CATALOGUE)
MIN_SLEEP_S = 0.005
BURST_S = 0.02


@dataclass
class SendStats:
    """What :func:`send_records` did. ``sent`` counts events (valid or malformed), not items."""

    sent: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    seconds: float = 0.0
    failed: int = 0
    """Records the client reported as not delivered (after its own retries)."""


def make_producer(settings: Settings) -> KafkaProducer:
    """A kafka-python producer tuned for throughput with little added latency.

    ``acks=1``: the leader's ack is enough for generated or replayed traffic;
    ``TAILSTREAM_PRODUCER_LINGER_MS`` (25) of batching: fewer, fuller batches (the
    embedded broker pays per batch on every fetch) for ~12 ms more on the mean event.
    """
    return KafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                         linger_ms=settings.producer_linger_ms, acks=1,
                         batch_size=64 * 1024, client_id="tailstream-producer",
                         max_request_size=max_message_bytes(settings),
                         **kafka_python_options(settings))


class _Bucket:
    """Token bucket: ``take()`` returns how long to sleep before the next event may go."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate * BURST_S)
        self.tokens = 1.0
        self.last = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1.0
        if self.tokens >= 0:
            return 0.0
        # In debt: wait until the bucket is back to zero, but at least MIN_SLEEP_S so
        # high rates sleep once per batch of events, not once per event.
        return max(-self.tokens / self.rate, MIN_SLEEP_S)


def send_records(records: Iterable[ProducedRecord], settings: Settings, *,
                 rate: float | None = None, max_events: int | None = None,
                 duration_s: float | None = None, progress: bool = False,
                 producer: KafkaProducer | None = None,
                 stop: threading.Event | None = None) -> SendStats:
    """Send records to the topic of their kind until a stop condition; returns counts.

    Stops when ``records`` ends, ``max_events`` events were sent, ``duration_s`` passed
    or ``stop`` is set, then flushes. ``rate`` limits events per second (``None`` or 0:
    as fast as possible). A producer passed in is flushed but not closed.
    """
    if rate is not None and rate < 0:
        raise ValueError("rate must be positive (or None for no limit)")
    own = producer is None
    p = producer or make_producer(settings)
    topics = {k: settings.topic_for(k) for k in KINDS}
    by_kind: Counter[str] = Counter()
    stats = SendStats()
    failures: list[BaseException] = []
    bucket = _Bucket(rate) if rate else None
    started = time.monotonic()
    deadline = started + duration_s if duration_s is not None else None
    view = _Progress(stats, by_kind, started) if progress else None

    def failed(exc: BaseException) -> None:  # runs on the client's I/O thread
        failures.append(exc)

    try:
        for rec in records:
            if stop is not None and stop.is_set():
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if rec.kind == "item":
                p.send(topics["item"], key=rec.key.encode(), value=rec.value) \
                    .add_errback(failed)
                by_kind["item"] += 1
                continue
            if max_events is not None and stats.sent >= max_events:
                break
            if bucket is not None:
                pause = bucket.take()
                if pause:
                    if _sleep(pause, deadline, stop):
                        break
                    if view is not None:
                        view.tick()
            p.send(topics[rec.kind], key=rec.key.encode(), value=rec.value).add_errback(failed)
            by_kind[rec.kind] += 1
            stats.sent += 1
            stats.malformed += rec.malformed
            if view is not None and stats.sent % 256 == 0:
                view.tick()
        p.flush()
    finally:
        if own:
            p.close()
        stats.by_kind = dict(by_kind)
        stats.failed = len(failures)
        stats.seconds = time.monotonic() - started
        if view is not None:
            view.close()
    return stats


def _sleep(seconds: float, deadline: float | None, stop: threading.Event | None) -> bool:
    """Sleep, waking early for the deadline or the stop event; True if sending should end."""
    if deadline is not None:
        seconds = min(seconds, deadline - time.monotonic())
        if seconds <= 0:
            return True
    if stop is not None:
        return stop.wait(seconds)
    time.sleep(seconds)
    return False


class _Progress:
    """A live table on stderr (events/s and totals by kind), redrawn at most twice a second."""

    def __init__(self, stats: SendStats, by_kind: Counter[str], started: float) -> None:
        self.stats = stats
        self.by_kind = by_kind
        self.started = started
        self.last = started
        self.last_sent = 0
        self.recent_rate = 0.0
        self.live = Live(self._render(), console=Console(stderr=True), auto_refresh=False,
                         transient=False)
        self.live.start()

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.recent_rate = (self.stats.sent - self.last_sent) / (now - self.last)
        self.last, self.last_sent = now, self.stats.sent
        self.live.update(self._render(), refresh=True)

    def close(self) -> None:
        self.live.update(self._render(final=True), refresh=True)
        self.live.stop()
        if not self.live.console.is_terminal:  # rich ends the line only on a terminal
            self.live.console.line()

    def _render(self, final: bool = False) -> Any:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        table = Table(title="tailstream produce", show_header=True, header_style="bold")
        table.add_column("events")
        table.add_column("events/s" if final else "events/s (now / avg)", justify="right")
        for kind in KINDS:
            table.add_column(kind, justify="right")
        table.add_column("malformed", justify="right")
        avg = self.stats.sent / elapsed
        speed = f"{avg:,.0f}" if final else f"{self.recent_rate:,.0f} / {avg:,.0f}"
        table.add_row(f"{self.stats.sent:,}", speed,
                      *(f"{self.by_kind.get(k, 0):,}" for k in KINDS),
                      f"{self.stats.malformed:,}")
        return table
