"""``tailstream``: the one command line — argument parsing and dispatch only.

Every flag falls back to a ``TAILSTREAM_*`` environment variable (named in ``--help``);
settings are read once here and passed down. What each command does lives in its stage:
:mod:`tailstream.stack` (up, demo, the running stack), :mod:`tailstream.evaluation` (eval),
:mod:`tailstream.streams` (worker, trainer), :mod:`tailstream.producers`,
:mod:`tailstream.bench`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tailstream.producers.logstats import LogError, NothingUsable
from tailstream.producers.readers import FORMATS as LOG_FORMATS
from tailstream.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from tailstream.producers.readers import LogReader
    from tailstream.producers.records import ProducedRecord
    from tailstream.producers.replay import LogSpec

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
    g.add_argument("--settings", dest="settings_file", type=Path, default=None,
                   help="a settings file of TAILSTREAM_X=value lines (what `tailstream tune` "
                        "writes); env vars and flags override it [env "
                        f"{ENV_PREFIX}SETTINGS_FILE]")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    return Settings.load(getattr(args, "settings_file", None)).replace(**overrides)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The Kafka clients narrate every connection at INFO: keep their warnings only.
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def _on_signals(handler: Callable[[], None]) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: handler())


def log_spec(args: argparse.Namespace, path: Path, settings: Settings) -> LogSpec:
    """The one place the log flags (``--format``, ``--map``, ``--kinds``, ``--assume-utc``)
    become a :class:`LogSpec`, for ``eval``, ``produce replay`` and ``demo --replay``.

    Its readers print their summary to stderr at the end of the file. The first rows are
    read here, so a mapping that does not fit, a time without a zone or a small file
    without a usable event stops the command (:class:`LogError`) before it starts anything.
    """
    from tailstream import configs
    from tailstream.producers.replay import LogSpec, parse_pairs

    spec = LogSpec(path, args.format, columns=parse_pairs(args.map, "--map") or None,
                   kind_map=parse_pairs(args.kinds, "--kinds") or None,
                   assume_utc=args.assume_utc,
                   limits=configs.limits(settings, future_skew=False), on_end=_print_summary)
    spec.check()
    return spec


def _print_summary(reader: LogReader) -> None:
    print(reader.summary(), file=sys.stderr, flush=True)


def _guarded(records: Iterable[ProducedRecord],
             failed: list[LogError]) -> Iterator[ProducedRecord]:
    """Records for a producer thread: a :class:`LogError` ends them and is kept in
    ``failed`` for the main thread to report (a thread's exception would be a traceback)."""
    try:
        yield from records
    except LogError as exc:
        failed.append(exc)


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# --------------------------------------------------------------------------- commands
def cmd_worker(args: argparse.Namespace) -> int:
    from faust import Worker

    from tailstream.stack.client import preflight_redis, with_running_stack
    from tailstream.streams.worker.app import create_app

    if args.standby and not _wait_for_go():
        return 0  # told to stop before it was needed
    settings = with_running_stack(_settings(args))
    preflight_redis(settings)
    worker = create_app(settings)
    Worker(worker.app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
    return 0


def _wait_for_go() -> bool:
    """A warm spare (``up`` keeps one per worker): everything is imported; wait for a line
    on stdin to start (True), or for it to close (False)."""
    return bool(sys.stdin.readline().strip())


def cmd_trainer(args: argparse.Namespace) -> int:
    from tailstream.stack.client import preflight_redis, with_running_stack
    from tailstream.streams.trainer.process import run_trainer

    settings = with_running_stack(_settings(args))
    preflight_redis(settings)
    if settings.trainer_nice:
        os.nice(settings.trainer_nice)  # fine-tuning yields the CPU to the stream
    _threads(settings.torch_threads)
    stopping = threading.Event()
    _on_signals(stopping.set)
    run_trainer(settings, stopping)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from tailstream.models.towers.store import ModelStore
    from tailstream.stack.client import change_version, print_versions, read_online_figures

    settings = _settings(args)
    if args.action == "list":
        print_versions(ModelStore(settings.model_store_dir), args.json,
                       read_online_figures(settings))
    else:
        change_version(settings, args.action, args.version, args.reason)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # The log first: a log that cannot be read stops here, before anything heavy loads.
    log = log_spec(args, args.file, settings) if args.file is not None else None
    from tailstream.evaluation.run import Source, run_eval
    from tailstream.evaluation.specs import EvalConfig, split_strategies

    _threads(args.threads)
    cfg = EvalConfig(strategies=split_strategies(args.strategies),
                     blocks=args.blocks, rank_every=args.rank_every, steps=args.steps,
                     batch_size=args.batch, tiny=args.tiny, seed=args.seed)
    source = Source(log, args.users, args.items, args.seed, args.sale_at)
    command = "tailstream " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        result, md, paths = run_eval(settings, source, cfg, args.out, events=args.events,
                                     command=command)
    finally:
        if log is not None:
            log.finish()
    if args.json is not None:
        args.json.write_text(json.dumps(
            {k: result[k] for k in ("dataset", "events", "strategies")}, indent=2))
    print(md)
    print(f"wrote {args.out / 'eval.json'}, {args.out / 'report.md'} and {len(paths)} charts "
          f"in {result['config']['seconds']:.0f} s")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    settings = _settings(args)
    log = log_spec(args, args.file, settings) if args.file is not None else None
    from tailstream.evaluation.run import Source
    from tailstream.evaluation.specs import EvalConfig
    from tailstream.evaluation.tune import tune, write_settings

    _threads(args.threads)
    cfg = EvalConfig(blocks=args.blocks, rank_every=args.rank_every, batch_size=args.batch,
                     tiny=args.tiny, seed=args.seed)
    source = Source(log, args.users, args.items, args.seed, args.sale_at)
    command = "tailstream " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = tune(settings, source, cfg, trials=args.trials, metric=args.metric,
                  strategy=args.strategy, events=args.events, seed=args.seed,
                  say=lambda m: print(m, file=sys.stderr, flush=True))
    write_settings(args.out, result, metric=args.metric, command=command)
    print(args.out.read_text(), end="")
    print(f"wrote {args.out}: use it with --settings {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    settings = _settings(args)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.what == "finetune":
        from tailstream.bench import finetune

        _threads(args.threads)
        result = finetune.run(settings.device, tuple(int(x) for x in args.seq_len.split(",")),
                              batch=args.batch, steps=args.steps, compile_=args.compile,
                              encoder_path=settings.encoder_path or None)
    elif args.what == "serve":
        from tailstream.bench import serve

        _threads(args.threads)
        result = serve.run(settings, rate=args.rate, items=args.items, users=args.users,
                           seconds=args.seconds, warmup_s=args.warmup,
                           device_setting=settings.device, topk_items=args.topk_items,
                           topk_users=args.topk_users, finetune=args.finetune,
                           workers=args.workers, log=say)
    elif args.scaling:
        from tailstream.bench import ingest

        layouts = [tuple(int(x) for x in part.split("x")) for part in args.scaling.split(",")]
        result = ingest.scaling(settings, events=args.events,
                                layouts=[(p, w) for p, w in layouts],
                                workers_scorer=settings.scorer, log=say)
    else:
        from tailstream.bench import ingest

        result = ingest.run(settings, events=args.events, partitions=args.partitions_bench,
                            envelope_size=args.envelope, workers_scorer=settings.scorer,
                            log=say)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from tailstream.stack.up import run_up

    stopping = threading.Event()
    _on_signals(stopping.set)
    return run_up(_settings(args), stopping, workers=args.workers, trainer=not args.no_trainer,
                  ui=args.ui)


def cmd_demo(args: argparse.Namespace) -> int:
    from tailstream.stack.demo import DEMO_DEFAULTS, run_demo_view, synthetic_records

    # A demo lasts a minute: faster fine-tune triggers than production, unless the user
    # set them (flag or env var).
    settings = _settings(args).replace(**{
        k: v for k, v in DEMO_DEFAULTS.items()
        if ENV_PREFIX + k.upper() not in os.environ and getattr(args, f"set_{k}", None) is None})
    spec = log_spec(args, args.replay, settings) if args.replay else None
    _on_signals(_raise_keyboard_interrupt)
    failed: list[LogError] = []
    if spec is not None:
        from tailstream.producers.replay import pace

        records: Any = pace(_guarded(spec.reader(), failed), args.speed)
        source, rate, seconds = f"replay {spec.name}", None, args.seconds
    else:
        records = synthetic_records(args.users, args.items, args.seed, args.malformed_every,
                                    args.uptake)
        source = f"synthetic shop ({args.users} users, {args.items} items)"
        rate, seconds = args.rate, (args.seconds if args.seconds is not None else 60.0)
    try:
        summary = run_demo_view(settings, records=records, source=source, rate=rate,
                                seconds=seconds, summary_json=args.summary_json, ui=args.ui,
                                trainer=not args.no_trainer)
    finally:
        if spec is not None:
            spec.finish()
    print(json.dumps(summary, indent=2))
    if failed:
        raise failed[0]
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from tailstream.producers.sender import send_records
    from tailstream.stack.client import with_running_stack

    settings = _settings(args)
    spec = log_spec(args, args.file, settings) if args.source == "replay" else None
    settings = with_running_stack(settings)
    reader: Any = None
    if spec is None:
        from tailstream.stack.demo import react_to_lists, synthetic_records

        records: Any = synthetic_records(args.users, args.items, args.seed, args.malformed_every,
                                         args.uptake)
        rate = args.rate
        reader = react_to_lists(records, settings)  # its users see their lists
    else:
        from tailstream.producers.replay import pace

        records, rate = pace(spec.reader(), args.speed), None
    _on_signals(_raise_keyboard_interrupt)
    try:
        stats = send_records(records, settings, rate=rate, max_events=args.max_events,
                             duration_s=args.seconds, progress=not args.no_progress)
    finally:
        if spec is not None:
            spec.finish()
        if reader is not None:
            reader.close()
    print(json.dumps({"sent": stats.sent, "by_kind": stats.by_kind,
                      "malformed": stats.malformed, "seconds": round(stats.seconds, 2)}))
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    from tailstream.stack.client import follow_lists, with_running_stack

    settings = with_running_stack(_settings(args))
    _on_signals(_raise_keyboard_interrupt)
    follow_lists(settings, user=args.user, from_beginning=args.from_beginning,
                 as_json=args.json, limit=args.limit)
    return 0


def cmd_recs(args: argparse.Namespace) -> int:
    from tailstream.stack.client import read_list, with_running_stack

    found = read_list(with_running_stack(_settings(args)), args.user)
    if found is None:
        print(f"no recommendations for user {args.user!r}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=2))
    return 0


# --------------------------------------------------------------------------- parser
Sub = Any  # argparse's private _SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog="tailstream",
        description="Streaming, event-driven e-commerce recommender that keeps the long tail "
                    "alive. Settings come from TAILSTREAM_* env vars; flags override them.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_up, _add_processes, _add_model, _add_eval, _add_bench,
                _add_produce, _add_readers):
        add(sub, common)
    return parser


def _add_demo(sub: Sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[common], help="run the whole embedded system for a while",
                       description="Start the embedded broker and Redis (unless configured), a "
                                   "worker and a producer; show a live view; print a summary.")
    p.add_argument("--seconds", type=float, default=None,
                   help="how long to produce (default: 60 s synthetic, replay until the file ends)")
    p.add_argument("--summary-json", type=Path, default=None, help="write the summary here")
    p.add_argument("--replay", type=Path, default=None, help="replay this event log instead")
    _log_flags(p)
    p.add_argument("--speed", type=float, default=None,
                   help="replay speed factor over event time (default: as fast as possible)")
    _synthetic_flags(p, rate=300.0, malformed_every=300)
    _ui_flag(p)
    p.add_argument("--no-trainer", action="store_true", help="no fine-tuning process")
    p.set_defaults(func=cmd_demo)


def _add_up(sub: Sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("up", parents=[common], help="start broker, Redis and workers; keep running",
                       description="Start the embedded services (unless configured) and worker "
                                   "processes; write {data-dir}/stack.json for other commands.")
    p.add_argument("--workers", type=int, default=1, help="worker processes (same group)")
    _ui_flag(p)
    p.add_argument("--no-trainer", action="store_true", help="run without the fine-tuning "
                                                             "process (workers keep scoring)")
    p.set_defaults(func=cmd_up)


def _add_processes(sub: Sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("worker", parents=[common], help="run one Faust worker in the foreground",
                       description="Consume the input topics, keep state, publish lists. Needs "
                                   "TAILSTREAM_KAFKA_BOOTSTRAP and TAILSTREAM_REDIS_URL (or a "
                                   "running `tailstream up`).")
    p.add_argument("--standby", action="store_true",
                   help="import everything, then wait for a line on stdin before starting "
                        "(tailstream up keeps such a warm spare to restart a crashed worker "
                        "at once)")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser("trainer", parents=[common], help="run the fine-tuning process",
                       description="Consume training requests, fine-tune the recommender "
                                   "(GPU when present), gate, store and announce versions. "
                                   "Needs the broker and Redis (or a running `tailstream up`).")
    p.set_defaults(func=cmd_trainer)


def _add_model(sub: Sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("model", parents=[common], help="list, promote or roll back versions",
                       description="The model store under TAILSTREAM_MODEL_DIR "
                                   "(default {data-dir}/models).")
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("version", nargs="?", help="the version to promote (vNNNNN or base)")
    p.add_argument("--reason", default=None, help="recorded in the manifest and history")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=cmd_model)


def _replay_flags(p: argparse.ArgumentParser) -> None:
    """What eval and tune replay, and how (the log or the synthetic shop, the blocks)."""
    p.add_argument("file", nargs="?", type=Path, default=None,
                   help="event log to replay (default: the synthetic shop)")
    _log_flags(p)
    p.add_argument("--events", type=int, default=None, help="stop after this many events "
                                                            "(synthetic default 60,000)")
    p.add_argument("--blocks", type=int, default=12, help="prequential blocks")
    p.add_argument("--rank-every", type=int, default=5, help="score lists for every Nth "
                                                            "interaction")
    p.add_argument("--batch", type=int, default=256, help="pairs per step")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random BERT instead of MiniLM for the transformer strategies")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sale-at", type=int, default=None, metavar="N",
                   help="synthetic shop: a sale from record N on (carts bought twice as "
                        "often: the purchase share about doubles mid-stream)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _add_eval(sub: Sub, common: argparse.ArgumentParser) -> None:
    from tailstream.evaluation.specs import STRATEGIES

    p = sub.add_parser("eval", parents=[common], help="prequential comparison of strategies",
                       description="Replay a log (or the synthetic shop) through the worker's "
                                   "state, then test-then-train every strategy block by block; "
                                   "write eval.json, report.md and PNG charts.")
    _replay_flags(p)
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help="comma-separated; a variant with its own settings ablates one knob, "
                        "e.g. 'adaptive[tail_share=0]' or 'focal[weight_gamma=0.5]'")
    p.add_argument("--steps", type=int, default=150, help="steps per fine-tune")
    p.add_argument("--out", type=Path, default=Path("eval-out"), help="output folder")
    p.add_argument("--json", type=Path, default=None, help="also write the summary JSON here")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("tune", parents=[common], help="Bayesian search of the loop's knobs",
                       description="optuna (TPE) over the loop's knobs (policy parameters, "
                                   "tail share, fine-tune steps and learning rate, the "
                                   "blender's step, the live prior's half-life) on a replay, "
                                   "each trial one `tailstream eval` strategy; writes the best "
                                   "as a settings file for --settings.")
    _replay_flags(p)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--metric", default="hit_at_20", help="eval.json metric to maximise "
                                                        "(default hit_at_20)")
    p.add_argument("--strategy", default="adaptive", help="the strategy each trial runs")
    p.add_argument("--out", type=Path, default=Path("tuned.env"),
                   help="settings file to write (default tuned.env)")
    p.set_defaults(func=cmd_tune)


def _add_bench(sub: Sub, common: argparse.ArgumentParser) -> None:
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
    g.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the trainer fine-tuning beside the worker through the window "
                        "(latency_ms_p99_during_finetune, finetune_paused_s)")
    g.add_argument("--workers", type=int, default=1,
                   help="worker processes (one consumer group; each holds the catalogue)")
    g = p.add_argument_group("ingest")
    g.add_argument("--events", type=int, default=100_000, help="backlog of events")
    g.add_argument("--bench-partitions", dest="partitions_bench", type=int, default=4,
                   help="partitions of the input topics")
    g.add_argument("--envelope", type=int, default=100, help="events per batched envelope")
    g.add_argument("--scaling", default="", metavar="PxW,...",
                   help="instead: pipeline events/s per layout of P partitions and W worker "
                        "processes, e.g. 1x1,4x1,4x2")
    p.set_defaults(func=cmd_bench)


def _add_produce(sub: Sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("produce", parents=[common], help="send events to the input topics")
    src = p.add_subparsers(dest="source", required=True)
    ps = src.add_parser("synthetic", parents=[common], help="a simulated shop")
    _synthetic_flags(ps, rate=200.0)
    _produce_flags(ps)
    pr = src.add_parser("replay", parents=[common], help="replay an event log file")
    pr.add_argument("file", type=Path)
    _log_flags(pr, required=True)
    pr.add_argument("--speed", type=float, default=None,
                    help="speed factor over event time (default: as fast as possible)")
    _produce_flags(pr)
    p.set_defaults(func=cmd_produce)


def _add_readers(sub: Sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("subscribe", parents=[common], help="print recommendation lists live")
    p.add_argument("--user", default=None, help="only this user's lists")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest list")
    p.add_argument("--json", action="store_true", help="print the full JSON messages")
    p.add_argument("--limit", type=int, default=0, help="stop after this many lists")
    p.set_defaults(func=cmd_subscribe)
    p = sub.add_parser("recs", parents=[common], help="read a user's current list from Redis")
    p.add_argument("user")
    p.set_defaults(func=cmd_recs)


def _synthetic_flags(p: argparse.ArgumentParser, rate: float, malformed_every: int = 0) -> None:
    p.add_argument("--rate", type=float, default=rate, help=f"events/s (default {rate:g})")
    p.add_argument("--users", type=int, default=2000, help="simulated users")
    p.add_argument("--items", type=int, default=5000, help="catalogue size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--malformed-every", type=int, default=malformed_every,
                   help=f"inject one malformed event every N (0: none; default {malformed_every})")
    p.add_argument("--uptake", type=float, default=0.3,
                   help="chance that a visit starts by looking at the user's current list "
                        "(read from Redis), taking an item by its appeal (0: the shop "
                        "ignores lists; default 0.3)")


def _log_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    """How to read the log: the same flags for eval, produce replay and demo --replay."""
    g = p.add_argument_group("reading the log (docs/events.md, \"Replaying logs\")")
    g.add_argument("--format", choices=LOG_FORMATS, required=required,
                   default=None if required else "taobao",
                   help="taobao, rees46, csv (needs --map) or jsonl (the event contract's "
                        "fields plus kind)" + ("" if required else "; default taobao"))
    g.add_argument("--map", action="append", default=None, metavar="KEY=COL,...",
                   help="--format csv: columns of the contract fields, e.g. user_id=uid,"
                        "item_id=sku,kind=event,ts=time[,query=q,title=name,category=cat,"
                        "brand=b,price=p,session=s,event_id=id,...]; numbers (user_id=1,"
                        "item_id=3,...) for a CSV without a header")
    g.add_argument("--kinds", action="append", default=None, metavar="RAW=KIND,...",
                   help="raw kind values to kinds (click, cart, fav, purchase, search, "
                        "item), e.g. view=click,buy=purchase,search=search; '*=click' for "
                        "every other row (and a log without a kind column)")
    g.add_argument("--assume-utc", action="store_true",
                   help="read times without a zone as UTC (without it they are refused)")


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
    from tailstream.stack.state import StackRunning

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except StackRunning as exc:  # a second stack in the same data folder
        print(f"tailstream: {exc}", file=sys.stderr)
        return 1
    except LogError as exc:  # a log that cannot be read as asked, or gave nothing
        print(f"tailstream: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, NothingUsable) else 2


if __name__ == "__main__":
    sys.exit(main())
