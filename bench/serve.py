"""``tailstream bench serve``: event → list-in-Redis latency at a steady rate, scorer
throughput, and exact top-K retrieval time.

Three measurements, one run:

1. **End to end** (the real thing): embedded broker and Redis, one worker process with
   the transformer scorer over a synthetic catalogue of ``items`` (default 50,000), and a
   producer sending ``rate`` events/s (default 1,000) for ``warmup + seconds``. Latency
   is ``published_at − event_ts`` of every list published for an event after the warm-up
   (``published_at`` is taken right after the Redis write), so it is event → Redis.
   ``lists_per_s`` is how many lists the worker published per second in that window.
   The catalogue's text vectors are computed before the clock starts (``index_build_s``)
   and handed to the worker through the shared Redis vector cache, as a running system
   would have them.
2. **Scorer alone** (``scorer_lists_per_s``): :meth:`Scorer.recommend` on micro-batches
   of 64 users over the same catalogue, no I/O.
3. **Top-K** (``topk_ms``): exact top-100 over ``topk_items`` random unit vectors for a
   batch of ``topk_users`` users (1 M items on CUDA, 100 k on a CPU by default), median
   of 10 timed runs, torch on the device (fp16 scores on CUDA, one matrix product for the
   whole batch of users).
4. **A fine-tune beside it** (``finetune=True``, the default): the real trainer process
   (``SCHED_IDLE``, capped torch threads, back-pressure) runs on the same machine; from
   the start of the measured window, whenever it is idle, it gets a training request, so
   fine-tunes run through the window. ``latency_ms_p99_during_finetune`` is the p99 of
   the lists published while its ``tailstream_finetune_running`` gauge said so,
   ``finetune_paused_s`` how long it paused for the worker, ``model_updates`` each
   promotion's trigger → candidate → promotion → first list (``model_update_s``: the
   slowest first list).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import threading
import time
from typing import Any

import torch

from tailstream.configs import ranking_config, tower_config
from tailstream.kafka_io import TopicCounter, create_topics
from tailstream.models.serving.index import ItemIndex
from tailstream.models.serving.scorer import Scorer
from tailstream.models.towers.context import ContextEntry, UserRequest
from tailstream.models.towers.loading import load_served, pick_device
from tailstream.models.towers.store import ModelStore
from tailstream.producers.sender import SendStats, make_producer, send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.demo import (
    RecsWatcher,
    UpdatesWatcher,
    model_updates,
    percentile,
    split_latencies,
)
from tailstream.stack.embedded import ServiceStack
from tailstream.stack.processes import (
    metrics_url,
    scrape,
    stage_ms,
    start_trainer,
    start_worker,
    trainer_metrics_url,
    wait_ready,
    wait_trainer_ready,
)
from tailstream.streams.worker.scoring import shared_vectors
from tailstream.streams.worker.state import item_text


def topk_ms(device: torch.device, n_items: int, n_users: int, k: int = 100,
            dim: int = 128, reps: int = 10) -> float:
    """Median milliseconds of one exact top-k over ``n_items`` for ``n_users`` users."""
    index = ItemIndex(dim, device, capacity=n_items)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for start in range(0, n_items, 262_144):
        n = min(262_144, n_items - start)
        vecs = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
        index.upsert([f"i{start + j}" for j in range(n)], vecs)
    users = torch.nn.functional.normalize(torch.randn(n_users, dim, generator=gen), dim=-1)
    users = users.to(device)
    # Users in chunks so a CPU does not hold a 1000 × N score matrix at once.
    chunk = n_users if device.type == "cuda" else 100

    def once() -> None:
        for s in range(0, n_users, chunk):
            index.search_rows(users[s:s + chunk], k)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    once()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        once()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def scorer_lists_per_s(settings: Settings, device: torch.device, texts: list[str],
                       vectors: torch.Tensor, seconds: float = 5.0) -> float:
    served = load_served(ModelStore(settings.model_store_dir), "base",
                         settings.encoder_path or None, tower_config(settings), device)
    scorer = Scorer(served, device=device, max_len=settings.text_max_len,
                    cache_size=len(texts) + 10, ranking=ranking_config(settings))
    ids = [f"i{k}" for k in range(len(texts))]
    scorer.texts.preload(dict(zip(texts, vectors, strict=True)))
    scorer.add_items(ids, texts)
    requests = [UserRequest(f"u{u}", [ContextEntry("i", texts[(u * 7 + j) % len(texts)],
                                                   "x", ids[(u * 7 + j) % len(texts)])
                                      for j in range(4)], set()) for u in range(64)]
    log_q = -math.log(len(ids))

    def info(xs: Any) -> tuple[list[str], list[str | None], list[float]]:
        return (["tail"] * len(xs), [None] * len(xs), [log_q] * len(xs))

    scorer.recommend(requests, info)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        scorer.recommend(requests, info)
        done += len(requests)
    return done / (time.perf_counter() - started)


class FinetuneDriver(threading.Thread):
    """Keeps the trainer busy through the measured window: sends a training request
    whenever it is idle, and notes when it ran (wall-clock spans) and how long it paused."""

    def __init__(self, ws: Settings, ts: Settings, interval_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="finetune-driver")
        self.ws, self.ts, self.interval_s = ws, ts, interval_s
        self.window_from = float("inf")
        self.window_to = float("inf")
        self.spans: list[list[float]] = []
        self.requests = 0
        self.trainer: dict[str, float] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        producer = make_producer(self.ws)
        topic = self.ws.topic(self.ws.topic_training_requests)
        last_sample: float | None = None
        idle_since = 0.0
        try:
            while not self.stop_event.wait(self.interval_s):
                now = time.time()
                t = _scrape_or_empty(trainer_metrics_url(self.ts))
                self.trainer = t or self.trainer
                running = t.get("tailstream_finetune_running", 0.0) > 0
                if running:
                    if self.spans and self.spans[-1][1] == last_sample:
                        self.spans[-1][1] = now
                    else:
                        self.spans.append([last_sample or now, now])
                    idle_since = now
                elif self.window_from <= now < self.window_to and now - idle_since > 2.0:
                    producer.send(topic, key=b"bench", value=json.dumps(
                        {"reason": "bench", "requested_at": now, "signals": []}).encode())
                    producer.flush(5)
                    self.requests += 1
                    idle_since = now
                last_sample = now
        finally:
            producer.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def _scrape_or_empty(url: str) -> dict[str, float]:
    try:
        return scrape(url)
    except (OSError, ValueError):
        return {}


def run(settings: Settings, *, rate: float = 1000.0, items: int = 50_000, users: int = 5000,
        seconds: float = 30.0, warmup_s: float = 10.0, device_setting: str = "auto",
        topk_items: int | None = None, topk_users: int = 1000, finetune: bool = True,
        workers: int = 1, log: Any = print) -> dict[str, Any]:
    device = pick_device(device_setting)
    topk_n = topk_items or (1_000_000 if device.type == "cuda" else 100_000)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "target_rate_eps": rate, "catalogue_items": items, "workers": workers,
    }
    log(f"top-{100} over {topk_n:,} items for {topk_users} users on {device} …")
    result.update(topk_ms=round(topk_ms(device, topk_n, topk_users), 2), topk_items=topk_n,
                  topk_users=topk_users)
    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    sim = ShopSimulator(n_users=users, n_items=items, seed=0)
    with ServiceStack(settings) as s:
        create_topics(s)
        result.update(_index_build(s, device, [item_text(it) for it in sim.items], log))
        window = _Window(rate=rate, seconds=seconds, warmup_s=warmup_s, finetune=finetune,
                         workers=workers)
        result.update(_measure(s, sim, window, log))
        result["index_bytes_per_item"] = _index_bytes_per_item(s, device)
    result.update(window.latency_keys())
    return result


def _index_build(s: Settings, device: torch.device, texts: list[str], log: Any
                 ) -> dict[str, Any]:
    """Encode the catalogue into the shared vector cache (before the clock), then time the
    scorer alone."""
    log(f"encoding the {len(texts):,}-item catalogue (index build, before the clock) …")
    started = time.perf_counter()
    served = load_served(ModelStore(s.model_store_dir), "base", s.encoder_path or None,
                         tower_config(s), device)
    scorer = Scorer(served, device=device, max_len=s.text_max_len,
                    cache_size=len(texts) + 10, ranking=ranking_config(s),
                    shared=shared_vectors(s))
    vecs = scorer.texts.vectors(texts)
    build_s = round(time.perf_counter() - started, 1)
    log("scorer alone …")
    return {"index_build_s": build_s, "encode_texts_per_s": round(len(texts) / build_s, 1),
            "scorer_lists_per_s": round(scorer_lists_per_s(s, device, texts, vecs), 1)}


class _Window:
    """The measured window: what was sent, the lists seen, the fine-tunes beside it."""

    def __init__(self, *, rate: float, seconds: float, warmup_s: float,
                 finetune: bool, workers: int = 1) -> None:
        self.rate, self.seconds, self.warmup_s, self.finetune = rate, seconds, warmup_s, finetune
        self.workers = workers
        self.watcher = _WindowWatcher()
        self.updates = UpdatesWatcher()
        self.driver: FinetuneDriver | None = None
        self.stats: SendStats | None = None
        self.consumed = 0

    def latency_keys(self) -> dict[str, Any]:
        w, stats = self.watcher, self.stats
        assert stats is not None
        span = w.window_to - w.window_from
        lat = w.latencies_ms
        out: dict[str, Any] = {
            "rate_eps": round(stats.sent / stats.seconds, 1), "events": stats.sent,
            "events_consumed": self.consumed, "lists_measured": len(lat),
            "latency_ms_p50": _r(percentile(lat, 50)), "latency_ms_p99": _r(percentile(lat, 99)),
            "latency_ms_max": _r(max(lat) if lat else None),
            "lists_per_s": round(w.in_window / span, 1) if span > 0 else None,
            "model_versions": sorted(w.versions)}
        if self.driver is not None:
            d = self.driver
            during, outside = split_latencies(lat, w.published, d.spans)
            updates = model_updates(self.updates.updates, w.first_list)
            firsts = [u["first_list_s"] for u in updates if u["first_list_s"] is not None]
            inside = sum(max(0.0, min(b, w.window_to) - max(a, w.window_from))
                         for a, b in d.spans)
            out.update(
                latency_ms_p50_during_finetune=_r(percentile(during, 50)),
                latency_ms_p99_during_finetune=_r(percentile(during, 99)),
                latency_ms_p99_outside_finetune=_r(percentile(outside, 99)),
                lists_during_finetune=len(during),
                finetune_s_in_window=round(inside, 1), finetune_requests=d.requests,
                finetune_runs={k: int(d.trainer.get(
                    f"tailstream_finetune_runs_total{{outcome={k}}}", 0))
                    for k in ("promoted", "rejected", "failed", "skipped")},
                finetune_paused_s=round(d.trainer.get(
                    "tailstream_trainer_paused_seconds_total", 0.0), 1),
                model_update_s=max(firsts) if firsts else None, model_updates=updates)
        return out


def _measure(s: Settings, sim: ShopSimulator, window: _Window, log: Any) -> dict[str, Any]:
    """The workers (and the trainer) under a steady rate; returns the workers' figures:
    the first worker's as ``worker``, and with several (one consumer group, the event
    partitions shared, every worker holding the whole catalogue) each one's under
    ``workers_figures``."""
    started = [start_worker(s, index=i) for i in range(window.workers)]
    ws = started[0][1]
    trainer = start_trainer(ws) if window.finetune else None
    # As in the demo: the latencies come from the timestamps inside the lists, so one
    # read a second costs the embedded broker less and measures the same.
    recs = TopicCounter(s, [s.topic(s.topic_recommendations)], on_record=window.watcher,
                        every_s=1.0)
    updates = TopicCounter(s, [s.topic(s.topic_model_updates)], on_record=window.updates)
    recs.start()
    updates.start()

    def consumed() -> int:
        return int(sum(_metric(w_s, "tailstream_events_in_total") for _, w_s in started))

    try:
        for worker, w_s in started:
            wait_ready(worker, w_s)
        if trainer is not None:
            wait_trainer_ready(*trainer)
            window.driver = FinetuneDriver(ws, trainer[1])
            window.driver.start()
        send_records(sim.catalogue(), ws)
        log("waiting for the worker(s) to index the catalogue …")
        for worker, w_s in started:
            _wait_indexed(worker, w_s, len(sim.items))
        log(f"sending {window.rate:,.0f} events/s for {window.warmup_s + window.seconds:.0f} s"
            + (", fine-tuning beside it from the end of the warm-up" if trainer else "") + " …")
        start = time.time() + window.warmup_s
        window.watcher.window_from = start
        if window.driver is not None:
            window.driver.window_from = start
        stats = window.stats = send_records(itertools.islice(sim.events(), 10**9), ws,
                                            rate=window.rate,
                                            duration_s=window.warmup_s + window.seconds)
        window.watcher.window_to = time.time()
        if window.driver is not None:
            window.driver.window_to = window.watcher.window_to
        deadline = time.monotonic() + 120
        while consumed() < stats.sent and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)
        window.consumed = consumed()
        figures = [_worker_figures(scrape(metrics_url(w_s))) for _, w_s in started]
        return {"worker": figures[0], **({"workers_figures": figures} if len(figures) > 1
                                         else {})}
    finally:
        if window.driver is not None:
            window.driver.stop()
        recs.stop()
        updates.stop()
        if trainer is not None:
            trainer[0].stop()
        for worker, _ in started:
            worker.stop()


def _wait_indexed(worker: Any, ws: Settings, items: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while ws.scorer == "transformer" and _metric(ws, "tailstream_index_items") < items:
        if time.monotonic() > deadline or not worker.alive():
            raise RuntimeError(f"worker did not index the catalogue:\n{worker.tail(30)}")
        time.sleep(0.5)


def _worker_figures(m: dict[str, float]) -> dict[str, Any]:
    return {
        "batches": int(m.get("tailstream_batch_events_count", 0)),
        "events_per_batch": _ratio(m, "tailstream_batch_events"),
        "batch_ms": 1000 * _ratio(m, "tailstream_batch_duration_seconds"),
        "scoring_calls": int(m.get("tailstream_scoring_duration_seconds_count", 0)),
        "scoring_ms": 1000 * _ratio(m, "tailstream_scoring_duration_seconds"),
        "scoring_turn_users": int(m.get("tailstream_scoring_turn_users", 0)),
        "queries_encoded": int(m.get("tailstream_texts_encoded_total{purpose=query}", 0)),
        "texts_encoded_by_child": int(m.get("tailstream_encoder_process_texts_total", 0)),
        # Where the freshness went, mean ms per stage (read and queue per list, turn and
        # publish per turn): tailstream_list_stage_seconds, docs/metrics.md.
        "stage_ms": stage_ms(m)}


class _WindowWatcher(RecsWatcher):
    """Latency of lists for events that happened inside the measured window only."""

    def __init__(self) -> None:
        super().__init__()
        self.window_from = float("inf")
        self.window_to = float("inf")
        self.in_window = 0

    def __call__(self, record: Any) -> None:
        try:
            msg = json.loads(record.value)
        except (TypeError, ValueError):
            return
        version, at = str(msg.get("model_version")), msg.get("published_at")
        if at is not None and (version not in self.first_list
                               or at < self.first_list[version]):
            self.first_list[version] = at
        ts = msg.get("event_ts")
        if msg.get("trigger") != "event" or ts is None or at is None or not (
                self.window_from <= ts <= self.window_to):
            return
        self.in_window += 1
        self.versions[version] += 1
        self.latencies_ms.append(1000.0 * (at - ts))
        self.published.append(at)


def _index_bytes_per_item(settings: Settings, device: torch.device, hidden: int = 384) -> int:
    """Item vector (fp16 on CUDA, fp32 on CPU) + the item's fp16 text vector + id maps."""
    return settings.embed_dim * (2 if device.type == "cuda" else 4) + hidden * 2 + 100


def _metric(ws: Settings, name: str) -> float:
    try:
        return scrape(metrics_url(ws)).get(name, 0.0)
    except OSError:
        return 0.0


def _ratio(m: dict[str, float], name: str) -> float:
    """Mean of a histogram: sum / count (0 when empty)."""
    count = m.get(f"{name}_count", 0.0)
    return round(m.get(f"{name}_sum", 0.0) / count, 2) if count else 0.0


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
