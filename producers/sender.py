"""Sending produced records to Kafka with kafka-python: rate limit, stop conditions, progress."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from kafka import KafkaProducer

from tailstream.producers.records import ProducedRecord
from tailstream.settings import Settings


@dataclass
class SendStats:
    sent: int = 0  # events (valid or malformed), not catalogue records
    by_kind: dict[str, int] = field(default_factory=dict)
    malformed: int = 0
    seconds: float = 0.0


def make_producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5, acks=1,
                         batch_size=64 * 1024, client_id="tailstream-producer",
                         **settings.kafka_client_options())


def send_records(records: Iterable[ProducedRecord], settings: Settings, *,
                 rate: float | None = None, max_events: int | None = None,
                 duration_s: float | None = None, progress: bool = False,
                 producer: KafkaProducer | None = None,
                 stop: threading.Event | None = None) -> SendStats:
    """Send records to the topic of their kind until a stop condition; returns counts.

    ``rate`` limits events per second (catalogue records are not rate-limited or counted
    as events). The limiter sleeps in chunks, never per event.
    """
    own = producer is None
    p = producer or make_producer(settings)
    topics = {k: settings.topic_for(k)
              for k in ("click", "cart", "fav", "purchase", "search", "item")}
    by_kind: Counter[str] = Counter()
    stats = SendStats()
    started = time.monotonic()
    last_report = started
    try:
        for rec in records:
            if stop is not None and stop.is_set():
                break
            now = time.monotonic()
            if duration_s is not None and now - started >= duration_s:
                break
            if max_events is not None and stats.sent >= max_events and rec.kind != "item":
                break
            p.send(topics[rec.kind], key=rec.key.encode(), value=rec.value)
            by_kind[rec.kind] += 1
            if rec.kind == "item":
                continue
            stats.sent += 1
            stats.malformed += rec.malformed
            if rate:
                ahead = started + stats.sent / rate - time.monotonic()
                if ahead > 0.01:
                    time.sleep(ahead)
            if progress and now - last_report >= 1.0:
                last_report = now
                _report(stats, by_kind, now - started)
        p.flush()
    finally:
        if own:
            p.close()
    stats.by_kind = dict(by_kind)
    stats.seconds = time.monotonic() - started
    if progress:
        _report(stats, by_kind, stats.seconds, final=True)
    return stats


def _report(stats: SendStats, by_kind: Counter[str], elapsed: float, final: bool = False) -> None:
    kinds = " ".join(f"{k}={n:,}" for k, n in sorted(by_kind.items()))
    rate = stats.sent / elapsed if elapsed > 0 else 0.0
    end = "\n" if final else "\r"
    sys.stderr.write(f"sent {stats.sent:,} events ({rate:,.0f}/s)  {kinds}   {end}")
    sys.stderr.flush()
