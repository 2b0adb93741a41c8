"""``tailstream``: the one command line.

Every flag falls back to a ``TAILSTREAM_*`` environment variable (named in ``--help``);
settings are read once here and passed down.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tailstream.settings import ENV_PREFIX, Secret, Settings

log = logging.getLogger("tailstream")

# CLI flag → settings field, shared by every subcommand.
_COMMON = [
    ("--kafka-bootstrap", "kafka_bootstrap", "Kafka bootstrap servers (empty: embedded Tansu)"),
    ("--redis-url", "redis_url", "Redis URL (empty: embedded redis-server)"),
    ("--topic-prefix", "topic_prefix", "prefix of every topic name"),
    ("--partitions", "partitions", "partitions of the input topics"),
    ("--data-dir", "data_dir", "folder for logs and local state"),
    ("--web-port", "web_port", "worker HTTP port (/metrics, /recommendations/{user})"),
    ("--device", "device", "torch device: auto, cpu or cuda"),
    ("--weight-policy", "weight_policy", "loss weight policy (none, inverse, sqrt_inverse, "
                                         "class_balanced, focal, logit_adjusted, importance)"),
    ("--model-dir", "model_dir", "model store folder (default {data-dir}/models)"),
    ("--log-level", "log_level", "debug, info, warning"),
]


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("settings (flags override env vars)")
    for flag, name, text in _COMMON:
        g.add_argument(flag, dest=f"set_{name}", default=None,
                       help=f"{text} [env {ENV_PREFIX}{name.upper()}]")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    return Settings.from_env().replace(**overrides)


def _with_running_stack(settings: Settings) -> Settings:
    """Fill endpoints from ``{data_dir}/stack.json`` written by a running ``tailstream up``."""
    if settings.kafka_bootstrap and settings.redis_url:
        return settings
    path = settings.data_dir / "stack.json"
    if path.exists():
        info = json.loads(path.read_text())
        settings = settings.replace(
            kafka_bootstrap=settings.kafka_bootstrap or info["kafka_bootstrap"],
            redis_url=settings.redis_url or Secret(info["redis_url"]),
        )
    if not settings.kafka_bootstrap:
        raise SystemExit("no broker: run `tailstream up` first, or set TAILSTREAM_KAFKA_BOOTSTRAP")
    return settings


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The Kafka clients narrate every connection at INFO: keep their warnings only.
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


# --------------------------------------------------------------------------- commands
def _preflight_redis(settings: Settings) -> None:
    """Refuse to start with Redis credentials or ACL permissions that cannot work (a
    clear error now rather than a worker that silently runs without Redis). An
    unreachable Redis is not fatal: workers ride out Redis outages."""
    from tailstream.streams.stores.publisher import RedisConfigError, check_redis

    if not settings.redis_url:
        return
    try:
        state = check_redis(settings.redis_url.reveal(), prefix=settings.redis_prefix)
    except RedisConfigError as exc:
        raise SystemExit(f"tailstream: {exc}") from None
    if state != "ok":
        log.warning("redis not reachable at start (%s); continuing, writes are retried", state)


def cmd_worker(args: argparse.Namespace) -> int:
    from faust import Worker

    from tailstream.streams.worker.app import create_app

    settings = _with_running_stack(_settings(args))
    _preflight_redis(settings)
    worker = create_app(settings)
    Worker(worker.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
    return 0


def cmd_trainer(args: argparse.Namespace) -> int:
    import os

    import torch

    from tailstream.streams.trainer.trainer import run_trainer

    settings = _with_running_stack(_settings(args))
    _preflight_redis(settings)
    if settings.trainer_nice:
        os.nice(settings.trainer_nice)  # fine-tuning yields the CPU to the stream
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    stopping = threading.Event()
    _on_signals(stopping.set)
    run_trainer(settings, stopping)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from tailstream.models.towers.store import ModelStore

    settings = _settings(args)
    store = ModelStore(settings.model_store_dir)
    if args.action == "list":
        current = store.current()
        rows = store.versions()
        if args.json:
            print(json.dumps({"current": current, "versions": rows}, indent=2, default=str))
            return 0
        print(f"serving: {current}   (store: {store.root})")
        for m in rows:
            cand = m.get("metrics", {}).get("candidate", {})
            print(f"{m['version']:>7}  {m.get('status', '?'):<11} parent {m.get('parent', '?'):<7}"
                  f" {m.get('policy', {}).get('policy', '?'):<15}"
                  f" recall cart {cand.get('recall_cart', 0):.3f}"
                  f" purchase {cand.get('recall_purchase', 0):.3f}"
                  f" hit@10 {cand.get('hit_at_10', 0):.3f}  {m.get('reason', '')}")
        return 0
    if args.action == "promote":
        if not args.version:
            raise SystemExit("model promote needs a VERSION")
        entry = store.promote(args.version, args.reason or "manual promotion")
    else:
        entry = store.rollback(args.reason or "manual rollback")
    print(f"{entry['action']}: now serving {entry['version']} (was {entry['previous']})")
    _announce(settings, {"version": entry["version"], "action": entry["action"],
                         "reason": entry["reason"], "promoted_at": entry["at"]})
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import itertools
    import shlex

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from tailstream.evaluation import prequential, report

    settings = _settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in prequential.STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {list(prequential.STRATEGIES)}")
    if args.file is not None:
        from tailstream.producers.replay import read_log

        records: Any = read_log(args.file, args.format)
        dataset = f"{args.file.name} ({args.format})"
    else:
        from tailstream.producers.synthetic import ShopSimulator

        tick = itertools.count()
        sim = ShopSimulator(n_users=args.users, n_items=args.items, seed=args.seed,
                            clock=lambda: 1.7e9 + next(tick) / 300.0)
        records = itertools.chain(sim.catalogue(), sim.events())
        dataset = f"synthetic shop ({args.users} users, {args.items} items, seed {args.seed})"
        args.events = args.events or 60_000
    cfg = prequential.EvalConfig(strategies=strategies, blocks=args.blocks,
                                 rank_every=args.rank_every, steps=args.steps,
                                 batch_size=args.batch, tiny=args.tiny, seed=args.seed)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    columns = (*Progress.get_default_columns()[:2], BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("replaying through the worker state", total=args.events)
        stream = prequential.collect(records, settings, blocks=cfg.blocks,
                                     rank_every=cfg.rank_every, max_events=args.events,
                                     progress=lambda n: bar.advance(task, n))
        bar.update(task, total=len(stream.interactions), completed=len(stream.interactions))
        harness = prequential.Harness(stream, settings, cfg, out_dir)
        if any(prequential.STRATEGIES[s].kind == "transformer" for s in strategies):
            texts = len(set(stream.item_text.values())) + len(stream.interactions)
            task = bar.add_task("encoding texts (frozen encoder, shared)", total=texts)
            harness.encode_all(lambda n: bar.advance(task, n))
            bar.update(task, completed=texts)
        task = bar.add_task("strategies", total=len(strategies))
        results = {}
        for name in strategies:
            bar.update(task, description=f"strategy {name}")
            results[name] = harness.run(name)
            bar.advance(task)
    command = "tailstream " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = prequential.summarise(stream, results, dataset, cfg,
                                   {"seconds": round(time.monotonic() - started, 1)})
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    charts = report.charts(result, out_dir)
    md = report.markdown(result, command)
    md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in charts) + "\n"
    (out_dir / "report.md").write_text(md)
    if args.json is not None:
        args.json.write_text(json.dumps(
            {k: result[k] for k in ("dataset", "events", "strategies")}, indent=2))
    print(md)
    print(f"wrote {out_dir / 'eval.json'}, {out_dir / 'report.md'} and {len(charts)} charts "
          f"in {time.monotonic() - started:.0f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.what == "finetune":
        from tailstream.bench import finetune

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = finetune.run(settings.device, tuple(int(x) for x in args.seq_len.split(",")),
                              batch=args.batch, steps=args.steps, compile_=args.compile,
                              encoder_path=settings.encoder_path or None)
    elif args.what == "serve":
        from tailstream.bench import serve

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = serve.run(settings, rate=args.rate, items=args.items, users=args.users,
                           seconds=args.seconds, warmup_s=args.warmup,
                           device_setting=settings.device, topk_items=args.topk_items,
                           topk_users=args.topk_users,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    elif args.what == "ingest":
        from tailstream.bench import ingest

        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        if args.scaling:
            layouts = [tuple(int(x) for x in part.split("x")) for part in args.scaling.split(",")]
            result = ingest.scaling(settings, events=args.events,
                                    layouts=[(p, w) for p, w in layouts],
                                    workers_scorer=settings.scorer, log=say)
        else:
            result = ingest.run(settings, events=args.events,
                                partitions=args.partitions_bench, envelope_size=args.envelope,
                                workers_scorer=settings.scorer, log=say)
    else:  # pragma: no cover - argparse restricts the choices
        raise SystemExit(f"unknown benchmark {args.what}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


def _announce(settings: Settings, update: dict[str, Any]) -> None:
    """Tell running workers about a manual promote/rollback (they also read the store's
    CURRENT pointer at start, so a stack that is down learns it then)."""
    try:
        settings = _with_running_stack(settings)
    except SystemExit:
        print("no broker known: workers pick the change up when they start")
        return
    from tailstream.producers.sender import make_producer

    producer = make_producer(settings)
    try:
        producer.send(settings.topic(settings.topic_model_updates), key=b"model",
                      value=json.dumps(update).encode())
        producer.flush(10)
    finally:
        producer.close()
    print("announced on", settings.topic(settings.topic_model_updates))


def cmd_up(args: argparse.Namespace) -> int:
    from tailstream.kafka_io import create_topics
    from tailstream.stack.embedded import ServiceStack, StackInfo
    from tailstream.stack.liveview import LiveMonitor, ui_wanted
    from tailstream.stack.processes import (
        metrics_url,
        start_trainer,
        start_worker,
        trainer_metrics_url,
        wait_ready,
        wait_trainer_ready,
    )

    settings = _settings(args)
    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    embedded = not (settings.kafka_bootstrap and settings.redis_url)
    stopping = threading.Event()
    _on_signals(lambda: stopping.set())
    stack = ServiceStack(settings)
    with stack as s:
        create_topics(s)
        workers = []
        trainer = None
        view: LiveMonitor | None = None
        try:
            for i in range(args.workers):
                proc, ws = start_worker(s, i)
                workers.append((proc, ws))
            if not args.no_trainer:
                trainer = start_trainer(s)
            for proc, ws in workers:
                wait_ready(proc, ws)
            if trainer is not None:
                wait_trainer_ready(*trainer)
            children = [*stack.processes, *(w for w, _ in workers),
                        *([trainer[0]] if trainer else [])]
            info = StackInfo(s.kafka_bootstrap, s.redis_url.reveal(), embedded,
                             {p.name: p.pid for p in children})
            info.write(s.data_dir / "stack.json")
            print(f"tailstream is up.\n"
                  f"  export TAILSTREAM_KAFKA_BOOTSTRAP={s.kafka_bootstrap}\n"
                  f"  export TAILSTREAM_REDIS_URL={s.redis_url.reveal()}\n"
                  + "".join(f"  metrics: {metrics_url(ws)}\n" for _, ws in workers)
                  + (f"  trainer:  {trainer_metrics_url(trainer[1])}\n" if trainer else "")
                  + "  feed it:   tailstream produce synthetic --rate 200\n"
                    "  watch it:  tailstream subscribe\n"
                    "Ctrl-C stops everything.", flush=True)
            if ui_wanted(args.ui, sys.stdout):
                view = LiveMonitor([metrics_url(ws) for _, ws in workers],
                                   trainer_metrics_url(trainer[1]) if trainer else None,
                                   title="tailstream up").start()
            trainer_down = False
            while not stopping.is_set():
                for proc, _ in workers:
                    if not proc.alive():
                        log.error("worker %s exited:\n%s", proc.name, proc.tail(30))
                        return 1
                if trainer is not None and not trainer[0].alive() and not trainer_down:
                    # The stream goes on without fine-tuning; the workers keep serving.
                    trainer_down = True
                    log.error("the trainer exited; recommendations keep flowing with the "
                              "current model:\n%s", trainer[0].tail(30))
                stopping.wait(1.0)
        finally:
            if view is not None:
                view.stop()
            if trainer is not None:
                trainer[0].stop()
            for proc, _ in workers:
                proc.stop()
            (s.data_dir / "stack.json").unlink(missing_ok=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tailstream.stack.demo import DEMO_DEFAULTS, run_demo, synthetic_records
    from tailstream.stack.liveview import LiveMonitor, pin_ports, ui_wanted
    from tailstream.stack.processes import metrics_url, trainer_metrics_url

    settings = _settings(args)
    # A demo lasts a minute: faster fine-tune triggers than production, unless the user
    # set them (flag or env var).
    settings = settings.replace(**{
        k: v for k, v in DEMO_DEFAULTS.items()
        if ENV_PREFIX + k.upper() not in os.environ and getattr(args, f"set_{k}", None) is None})
    _on_signals(_raise_keyboard_interrupt)
    if args.replay:
        from tailstream.producers.replay import pace, read_log

        records: Any = pace(read_log(args.replay, args.format), args.speed)
        source = f"replay {args.replay} ({args.format})"
        rate = None
        seconds = args.seconds
    else:
        records = synthetic_records(args.users, args.items, args.seed, args.malformed_every)
        source = f"synthetic shop ({args.users} users, {args.items} items)"
        rate = args.rate
        seconds = args.seconds if args.seconds is not None else 60.0
    view: LiveMonitor | None = None
    if ui_wanted(args.ui, sys.stdout):  # the view scrapes /metrics: fix the ports first
        settings = pin_ports(settings)
        view = LiveMonitor([metrics_url(settings)],
                           None if args.no_trainer else trainer_metrics_url(settings),
                           title=f"tailstream demo · {source}", quiet=["tailstream.stack.demo"])
    try:
        if view is not None:
            view.start()
        summary = run_demo(settings, seconds=seconds, summary_json=args.summary_json,
                           records=records, rate=rate, ui=False, source=source,
                           trainer=not args.no_trainer)
    finally:
        if view is not None:
            view.stop()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from tailstream.producers.sender import send_records

    settings = _with_running_stack(_settings(args))
    if args.source == "synthetic":
        from tailstream.stack.demo import synthetic_records

        records: Any = synthetic_records(args.users, args.items, args.seed, args.malformed_every)
        rate = args.rate
    else:
        from tailstream.producers.replay import pace, read_log

        records = pace(read_log(args.file, args.format), args.speed)
        rate = None
    _on_signals(_raise_keyboard_interrupt)
    stats = send_records(records, settings, rate=rate, max_events=args.max_events,
                         duration_s=args.seconds, progress=not args.no_progress)
    print(json.dumps({"sent": stats.sent, "by_kind": stats.by_kind,
                      "malformed": stats.malformed, "seconds": round(stats.seconds, 2)}))
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    from tailstream.kafka_io import iter_messages, reader

    settings = _with_running_stack(_settings(args))
    consumer = reader(settings, [settings.topic(settings.topic_recommendations)],
                      from_beginning=args.from_beginning)
    _on_signals(_raise_keyboard_interrupt)
    shown = 0
    try:
        for record in iter_messages(consumer):
            if args.user and record.key != args.user.encode():
                continue
            msg = json.loads(record.value)
            if args.json:
                print(json.dumps(msg), flush=True)
            else:
                items = ", ".join(f"{it['item_id']}({it['tier'][0]})" for it in msg["items"][:8])
                print(f"{msg['user_id']:>12} [{msg['model_version']}, {msg['trigger']}] {items}",
                      flush=True)
            shown += 1
            if args.limit and shown >= args.limit:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def cmd_recs(args: argparse.Namespace) -> int:
    import redis

    from tailstream.privacy import pseudonymize
    from tailstream.streams.stores.publisher import meta_key, parse_meta

    settings = _with_running_stack(_settings(args))
    client = redis.Redis.from_url(settings.redis_url.reveal())
    try:
        user = pseudonymize(args.user, settings.pseudonymize_key.reveal())
        meta = client.hgetall(meta_key(settings.redis_prefix, user))
    finally:
        client.close()
    found = parse_meta(user, meta)
    if found is None:
        print(f"no recommendations for user {args.user!r}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=2))
    return 0


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def _on_signals(handler: Callable[[], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: handler())


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog="tailstream",
        description="Streaming, event-driven e-commerce recommender that keeps the long tail "
                    "alive. Settings come from TAILSTREAM_* env vars; flags override them.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", parents=[common], help="run the whole embedded system for a while",
                       description="Start the embedded broker and Redis (unless configured), a "
                                   "worker and a producer; show a live view; print a summary.")
    p.add_argument("--seconds", type=float, default=None,
                   help="how long to produce (default: 60 s synthetic, replay until the file ends)")
    p.add_argument("--summary-json", type=Path, default=None, help="write the summary here")
    p.add_argument("--replay", type=Path, default=None, help="replay this event log instead")
    p.add_argument("--format", choices=["taobao", "rees46", "csv"], default="taobao")
    p.add_argument("--speed", type=float, default=None,
                   help="replay speed factor over event time (default: as fast as possible)")
    _synthetic_flags(p, rate=300.0, malformed_every=300)
    _ui_flag(p)
    p.add_argument("--no-trainer", action="store_true", help="no fine-tuning process")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("up", parents=[common], help="start broker, Redis and workers; keep running",
                       description="Start the embedded services (unless configured) and worker "
                                   "processes; write {data-dir}/stack.json for other commands.")
    p.add_argument("--workers", type=int, default=1, help="worker processes (same group)")
    _ui_flag(p)
    p.add_argument("--no-trainer", action="store_true", help="run without the fine-tuning "
                                                             "process (workers keep scoring)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", parents=[common], help="run one Faust worker in the foreground",
                       description="Consume the input topics, keep state, publish lists. Needs "
                                   "TAILSTREAM_KAFKA_BOOTSTRAP and TAILSTREAM_REDIS_URL (or a "
                                   "running `tailstream up`).")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("trainer", parents=[common], help="run the fine-tuning process",
                       description="Consume training requests, fine-tune the recommender "
                                   "(GPU when present), gate, store and announce versions. "
                                   "Needs the broker and Redis (or a running `tailstream up`).")
    p.set_defaults(func=cmd_trainer)

    p = sub.add_parser("model", parents=[common], help="list, promote or roll back versions",
                       description="The model store under TAILSTREAM_MODEL_DIR "
                                   "(default {data-dir}/models).")
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("version", nargs="?", help="the version to promote (vNNNNN or base)")
    p.add_argument("--reason", default=None, help="recorded in the manifest and history")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("eval", parents=[common], help="prequential comparison of strategies",
                       description="Replay a log (or the synthetic shop) through the worker's "
                                   "state, then test-then-train every strategy block by block; "
                                   "write eval.json, report.md and PNG charts.")
    p.add_argument("file", nargs="?", type=Path, default=None,
                   help="event log to replay (default: the synthetic shop)")
    p.add_argument("--format", choices=["taobao", "rees46", "csv"], default="taobao")
    p.add_argument("--events", type=int, default=None, help="stop after this many events "
                                                            "(synthetic default 60,000)")
    p.add_argument("--strategies", default=",".join(
        ["popularity", "river", "ce", "inverse", "class_balanced", "focal", "logit_adjusted",
         "oversample", "undersample", "smote", "importance", "adaptive"]))
    p.add_argument("--blocks", type=int, default=12, help="prequential blocks")
    p.add_argument("--rank-every", type=int, default=5, help="score lists for every Nth "
                                                            "interaction")
    p.add_argument("--steps", type=int, default=150, help="steps per fine-tune")
    p.add_argument("--batch", type=int, default=256, help="pairs per step")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random BERT instead of MiniLM for the transformer strategies")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder")
    p.add_argument("--json", type=Path, default=None, help="also write the summary JSON here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", parents=[common], help="benchmarks that print JSON",
                       description="finetune: trainer pairs/s beside a bare encoder loop "
                                   "(real MiniLM, full fine-tuning, fixed sequence length). "
                                   "serve: event→Redis latency at a steady rate over a 50k "
                                   "catalogue, scorer lists/s, exact top-100 time. ingest: "
                                   "events/s of raw aiokafka, a bare Faust agent and the "
                                   "pipeline, single events and batched envelopes.")
    p.add_argument("what", choices=["finetune", "serve", "ingest"])
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--seq-len", default="64,128", help="sequence lengths, comma-separated")
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default: 1024 "
                                                           "on CUDA, 16 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (30 GPU / 3 CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    g = p.add_argument_group("serve")
    g.add_argument("--rate", type=float, default=1000.0, help="events/s sent (default 1000)")
    g.add_argument("--items", type=int, default=50_000, help="catalogue size (default 50k)")
    g.add_argument("--users", type=int, default=5000)
    g.add_argument("--seconds", type=float, default=30.0, help="measured window")
    g.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    g.add_argument("--topk-items", type=int, default=None,
                   help="items for the top-100 timing (1M on CUDA, 100k on CPU)")
    g.add_argument("--topk-users", type=int, default=1000)
    g = p.add_argument_group("ingest")
    g.add_argument("--events", type=int, default=100_000, help="backlog of events")
    g.add_argument("--bench-partitions", dest="partitions_bench", type=int, default=4,
                   help="partitions of the input topics")
    g.add_argument("--envelope", type=int, default=100, help="events per batched envelope")
    g.add_argument("--scaling", default="", metavar="PxW,...",
                   help="instead: pipeline events/s per layout of P partitions and W worker "
                        "processes, e.g. 1x1,4x1,4x2")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("produce", parents=[common], help="send events to the input topics")
    src = p.add_subparsers(dest="source", required=True)
    ps = src.add_parser("synthetic", parents=[common], help="a simulated shop")
    _synthetic_flags(ps, rate=200.0)
    _produce_flags(ps)
    pr = src.add_parser("replay", parents=[common], help="replay an event log file")
    pr.add_argument("file", type=Path)
    pr.add_argument("--format", choices=["taobao", "rees46", "csv"], required=True)
    pr.add_argument("--speed", type=float, default=None,
                    help="speed factor over event time (default: as fast as possible)")
    _produce_flags(pr)
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("subscribe", parents=[common], help="print recommendation lists live")
    p.add_argument("--user", default=None, help="only this user's lists")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest list")
    p.add_argument("--json", action="store_true", help="print the full JSON messages")
    p.add_argument("--limit", type=int, default=0, help="stop after this many lists")
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser("recs", parents=[common], help="read a user's current list from Redis")
    p.add_argument("user")
    p.set_defaults(func=cmd_recs)
    return parser


def _synthetic_flags(p: argparse.ArgumentParser, rate: float, malformed_every: int = 0) -> None:
    p.add_argument("--rate", type=float, default=rate, help=f"events/s (default {rate:g})")
    p.add_argument("--users", type=int, default=2000, help="simulated users")
    p.add_argument("--items", type=int, default=5000, help="catalogue size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malformed-every", type=int, default=malformed_every,
                   help=f"inject one malformed event every N (0: none; default {malformed_every})")


def _ui_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ui", action=argparse.BooleanOptionalAction, default=None,
                   help="live terminal view from the /metrics pages, or (--no-ui) log lines "
                        "only (default: the view when stdout is a terminal)")


def _produce_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--max-events", type=int, default=None, help="stop after this many events")
    p.add_argument("--no-progress", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "set_log_level", None) or Settings.from_env().log_level
    _logging(level)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
