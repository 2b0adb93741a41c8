"""A Redis outage under steady load: the worker keeps ingesting, loses nothing, and its
lists are current again within seconds of Redis coming back.

The test runs its own redis-server (the embedded helper, on a fixed free port), kills it
with SIGKILL for 30 s while a producer sends at a fixed rate, then starts a fresh one on
the same port (no persistence: it comes back empty, like a crashed cache node).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from kafka import KafkaProducer

from tailstream.contract import encode, new_event_id
from tailstream.kafka_io import create_topics
from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.stack.processes import start_worker, wait_ready
from tailstream.streams.stores.publisher import parse_meta

from .conftest import (
    OwnService,
    apoll,
    imbalance,
    metrics,
    own_settings,
    poll,
    processed,
    read_until,
    wait_committed,
    wait_metric,
)

pytestmark = pytest.mark.integration

RATE = 400.0  # events/s sent by the producer, before, during and after the outage
OUTAGE_S = 30.0
BEFORE_S = 8.0
RECOVERY_BOUND_S = 10.0


def rate_over(ws: Settings, seconds: float, samples: list[float] | None = None) -> float:
    """Events/s processed over the next ``seconds`` (per-second rates into ``samples``)."""
    start = last = processed(ws)
    began = prev = time.monotonic()
    while time.monotonic() - began < seconds:
        # Not a wait for a condition: the rate is measured over a fixed span, per second.
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - began))))
        now, t = processed(ws), time.monotonic()
        if samples is not None and t > prev:
            samples.append((now - last) / (t - prev))
        last, prev = now, t
    return (last - start) / (prev - began)


def redis_buffer_size(r: redis.Redis, prefix: str) -> int:
    """Samples of the minority buffer in Redis (minority and tail lists, reservoirs)."""
    total = 0
    for key in r.scan_iter(match=f"{prefix}:buffer:*"):
        kind = r.type(key)
        if kind == b"list":
            total += int(r.llen(key))
        elif kind == b"hash" and b":reservoir:" in key:
            total += int(r.hlen(key))
    return total


def send_probe(producer: KafkaProducer, ws: Settings, user: str) -> str:
    event_id = new_event_id()
    producer.send(ws.topic_for("click"), key=user.encode(), value=encode(
        {"event_id": event_id, "user_id": user, "ts": time.time(), "item_id": "probe-item"}))
    producer.flush()
    return event_id


def list_event_id(r: redis.Redis, ws: Settings, user: str) -> str | None:
    try:
        found = parse_meta(user, r.hgetall(Keys(ws.redis_prefix).meta(user)))
    except redis.RedisError:
        return None
    return None if found is None else found.get("event_id")


def test_worker_keeps_its_pace_through_a_redis_outage_and_catches_up(
        broker: str, own_redis: OwnService, tmp_path: Path) -> None:
    ws0 = own_settings(broker, own_redis.address, tmp_path, scorer="baseline")
    create_topics(ws0)
    proc, ws = start_worker(ws0)
    stop = threading.Event()
    sim = ShopSimulator(n_users=2000, n_items=3000, seed=21)
    sender = threading.Thread(target=send_records, args=(sim.events(), ws),
                              kwargs={"rate": RATE, "stop": stop}, daemon=True)
    probes = KafkaProducer(bootstrap_servers=ws.kafka_bootstrap, linger_ms=1)
    r = redis.Redis.from_url(own_redis.address, socket_timeout=1, socket_connect_timeout=1)
    try:
        wait_ready(proc, ws)
        sender.start()
        # About two seconds into the load: past the start, at the producer's pace.
        wait_metric(ws, "tailstream_events_processed_total", 2 * RATE, 30,
                    "the worker to process the first events")
        before = rate_over(ws, BEFORE_S)
        assert before > 0.5 * RATE, f"the worker did not keep up before the outage: {before}"

        # --- outage: SIGKILL, 30 s, a user acts in the middle of it ----------------------
        own_redis.kill()
        killed_at, at_kill = time.monotonic(), processed(ws)
        per_second: list[float] = []
        rate_over(ws, OUTAGE_S / 3, per_second)
        outage_user = f"outage-{uuid.uuid4().hex[:6]}"
        outage_event = send_probe(probes, ws, outage_user)
        rate_over(ws, OUTAGE_S - (time.monotonic() - killed_at), per_second)
        during = (processed(ws) - at_kill) / (time.monotonic() - killed_at)
        m_out = metrics(ws)

        # --- Redis returns (empty) on the same port; users act right after -------------
        own_redis.start()
        back_at = time.monotonic()
        users = [f"after-{uuid.uuid4().hex[:6]}-{i}" for i in range(5)]
        wanted = {u: send_probe(probes, ws, u) for u in users}
        current_at = None
        while time.monotonic() - back_at < 30:
            if all(list_event_id(r, ws, u) == e for u, e in wanted.items()):
                current_at = time.monotonic()
                break
            time.sleep(0.05)
        recovery_s = (current_at or time.monotonic()) - back_at
        # The user who acted during the outage has the list the worker kept for them.
        outage_list = read_until(lambda: list_event_id(r, ws, outage_user),
                                 lambda e: e == outage_event, timeout=10, interval=0.1)
        stop.set()
        sender.join(10)
        # The last batches applied and committed; then nothing waits for Redis: no list,
        # no buffer or weights write (the buffer's background retry, the weights timer).
        wait_committed(ws)

        def nothing_waits() -> bool:
            m = metrics(ws)
            return (m.get("tailstream_publish_pending_lists", 0) == 0
                    and m.get("tailstream_buffer_pending_writes", 0) == 0
                    and bool(r.exists(f"{ws.redis_prefix}:weights")))

        poll(nothing_waits, 30, "no list, buffer or weights write waiting for Redis",
             detail=lambda: str({k: v for k, v in metrics(ws).items() if "pending" in k}))
        m_back = metrics(ws)
        prefix = ws.redis_prefix
        buffer_keys = sorted(k.decode() for k in r.scan_iter(match=f"{prefix}:buffer:*"))
        in_memory = sum(imbalance(ws)["buffer_sizes"].values())
        in_redis = redis_buffer_size(r, prefix)
        lists_after = sum(1 for _ in r.scan_iter(match=Keys(prefix).meta_pattern, count=1000))
        weights = r.hgetall(f"{prefix}:weights")
    finally:
        stop.set()
        sender.join(10)
        probes.close()
        r.close()
        proc.stop()

    log_text = proc.log_path.read_text(errors="replace")
    redis_lines = [line for line in log_text.splitlines()
                   if "redis" in line.lower() and re.search(r"\bWARNING\b|\bERROR\b", line)]
    print(f"\nevents/s processed before the outage: {before:.0f}, during the 30 s outage: "
          f"{during:.0f} ({during / before:.0%}), slowest second during: "
          f"{min(per_second):.0f}; producer rate {RATE:.0f}/s"
          f"\nlists of users who acted after Redis returned current {recovery_s:.2f} s after "
          f"it accepted connections (bound {RECOVERY_BOUND_S:.0f} s)"
          f"\nmetrics at the end of the outage: redis_up {m_out.get('tailstream_redis_up')}, "
          f"circuit_open {m_out.get('tailstream_redis_circuit_open')}, redis errors "
          f"{m_out.get('tailstream_redis_errors_total')}, lists waiting "
          f"{m_out.get('tailstream_publish_pending_lists')}, ids de-duplicated locally "
          f"{m_out.get('tailstream_dedupe_local_only_total')}, buffer writes waiting "
          f"{m_out.get('tailstream_buffer_pending_writes')}"
          f"\nafter: redis_up {m_back.get('tailstream_redis_up')}, outages "
          f"{m_back.get('tailstream_redis_outages_total')}, last outage "
          f"{m_back.get('tailstream_redis_last_outage_seconds', 0):.1f} s, lists in the new "
          f"Redis {lists_after}, buffer samples in Redis {in_redis} (worker memory "
          f"{in_memory})"
          f"\nworker log lines about redis at WARNING/ERROR: {len(redis_lines)}")
    for line in redis_lines:
        print("   ", line[:200])

    assert during >= 0.5 * before, (before, during)
    assert current_at is not None and recovery_s <= RECOVERY_BOUND_S, recovery_s
    assert outage_list == outage_event, "the list of a user who acted during the outage"
    # The outage is visible in the metrics while it lasts, and its end afterwards.
    assert m_out.get("tailstream_redis_up") == 0
    assert m_out.get("tailstream_redis_circuit_open") == 1
    assert m_out.get("tailstream_redis_errors_total", 0) > 0
    assert m_out.get("tailstream_publish_pending_lists", 0) > 0
    assert m_out.get("tailstream_dedupe_local_only_total", 0) > 0
    assert m_back.get("tailstream_redis_up") == 1
    assert m_back.get("tailstream_redis_circuit_open") == 0
    assert m_back.get("tailstream_redis_outages_total") == 1
    assert m_back.get("tailstream_redis_last_outage_seconds", 0) >= OUTAGE_S - 1
    assert m_back.get("tailstream_publish_dropped_total", 0) == 0
    # The new Redis came back empty: the whole buffer is written again from memory (not
    # just the changes made since), and the weights.
    assert any(":buffer:minority:" in k for k in buffer_keys), buffer_keys
    assert in_redis == in_memory > 0
    assert weights and lists_after > len(users)
    # One line when the outage starts (and one for the buffer written again), none per
    # batch, and no tracebacks.
    assert 1 <= len(redis_lines) <= 3, redis_lines
    at = log_text.find("Traceback")
    assert at < 0, log_text[max(0, at - 400):at + 3000]


def test_the_text_vector_cache_skips_a_dead_redis_and_writes_later(
        own_redis: OwnService) -> None:
    """The scoring thread's cache: misses at once while Redis is down (no call per text
    waits on a socket), keeps what it computed (bounded), writes it when Redis is back."""
    import torch

    from tailstream.streams.stores.vector_cache import RedisVectorStore, text_field

    client = redis.Redis.from_url(own_redis.address, socket_timeout=1, socket_connect_timeout=1)
    cache = RedisVectorStore(client, "vt", max_pending=3, max_backoff_s=0.5)
    try:
        cache.put_many("fp", {"a": torch.ones(4)})
        assert set(cache.get_many("fp", ["a", "b"])) == {"a"}
        own_redis.kill()
        started = time.monotonic()
        for n in range(200):
            assert cache.get_many("fp", [f"t{n}"]) == {}
        cache.put_many("fp", {f"v{n}": torch.full((4,), float(n)) for n in range(5)})
        assert time.monotonic() - started < 2.0
        assert cache.health.is_down and cache.pending == 3  # bounded: the newest 3
        own_redis.start()
        poll(lambda: cache.health.retry_in() == 0, 5, "the cache's backoff to end", 0.02)
        assert cache.get_many("fp", ["v4"]) == {}  # this call closes the circuit, then
        assert cache.pending == 0  # the waiting vectors are written
        got = cache.get_many("fp", ["v2", "v3", "v4", "v0"])
        assert sorted(got) == ["v2", "v3", "v4"]
        assert torch.equal(got["v4"], torch.full((4,), 4.0, dtype=torch.float16))
        assert client.hexists("vt:textvec:fp", text_field("v4"))
    finally:
        client.close()


def test_dedupe_and_buffer_writes_never_wait_on_a_dead_redis(own_redis: OwnService) -> None:
    """Unit-sized check on the real server: with Redis gone, a batch's de-dup check and
    buffer write return at once (circuit open), and nothing queued is lost."""
    import asyncio

    import redis.asyncio as aioredis

    from tailstream.metrics import Metrics
    from tailstream.models.imbalance.buffer import MinorityBuffer, Sample
    from tailstream.streams.stores.buffer_store import RedisBufferStore
    from tailstream.streams.stores.deduper import Deduper
    from tailstream.streams.stores.publisher import Publisher

    async def scenario() -> tuple[float, list[bool], int, int]:
        client = aioredis.Redis.from_url(own_redis.address, socket_timeout=2,
                                         socket_connect_timeout=1)

        async def nowhere(user: str, payload: bytes) -> None:
            return None

        Publisher(client, nowhere, Metrics(), prefix="dd", max_backoff_s=0.5)
        dedupe = Deduper(client, prefix="dd")
        store = RedisBufferStore(client, "dd")
        buffer = MinorityBuffer(capacity_per_class=50, minority_share=0.1, tail_capacity=50)
        assert await dedupe.first_seen(["e0"], ["t/0/0"]) == [True]
        own_redis.kill()
        started = time.monotonic()
        shares = {"click": 0.95, "purchase": 0.01}
        for n in range(1, 301):
            sample = Sample(f"e{n}", "u1", f"i{n}", "purchase", float(n))
            assert buffer.offer(sample, shares)
            await store.apply([("minority", None, sample)], buffer)
            assert await dedupe.first_seen([f"e{n}", "e0"], [f"t/0/{n}", "t/9/9"]) == \
                [True, False]
        took = time.monotonic() - started
        own_redis.start()
        # The buffer's own retry flushes without a new batch.
        await apoll(lambda: store.pending == 0, 10, "the buffer's queued writes flushed")
        again = await dedupe.first_seen(["e1", "e300", "fresh"], ["t/5/5", "t/0/300", "t/0/9"])
        stored = await client.llen("dd:buffer:minority:purchase")
        marked = await client.exists("dd:seen:e150")
        await client.aclose()
        return took, again, stored, marked

    took, again, stored, marked = asyncio.run(scenario())
    print(f"\n300 batches with Redis dead took {took:.2f} s")
    assert took < 3.0
    # e1 came from another message: a duplicate; e300 from the same one: a redelivery.
    assert again == [False, True, True]
    assert stored == 50  # the buffer's capacity: LTRIM semantics kept
    assert marked == 1  # ids seen during the outage are marked once Redis is back

