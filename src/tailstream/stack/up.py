"""``tailstream up``: the embedded services (unless configured), worker processes and the
trainer, kept running until a signal; ``{data_dir}/stack.json`` tells other commands
where the stack is."""

from __future__ import annotations

import logging
import sys
import threading

from tailstream.kafka_io import create_topics
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess, ServiceStack, StackInfo
from tailstream.stack.liveview import LiveMonitor, ui_wanted
from tailstream.stack.processes import (
    metrics_url,
    start_trainer,
    start_worker,
    trainer_metrics_url,
    wait_ready,
    wait_trainer_ready,
)

log = logging.getLogger("tailstream")

Child = tuple[ManagedProcess, Settings]


def run_up(settings: Settings, stopping: threading.Event, *, workers: int, trainer: bool,
           ui: bool | None) -> int:
    """Start everything, watch the children until ``stopping`` is set; 1 if a worker died."""
    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    embedded = not (settings.kafka_bootstrap and settings.redis_url)
    stack = ServiceStack(settings)
    with stack as s:
        create_topics(s)
        started: list[Child] = []
        trainer_child: Child | None = None
        view: LiveMonitor | None = None
        try:
            for i in range(workers):  # appended one by one: stopped if a later one fails
                started.append(start_worker(s, i))
            trainer_child = start_trainer(s) if trainer else None
            for proc, ws in started:
                wait_ready(proc, ws)
            if trainer_child is not None:
                wait_trainer_ready(*trainer_child)
            children = [*stack.processes, *(w for w, _ in started),
                        *([trainer_child[0]] if trainer_child else [])]
            StackInfo(s.kafka_bootstrap, s.redis_url.reveal(), embedded,
                      {p.name: p.pid for p in children}).write(s.data_dir / "stack.json")
            print(banner(s, started, trainer_child), flush=True)
            if ui_wanted(ui, sys.stdout):
                view = LiveMonitor([metrics_url(ws) for _, ws in started],
                                   trainer_metrics_url(trainer_child[1]) if trainer_child
                                   else None, title="tailstream up").start()
            return watch(started, trainer_child, stopping)
        finally:
            if view is not None:
                view.stop()
            if trainer_child is not None:
                trainer_child[0].stop()
            for proc, _ in started:
                proc.stop()
            (s.data_dir / "stack.json").unlink(missing_ok=True)


def banner(s: Settings, workers: list[Child], trainer: Child | None) -> str:
    """What ``up`` prints once everything is ready."""
    return (f"tailstream is up.\n"
            f"  export TAILSTREAM_KAFKA_BOOTSTRAP={s.kafka_bootstrap}\n"
            f"  export TAILSTREAM_REDIS_URL={s.redis_url.reveal()}\n"
            + "".join(f"  metrics: {metrics_url(ws)}\n" for _, ws in workers)
            + (f"  trainer:  {trainer_metrics_url(trainer[1])}\n" if trainer else "")
            + "  feed it:   tailstream produce synthetic --rate 200\n"
              "  watch it:  tailstream subscribe\n"
              "Ctrl-C stops everything.")


def watch(workers: list[Child], trainer: Child | None, stopping: threading.Event) -> int:
    """Until ``stopping``: a worker that exits ends the stack (1); a trainer that exits is
    reported once and the stream goes on without fine-tuning."""
    trainer_down = False
    while not stopping.is_set():
        for proc, _ in workers:
            if not proc.alive():
                log.error("worker %s exited:\n%s", proc.name, proc.tail(30))
                return 1
        if trainer is not None and not trainer[0].alive() and not trainer_down:
            trainer_down = True
            log.error("the trainer exited; recommendations keep flowing with the current "
                      "model:\n%s", trainer[0].tail(30))
        stopping.wait(1.0)
    return 0
