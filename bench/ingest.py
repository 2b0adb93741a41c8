"""``tailstream bench ingest``: events/s through the transport, bare Faust and tailstream.

One run, one broker, the same backlog of synthetic shop events (produced before any
consumer starts, so each number is pure consumption throughput):

* ``raw_eps`` — an aiokafka consumer (no group, all partitions assigned) that only
  decodes each value with ``json.loads``: the transport's ceiling on this machine;
* ``faust_bare_eps`` — a Faust agent over the same topics that only decodes, batching
  with ``stream.take_events`` like the worker (``bench/faust_bare.py``, its own process);
* ``pipeline_eps`` — the real ``tailstream worker`` (validation, de-duplication, state,
  imbalance loop and buffer, scoring and publishing of lists), timed from its first
  consumed event to its last, by its own ``tailstream_events_in_total`` counter;
* ``envelope_eps`` — the same worker on the same events sent as batched envelopes (a
  JSON array of ``envelope_size`` events per message, see docs/events.md).

``pipeline_over_raw``, ``pipeline_over_bare`` and ``envelope_over_raw`` are the ratios.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka import KafkaProducer

from tailstream.kafka_io import aiokafka_options, create_topics, kafka_python_options
from tailstream.producers.records import ProducedRecord
from tailstream.producers.sender import KINDS
from tailstream.producers.synthetic import ShopSimulator
from tailstream.settings import Settings
from tailstream.stack.embedded import ServiceStack, free_port
from tailstream.stack.processes import metrics_url, scrape, start_worker, wait_ready


def shop(n: int, seed: int = 0) -> tuple[list[ProducedRecord], list[ProducedRecord]]:
    """The catalogue records and ``n`` events of a synthetic shop."""
    sim = ShopSimulator(n_users=20_000, n_items=5000, seed=seed)
    return list(sim.catalogue()), list(itertools.islice(sim.events(), n))


def preencode(settings: Settings, catalogue: list[ProducedRecord]) -> None:
    """Put the catalogue's text vectors in the shared Redis cache, as a running system
    has them, so the workers' throughput is not their first encoding of 5,000 items."""
    from tailstream.configs import limits, tower_config
    from tailstream.contract import validate_item
    from tailstream.models.towers.loading import load_served, pick_device
    from tailstream.models.towers.store import ModelStore
    from tailstream.models.towers.text_vectors import TextVectors
    from tailstream.streams.worker.scoring import shared_vectors
    from tailstream.streams.worker.state import item_text

    device = pick_device(settings.device)
    served = load_served(ModelStore(settings.model_store_dir), "base",
                         settings.encoder_path or None, tower_config(settings), device)
    TextVectors(served.model, served.tokenizer, device=device, max_len=settings.text_max_len,
                fingerprint=served.text_fingerprint, shared=shared_vectors(settings)
                ).vectors([item_text(validate_item(json.loads(r.value), limits(settings)))
                           for r in catalogue])


def produce(settings: Settings, records: Iterable[ProducedRecord], envelope: int = 1) -> int:
    """Send records (as envelopes of ``envelope`` events of one kind and user when > 1);
    returns the number of events sent."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20,
                             batch_size=512 * 1024, acks=1, max_request_size=8 * 1024 * 1024,
                             **kafka_python_options(settings))
    topics = {k: settings.topic_for(k) for k in KINDS}
    sent = 0
    try:
        for kind, key, values in _envelopes(records, envelope):
            value = values[0] if envelope == 1 else b"[" + b",".join(values) + b"]"
            producer.send(topics[kind], key=key.encode(), value=value)
            sent += len(values)
        producer.flush()
    finally:
        producer.close()
    return sent


def _envelopes(records: Iterable[ProducedRecord], size: int
               ) -> Iterator[tuple[str, str, list[bytes]]]:
    # An envelope holds events of one topic; keyed by the first event's user (the key
    # only places the message on a partition).
    pending: dict[str, tuple[str, list[bytes]]] = {}
    for rec in records:
        key, values = pending.setdefault(rec.kind, (rec.key, []))
        values.append(rec.value)
        if len(values) >= size:
            yield rec.kind, key, values
            del pending[rec.kind]
    for kind, (key, values) in pending.items():
        yield kind, key, values


async def raw_consume(settings: Settings, topics: list[str], expected: int) -> float:
    """Events/s of a group-less aiokafka consumer that decodes every value."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, max_partition_fetch_bytes=8 << 20,
                                fetch_max_bytes=64 << 20, **aiokafka_options(settings))
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics
               for p in sorted(consumer.partitions_for_topic(t) or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        started: float | None = None
        deadline = time.monotonic() + 300
        loads = json.loads
        while seen < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
            if started is None and batches:
                started = time.perf_counter()
            for records in batches.values():
                for r in records:
                    loads(r.value)
                    seen += 1
        if started is None or seen < expected:
            raise RuntimeError(f"raw consumer saw {seen} of {expected} events")
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def faust_bare(settings: Settings, expected: int) -> float:
    """Events/s of a decode-only Faust agent (in its own process, like a worker)."""
    out = settings.data_dir / "faust-bare.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, **settings.to_env(), "BENCH_EXPECTED": str(expected),
           "BENCH_OUT": str(out)}
    proc = subprocess.run([sys.executable, "-m", "tailstream.bench.faust_bare"], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"bare Faust agent failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(out.read_text())["eps"])


def worker_eps(settings: Settings, expected: int, timeout: float = 900.0,
               workers: int = 1) -> dict[str, Any]:
    """Run ``workers`` worker processes (one consumer group) over the backlog; events/s
    from the first consumed event to the last, summed over the workers (events, not
    messages: each value of an envelope counts)."""
    started = [start_worker(settings, index=i) for i in range(workers)]
    try:
        for proc, ws in started:
            wait_ready(proc, ws, timeout=180)
        urls = [metrics_url(ws) for _, ws in started]
        last: dict[str, dict[str, float]] = {}
        first_t: float | None = None
        first_n = 0.0
        deadline = time.monotonic() + timeout
        n = 0.0
        while time.monotonic() < deadline:
            for url in urls:
                try:
                    last[url] = scrape(url, timeout=10.0)
                except OSError:  # a busy worker answers late: keep its last page
                    pass
            n = sum(m.get("tailstream_events_in_total", 0.0) for m in last.values())
            now = time.perf_counter()
            if first_t is None and n > 0:
                first_t, first_n = now, n
            if n >= expected:
                break
            for proc, _ in started:
                if not proc.alive():
                    raise RuntimeError(f"worker died:\n{proc.tail(30)}")
            time.sleep(0.2)
        if first_t is None or n < expected:
            raise RuntimeError(f"workers read {n} of {expected} events:\n"
                               f"{started[0][0].tail(20)}")
        elapsed = time.perf_counter() - first_t
        batches = sum(m.get("tailstream_batch_events_count", 0.0) for m in last.values())
        return {"eps": (n - first_n) / elapsed if elapsed > 0 else float("nan"),
                "events_per_batch": round(n / batches, 1) if batches else None,
                "lists": int(sum(m.get("tailstream_recommendations_published_total{sink=redis}",
                                       0) for m in last.values())),
                "catchup_rest_s": round(sum(
                    m.get("tailstream_scoring_catchup_rest_seconds_total", 0.0)
                    for m in last.values()), 1)}
    finally:
        for proc, _ in started:
            proc.stop()


def scaling(settings: Settings, *, events: int, layouts: list[tuple[int, int]],
            workers_scorer: str = "baseline", log: Any = print) -> dict[str, Any]:
    """Pipeline events/s for each (partitions, worker processes) layout, same backlog."""
    settings = settings.replace(scorer=workers_scorer, web_port=free_port(), dedupe_ttl_s=1)
    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    catalogue, records = shop(events)
    rows = []
    with ServiceStack(settings) as s:
        for partitions, workers in layouts:
            ns = s.replace(partitions=partitions, topic_prefix=f"scale{partitions}x{workers}-",
                           app_id=f"bench-scale-{partitions}x{workers}")
            create_topics(ns)
            produce(ns, catalogue)
            produce(ns, records)
            log(f"{partitions} partitions, {workers} worker(s) …")
            w = worker_eps(ns, events, workers=workers)
            rows.append({"partitions": partitions, "workers": workers,
                         "pipeline_eps": round(w["eps"], 1),
                         "events_per_batch": w["events_per_batch"]})
    return {"events": events, "scorer": workers_scorer, "cpus": os.cpu_count(), "layouts": rows}


def run(settings: Settings, *, events: int = 100_000, partitions: int = 4,
        envelope_size: int = 100, workers_scorer: str = "transformer",
        log: Any = print) -> dict[str, Any]:
    if not settings.kafka_bootstrap:
        settings = settings.with_embedded_group_timing()
    settings = settings.replace(partitions=partitions, scorer=workers_scorer,
                                web_port=free_port(),
                                # de-duplication must not skip the envelope run's events
                                dedupe_ttl_s=1)
    catalogue, records = shop(events)
    result: dict[str, Any] = {"events": events, "partitions": partitions,
                              "envelope_size": envelope_size, "scorer": workers_scorer}
    with ServiceStack(settings) as s:
        single = s.replace(topic_prefix="single-", app_id="bench-single")
        enveloped = s.replace(topic_prefix="envelope-", app_id="bench-envelope")
        for ns in (single, enveloped):
            create_topics(ns)
            produce(ns, catalogue)
        if workers_scorer == "transformer":
            log("encoding the catalogue into the shared vector cache …")
            preencode(s, catalogue)
        log(f"producing {events:,} events, one per message …")
        produce(single, records)
        log(f"producing {events:,} events in envelopes of {envelope_size} …")
        produce(enveloped, records, envelope_size)
        log("raw aiokafka …")
        result["raw_eps"] = round(asyncio.run(raw_consume(single, single.input_topics,
                                                          events)), 1)
        log("bare Faust agent …")
        result["faust_bare_eps"] = round(faust_bare(single.replace(app_id="bench-bare"),
                                                    events), 1)
        log("tailstream worker …")
        w = worker_eps(single, events)
        result["pipeline_eps"] = round(w["eps"], 1)
        result["pipeline_events_per_batch"] = w["events_per_batch"]
        # Lists written while the backlog was read, and how long scoring rested so that
        # the worker read it first (streams/worker/catchup.py); the rest follow it.
        result["pipeline_lists_in_window"] = w["lists"]
        result["pipeline_catchup_rest_s"] = w["catchup_rest_s"]
        log("tailstream worker on envelopes …")
        e = worker_eps(enveloped, events)
        result["envelope_eps"] = round(e["eps"], 1)
        result["envelope_lists_in_window"] = e["lists"]
        result["envelope_catchup_rest_s"] = e["catchup_rest_s"]
    raw = result["raw_eps"]
    result["pipeline_over_raw"] = round(result["pipeline_eps"] / raw, 4)
    result["pipeline_over_bare"] = round(result["pipeline_eps"] / result["faust_bare_eps"], 4)
    result["envelope_over_raw"] = round(result["envelope_eps"] / raw, 4)
    return result


