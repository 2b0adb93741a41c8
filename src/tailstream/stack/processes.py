"""Starting worker processes and reading their metrics (used by ``up``, ``demo``, tests)."""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess, free_port


def start_worker(settings: Settings, index: int = 0) -> tuple[ManagedProcess, Settings]:
    """Run ``tailstream worker`` as a child process; returns it and its settings."""
    first = index == 0 and settings.web_port and _free(settings)
    port = settings.web_port if first else free_port()
    s = settings.replace(web_port=port)
    env = {**os.environ, **s.to_env()}
    proc = ManagedProcess(f"worker-{index}", [sys.executable, "-m", "tailstream.cli", "worker"],
                          s.data_dir / "logs" / f"worker-{index}.log", env=env)
    return proc, s


def start_trainer(settings: Settings) -> tuple[ManagedProcess, Settings]:
    """Run ``tailstream trainer`` as a child process; returns it and its settings."""
    wanted = settings.trainer_port
    port = wanted if wanted and _free(settings, wanted) else free_port()
    s = settings.replace(trainer_port=port)
    env = {**os.environ, **s.to_env()}
    proc = ManagedProcess("trainer", [sys.executable, "-m", "tailstream.cli", "trainer"],
                          s.data_dir / "logs" / "trainer.log", env=env)
    return proc, s


def trainer_metrics_url(settings: Settings) -> str:
    return f"http://{settings.web_host}:{settings.trainer_port}/metrics"


def wait_trainer_ready(proc: ManagedProcess, settings: Settings, timeout: float = 90.0) -> None:
    """Until the trainer serves /metrics (it then reads training requests)."""
    deadline = time.monotonic() + timeout
    url = trainer_metrics_url(settings)
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"trainer exited during start:\n{proc.tail(40)}")
        try:
            scrape(url)
            return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"trainer not ready after {timeout:.0f}s:\n{proc.tail(40)}")


def _free(settings: Settings, port: int | None = None) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((settings.web_host, settings.web_port if port is None else port))
        except OSError:
            return False
    return True


def metrics_url(settings: Settings) -> str:
    return f"http://{settings.web_host}:{settings.web_port}/metrics"


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Sum every sample of a /metrics page by name (and by ``name{label=value}``)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL
        text = resp.read().decode()
    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] += sample.value
            for label, value in sample.labels.items():
                if label != "le":
                    out[f"{sample.name}{{{label}={value}}}"] += sample.value
    return dict(out)


def wait_ready(proc: ManagedProcess, settings: Settings, timeout: float = 90.0,
               partitions: int = 1) -> None:
    """Until the worker serves /metrics and holds at least ``partitions`` input partitions
    (or dies). A lone worker should hold them all: ``settings.input_partitions``."""
    deadline = time.monotonic() + timeout
    url = metrics_url(settings)
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"worker exited during start:\n{proc.tail(40)}")
        try:
            if scrape(url).get("tailstream_assigned_partitions", 0) >= partitions:
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"worker not ready (holding {partitions} input partitions) after "
                       f"{timeout:.0f}s:\n{proc.tail(40)}")
