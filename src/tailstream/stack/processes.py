"""Starting worker processes and reading their metrics (used by ``up``, ``demo``, tests)."""

from __future__ import annotations

import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess, free_port

log = logging.getLogger(__name__)


def start_worker(settings: Settings, index: int = 0) -> tuple[ManagedProcess, Settings]:
    """Run ``tailstream worker`` as a child process; returns it and its settings (with the
    web port it really has: the configured one for the first worker when it is free, else a
    free one — said in the log, since /metrics moves with it)."""
    wanted = settings.web_port
    if index == 0 and wanted and not port_free(settings, wanted):
        log.warning("port %d (TAILSTREAM_WEB_PORT) is taken: worker-0 serves /metrics and "
                    "/recommendations on a free port instead (see stack.json)", wanted)
    first = index == 0 and wanted and port_free(settings, wanted)
    s = settings.replace(web_port=wanted if first else free_port())
    return spawn(s, f"worker-{index}", "worker"), s


def start_trainer(settings: Settings) -> tuple[ManagedProcess, Settings]:
    """Run ``tailstream trainer`` as a child process; returns it and its settings."""
    wanted = settings.trainer_port
    if wanted and not port_free(settings, wanted):
        log.warning("port %d (TAILSTREAM_TRAINER_PORT) is taken: the trainer serves /metrics "
                    "on a free port instead (see stack.json)", wanted)
    port = wanted if wanted and port_free(settings, wanted) else free_port()
    s = settings.replace(trainer_port=port)
    return spawn(s, "trainer", "trainer"), s


def spawn(settings: Settings, name: str, command: str, *,
          standby: bool = False) -> ManagedProcess:
    """``tailstream COMMAND`` as child ``name`` with exactly these settings (a restart
    uses it to come back on the same ports). ``standby``: a warm spare that imports
    everything and waits for :meth:`~tailstream.stack.embedded.ManagedProcess.send_line`."""
    env = {**os.environ, **settings.to_env()}
    argv = [sys.executable, "-m", "tailstream.cli", command, *(["--standby"] if standby else [])]
    return ManagedProcess(name, argv, settings.data_dir / "logs" / f"{name}.log", env=env,
                          stdin_pipe=standby)


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


def port_free(settings: Settings, port: int | None = None) -> bool:
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


LIST_STAGES = ("read", "queue", "turn", "publish")
"""Where an event-triggered list's freshness goes (``tailstream_list_stage_seconds``)."""


def stage_ms(m: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per stage of a scraped worker page (read and queue per list, turn
    and publish per turn; docs/metrics.md): where the event → Redis latency went.

    >>> n = "tailstream_list_stage_seconds"
    >>> stage_ms({f"{n}_sum{{stage=read}}": 0.5, f"{n}_count{{stage=read}}": 10.0})
    {'read': 50.0, 'queue': 0.0, 'turn': 0.0, 'publish': 0.0}
    """
    name = "tailstream_list_stage_seconds"
    return {stage: round(1000 * m.get(f"{name}_sum{{stage={stage}}}", 0.0)
                         / max(m.get(f"{name}_count{{stage={stage}}}", 0.0), 1.0), 1)
            for stage in LIST_STAGES}


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
