"""``tailstream up``: the embedded services (unless configured), worker processes and the
trainer, supervised until a signal (:mod:`~tailstream.stack.supervise`);
``{data_dir}/stack.json`` tells other commands where the stack is
(:mod:`~tailstream.stack.state`)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

from prometheus_client import start_http_server

from tailstream.kafka_io import create_topics
from tailstream.metrics import StackMetrics
from tailstream.redis_io import RedisConfigError, check_redis
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess, ServiceStack, free_port
from tailstream.stack.liveview import LiveMonitor, ui_wanted
from tailstream.stack.processes import (
    metrics_url,
    port_free,
    spawn,
    start_trainer,
    start_worker,
    trainer_metrics_url,
    wait_ready,
    wait_trainer_ready,
)
from tailstream.stack.state import STATE_FILE, StackInfo, display_url
from tailstream.stack.supervise import Child, Supervisor, WarmSpare

log = logging.getLogger("tailstream")

Started = tuple[ManagedProcess, Settings]


def run_up(settings: Settings, stopping: threading.Event, *, workers: int, trainer: bool,
           ui: bool | None) -> int:
    """Start everything and supervise it until ``stopping`` is set; 1 if the stack gave up."""
    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    preflight(settings)
    stack = ServiceStack(settings)
    s = stack.__enter__()  # StackRunning if another stack holds the folder (the CLI says so)
    supervisor: Supervisor | None = None
    view: LiveMonitor | None = None
    started: list[Started] = []
    trainer_child: Started | None = None
    try:
        create_topics(s)
        for i in range(workers):  # appended one by one: stopped if a later one fails
            # Static membership: a worker restarted after a crash takes its partitions
            # back at once, not after the dead member's session expires.
            started.append(start_worker(s.replace(group_instance_id=s.group_instance_id
                                                  or f"{s.app_id}-worker-{i}"), i))
        trainer_child = start_trainer(s) if trainer else None
        for proc, ws in started:
            wait_ready(proc, ws)
        if trainer_child is not None:
            wait_trainer_ready(*trainer_child)
        metrics, stack_url = serve_metrics(s)
        children = [Child(svc.name, svc.proc, svc.restart) for svc in stack.services]
        children += [worker_child(p, ws) for p, ws in started]
        if trainer_child is not None:
            children.append(Child("trainer", trainer_child[0],
                                  _respawn(trainer_child[1], "trainer", "trainer")))
        urls = {"stack": stack_url, **{p.name: metrics_url(ws) for p, ws in started}}
        if trainer_child is not None:
            urls["trainer"] = trainer_metrics_url(trainer_child[1])
        info = StackInfo(s.kafka_bootstrap, s.redis_url.reveal(), not settings.kafka_bootstrap
                         or not settings.redis_url, {}, urls)

        def record(_: Child | None = None) -> None:
            info.pids = {c.name: c.proc.pid for c in children}
            info.write(s.data_dir / STATE_FILE)

        supervisor = Supervisor(children, metrics, max_restarts=s.supervise_max_restarts,
                                window_s=s.supervise_window_s, on_restart=record)
        record()
        print(banner(s, urls), flush=True)
        if ui_wanted(ui, sys.stdout):
            view = LiveMonitor([metrics_url(ws) for _, ws in started],
                               urls.get("trainer"), title="tailstream up").start()
        return watch(supervisor, stopping)
    finally:
        if view is not None:
            view.stop()
        if supervisor is not None:
            supervisor.stop()
        else:
            for proc, _ in [*started, *([trainer_child] if trainer_child else [])]:
                proc.stop()
        (s.data_dir / STATE_FILE).unlink(missing_ok=True)
        stack.close()


def preflight(settings: Settings) -> None:
    """A configured Redis that refuses tailstream or cannot be reached stops ``up`` at once
    with one clear line (the embedded one is started below)."""
    if not settings.redis_url:
        return
    where = display_url(settings.redis_url.reveal())
    try:
        state = check_redis(settings.redis_url.reveal(), prefix=settings.redis_prefix)
    except RedisConfigError as exc:
        raise SystemExit(f"tailstream: {exc}") from None
    if state != "ok":
        raise SystemExit(f"tailstream: redis at {where} is not reachable ({state[13:]}); "
                         f"check TAILSTREAM_REDIS_URL")


def serve_metrics(settings: Settings) -> tuple[StackMetrics, str]:
    """``up``'s own /metrics (the children's restarts), on ``stack_port`` or a free one."""
    port = settings.stack_port
    if not port or not port_free(settings, port):
        if port:
            log.warning("port %d (TAILSTREAM_STACK_PORT) is taken: up's /metrics is on a "
                        "free port instead (see stack.json)", port)
        port = free_port()
    metrics = StackMetrics()
    start_http_server(port, addr=settings.web_host, registry=metrics.registry)
    return metrics, f"http://{settings.web_host}:{port}/metrics"


def worker_child(proc: ManagedProcess, ws: Settings) -> Child:
    """A supervised worker: restarted from a warm spare when there is one."""
    fresh = _respawn(ws, proc.name, "worker")
    if not ws.supervise_warm_spares:
        return Child(proc.name, proc, fresh)
    spare = WarmSpare(fresh, lambda: spawn(ws, proc.name, "worker", standby=True),
                      now=time.monotonic())
    return Child(proc.name, proc, spare, spare=spare)


def _respawn(ws: Settings, name: str, command: str) -> Callable[[], ManagedProcess]:
    """Start ``name`` again with the same settings: the same ports, the same data."""
    return lambda: spawn(ws, name, command)


def banner(s: Settings, urls: dict[str, str]) -> str:
    """What ``up`` prints once everything is ready (no password: see stack.json)."""
    redis = display_url(s.redis_url.reveal())
    masked = redis != s.redis_url.reveal()
    return (f"tailstream is up.\n"
            f"  export TAILSTREAM_KAFKA_BOOTSTRAP={s.kafka_bootstrap}\n"
            f"  export TAILSTREAM_REDIS_URL={redis}"
            + ("   (password masked; other commands read it from stack.json)\n"
               if masked else "\n")
            + "".join(f"  metrics {name}: {url}\n" for name, url in urls.items())
            + "  feed it:   tailstream produce synthetic --rate 200\n"
              "  watch it:  tailstream subscribe\n"
              "Ctrl-C stops everything.")


def watch(supervisor: Supervisor, stopping: threading.Event) -> int:
    """Until ``stopping``: restart children that die; 1 if the supervisor gives up."""
    while not stopping.is_set():
        reason = supervisor.check(time.monotonic())
        if reason is not None:
            log.error("tailstream up gives up: %s", reason)
            return 1
        stopping.wait(0.5)
    return 0
