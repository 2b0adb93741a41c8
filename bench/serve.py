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
   of 10 timed runs.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
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
from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.demo import RecsWatcher, percentile
from tailstream.stack.embedded import ServiceStack
from tailstream.stack.processes import metrics_url, scrape, start_worker, wait_ready
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


def run(settings: Settings, *, rate: float = 1000.0, items: int = 50_000, users: int = 5000,
        seconds: float = 30.0, warmup_s: float = 10.0, device_setting: str = "auto",
        topk_items: int | None = None, topk_users: int = 1000,
        log: Any = print) -> dict[str, Any]:
    device = pick_device(device_setting)
    topk_n = topk_items or (1_000_000 if device.type == "cuda" else 100_000)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "target_rate_eps": rate, "catalogue_items": items,
    }
    log(f"top-{100} over {topk_n:,} items for {topk_users} users on {device} …")
    result.update(topk_ms=round(topk_ms(device, topk_n, topk_users), 2), topk_items=topk_n,
                  topk_users=topk_users)

    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    sim = ShopSimulator(n_users=users, n_items=items, seed=0)
    texts = [item_text(it) for it in sim.items]
    with ServiceStack(settings) as s:
        create_topics(s)
        log(f"encoding the {items:,}-item catalogue (index build, before the clock) …")
        started = time.perf_counter()
        served = load_served(ModelStore(s.model_store_dir), "base", s.encoder_path or None,
                             tower_config(s), device)
        store = shared_vectors(s)
        scorer = Scorer(served, device=device, max_len=s.text_max_len,
                        cache_size=items + 10, ranking=ranking_config(s), shared=store)
        vecs = scorer.texts.vectors(texts)
        result["index_build_s"] = round(time.perf_counter() - started, 1)
        result["encode_texts_per_s"] = round(items / result["index_build_s"], 1)
        log("scorer alone …")
        result["scorer_lists_per_s"] = round(scorer_lists_per_s(s, device, texts, vecs), 1)
        del scorer, served

        worker, ws = start_worker(s)
        watcher = _WindowWatcher()
        recs = TopicCounter(s, [s.topic(s.topic_recommendations)], on_record=watcher)
        recs.start()
        try:
            wait_ready(worker, ws)
            send_records(sim.catalogue(), ws)
            log("waiting for the worker to index the catalogue …")
            deadline = time.monotonic() + 600
            while ws.scorer == "transformer" and _metric(ws, "tailstream_index_items") < items:
                if time.monotonic() > deadline or not worker.alive():
                    raise RuntimeError(f"worker did not index the catalogue:\n{worker.tail(30)}")
                time.sleep(0.5)
            log(f"sending {rate:,.0f} events/s for {warmup_s + seconds:.0f} s …")
            t0 = time.time()
            watcher.window_from = t0 + warmup_s
            stats = send_records(itertools.islice(sim.events(), 10**9), ws, rate=rate,
                                 duration_s=warmup_s + seconds)
            watcher.window_to = time.time()
            deadline = time.monotonic() + 120
            while _metric(ws, "tailstream_events_in_total") < stats.sent \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2.0)
            consumed = _metric(ws, "tailstream_events_in_total")
            m = scrape(metrics_url(ws))
            result["worker"] = {
                "batches": int(m.get("tailstream_batch_events_count", 0)),
                "events_per_batch": _ratio(m, "tailstream_batch_events"),
                "batch_ms": 1000 * _ratio(m, "tailstream_batch_duration_seconds"),
                "scoring_calls": int(m.get("tailstream_scoring_duration_seconds_count", 0)),
                "scoring_ms": 1000 * _ratio(m, "tailstream_scoring_duration_seconds"),
                "queries_encoded": int(m.get("tailstream_texts_encoded_total{purpose=query}",
                                             0))}
        finally:
            recs.stop()
            worker.stop()
    window = watcher.window_to - watcher.window_from
    lat = watcher.latencies_ms
    result.update(
        rate_eps=round(stats.sent / stats.seconds, 1), events=stats.sent,
        events_consumed=int(consumed),
        lists_measured=len(lat),
        latency_ms_p50=_r(percentile(lat, 50)), latency_ms_p99=_r(percentile(lat, 99)),
        latency_ms_max=_r(max(lat) if lat else None),
        lists_per_s=round(watcher.in_window / window, 1) if window > 0 else None,
        model_versions=sorted(watcher.versions),
        index_bytes_per_item=_index_bytes_per_item(s, device))
    return result


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
        ts = msg.get("event_ts")
        if msg.get("trigger") != "event" or ts is None or not (
                self.window_from <= ts <= self.window_to):
            return
        self.in_window += 1
        self.versions[str(msg.get("model_version"))] += 1
        self.latencies_ms.append(1000.0 * (msg["published_at"] - ts))


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
