"""Redis with AUTH and an ACL user: the worker is configured by URL, works, fails clearly
with a wrong password, and never shows the password (logs, /metrics, argv). Its HTTP
endpoints, and the embedded services, listen on loopback only by default."""

from __future__ import annotations

import itertools
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tailstream.kafka_io import create_topics
from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.redis_io import Keys, RedisConfigError, check_redis
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess, free_port, start_redis
from tailstream.stack.processes import metrics_url, start_worker, wait_ready

from .conftest import metrics, own_settings, poll, read_until, wait_metric

pytestmark = pytest.mark.integration

USER = "tsworker"


@dataclass
class AuthRedis:
    host_port: str
    password: str
    admin_password: str

    def url(self, user: str = USER, password: str | None = None) -> str:
        return f"redis://{user}:{password or self.password}@{self.host_port}/0"

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(f"redis://:{self.admin_password}@{self.host_port}/0")


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[AuthRedis]:
    """A redis-server whose default user needs a password (``requirepass``) and an ACL
    user for tailstream, set with ``ACL SETUSER`` (passwords unique to this test)."""
    proc, url = start_redis(tmp_path / "auth-redis")
    server = AuthRedis(url.split("//")[1].rsplit("/", 1)[0], f"pw-{uuid.uuid4().hex}",
                       f"admin-{uuid.uuid4().hex}")
    try:
        client = redis.Redis.from_url(url)
        client.execute_command("ACL", "SETUSER", USER, "on", f">{server.password}", "~*",
                               "&*", "+@all")
        client.execute_command("ACL", "SETUSER", "noscripts", "on", f">{server.password}",
                               "~*", "&*", "+@all", "-@scripting")
        client.config_set("requirepass", server.admin_password)
        client.close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url).ping()  # no password: refused
        yield server
    finally:
        proc.stop()


def auth_settings(broker: str, url: str, tmp_path: Path) -> Settings:
    return own_settings(broker, url, tmp_path, scorer="baseline")


def listening_hosts(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port`` (from /proc/net/tcp{,6})."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                if len(addr) == 8:  # IPv4, little-endian hex
                    hosts.add(".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0)))
                else:
                    hosts.add(f"ipv6:{addr}")
    return hosts


def worker_cmdline(proc: ManagedProcess) -> str:
    return Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_worker_uses_an_acl_user_from_the_url_and_never_shows_the_password(
        broker: str, auth_redis: AuthRedis, tmp_path: Path) -> None:
    s = auth_settings(broker, auth_redis.url(), tmp_path)
    assert auth_redis.password not in repr(s) and auth_redis.password not in str(s.redacted())
    assert check_redis(s.redis_url.reveal(), prefix=s.redis_prefix) == "ok"
    create_topics(s)
    proc, ws = start_worker(s)  # the URL reaches it as TAILSTREAM_REDIS_URL (environment)
    try:
        wait_ready(proc, ws)
        assert auth_redis.password not in worker_cmdline(proc)
        sim = ShopSimulator(n_users=50, n_items=100, seed=3)
        stats = send_records(itertools.islice(sim.events(), 400), ws)
        wait_metric(ws, "tailstream_events_in_total", stats.sent, 60,
                    "the worker to read the events")
        admin = auth_redis.admin()
        lists = poll(lambda: list(admin.scan_iter(match=Keys(ws.redis_prefix).meta_pattern)),
                     20, "lists in Redis", 0.2)
        user = lists[0].decode().split(":")[2]
        seen = sum(1 for _ in admin.scan_iter(match=f"{ws.redis_prefix}:seen:*", count=1000))
        admin.close()
        with urllib.request.urlopen(metrics_url(ws), timeout=5) as resp:  # noqa: S310
            metrics_text = resp.read().decode()
        page = f"http://{ws.web_host}:{ws.web_port}/recommendations/{user}"
        with urllib.request.urlopen(page, timeout=5) as resp:  # noqa: S310 - loopback
            rec_page = resp.read().decode()
        m = metrics(ws)
    finally:
        proc.stop()
    log_text = proc.log_path.read_text(errors="replace")
    print(f"\nworker as ACL user {USER!r}: {m.get('tailstream_events_processed_total'):.0f} "
          f"events processed, {len(lists)} lists and {seen} de-dup keys written; password in "
          f"log: {auth_redis.password in log_text}, in /metrics: "
          f"{auth_redis.password in metrics_text}")
    assert m.get("tailstream_events_processed_total", 0) > 0.9 * stats.sent
    assert m.get("tailstream_redis_up") == 1 and m.get("tailstream_redis_errors_total", 0) == 0
    assert len(lists) > 10 and seen > 0 and '"found":true' in rec_page.replace(" ", "")
    for text in (log_text, metrics_text, rec_page):
        assert auth_redis.password not in text
        assert auth_redis.admin_password not in text


def test_a_wrong_password_is_a_clear_error_at_start(
        broker: str, auth_redis: AuthRedis, tmp_path: Path) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    s = auth_settings(broker, auth_redis.url(password=wrong), tmp_path)
    # The preflight check (for entry points) says what is wrong, without the password.
    with pytest.raises(RedisConfigError) as refused:
        check_redis(s.redis_url.reveal())
    message = str(refused.value)
    assert f"user {USER!r}" in message and "TAILSTREAM_REDIS_URL" in message
    assert auth_redis.host_port in message and wrong not in message
    # A user without a permission tailstream needs (scripts replace lists atomically).
    with pytest.raises(RedisConfigError, match="'noscripts'"):
        check_redis(auth_redis.url(user="noscripts"))
    assert check_redis(f"redis://127.0.0.1:{free_port()}/0").startswith("unreachable")

    create_topics(s)
    proc, ws = start_worker(s)
    started = time.monotonic()

    def refusal() -> tuple[str | None, bool]:
        """The log's refusal line (if any yet), and whether the worker still runs."""
        alive = proc.alive()  # first: the log of a worker that has exited is complete
        text = proc.log_path.read_text(errors="replace")
        return next((line for line in text.splitlines()
                     if "refused the credentials" in line), None), alive

    try:
        said, _ = read_until(refusal, lambda seen: seen[0] is not None or not seen[1],
                             timeout=60, interval=0.2)
        when = time.monotonic() - started
        try:  # the entry point refuses to start; if a worker runs on, it says so too
            m = metrics(ws) if proc.alive() else {}
        except OSError:
            m = {}
    finally:
        proc.stop()
    log_text = proc.log_path.read_text(errors="replace")
    print(f"\nwrong password: clear error {when:.1f} s after start: {said}")
    assert said is not None, log_text[-3000:]
    assert not m, "the worker must refuse to start with credentials that cannot work"
    assert f"user {USER!r}" in said and "TAILSTREAM_REDIS_URL" in said
    assert wrong not in log_text and auth_redis.password not in log_text
    if m:  # still running (it works without Redis): the metrics say Redis is out
        assert m.get("tailstream_redis_up") == 0 and m.get("tailstream_redis_circuit_open") == 1


def test_worker_http_server_binds_loopback_by_default(worker: tuple[ManagedProcess, Settings]
                                                      ) -> None:
    """/metrics and /recommendations listen on TAILSTREAM_WEB_HOST (127.0.0.1) only."""
    _, ws = worker
    assert Settings().web_host == ws.web_host == "127.0.0.1"
    assert listening_hosts(ws.web_port) == {"127.0.0.1"}, listening_hosts(ws.web_port)


def test_embedded_services_listen_on_loopback_only(broker: str, auth_redis: AuthRedis) -> None:
    broker_port = int(broker.rsplit(":", 1)[1])
    redis_port = int(auth_redis.host_port.rsplit(":", 1)[1])
    assert listening_hosts(broker_port) == {"127.0.0.1"}
    assert listening_hosts(redis_port) == {"127.0.0.1"}
    s = Settings()
    assert s.web_host == "127.0.0.1"  # worker /metrics and /recommendations, trainer /metrics
    assert repr(Settings().replace(redis_url="redis://u:hunter2@h:1/0")).count("hunter2") == 0
