"""The worker end to end on the real broker and redis-server: events in, lists out."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from jsonschema import Draft202012Validator
from kafka import KafkaProducer

from tailstream.contract import Item, encode
from tailstream.kafka_io import reader
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import start_worker, wait_ready

from .conftest import click, metric, poll, producer, send

pytestmark = pytest.mark.integration
SCHEMAS = Path(__file__).parents[2] / "docs" / "schemas"


def read_all(s: Settings, topic: str, expect: int, timeout: float = 30.0,
             done: Callable[[list[Any]], bool] | None = None) -> list[Any]:
    """The topic's records from its start, until ``expect`` were read (or ``done(out)``
    says so), at most ``timeout`` seconds."""
    consumer = reader(s, [topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    enough = done if done is not None else (lambda got: len(got) >= expect)
    try:
        while not enough(out) and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                out.extend(batch)
    finally:
        consumer.close()
    return out


def seed_catalogue(p: KafkaProducer, s: Settings, n: int = 40) -> None:
    """Send a catalogue and wait until the worker applied it (topics are read in parallel,
    so without the wait the first events may overtake their items)."""
    for i in range(n):
        cat = "shoes" if i % 2 else "hats"
        send(p, s, "item", f"i{i}", Item(f"i{i}", f"blue {cat[:-1]} {i}", cat, "acme", 10.0 + i)
             .to_dict())
    p.flush()
    poll(lambda: metric(s, "tailstream_catalogue_updates_total") >= n, what="catalogue")


def test_lists_reach_the_topic_and_redis(worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = worker
    p = producer(ws)
    seed_catalogue(p, ws)
    users = [f"u{n}" for n in range(20)]
    for n in range(400):
        send(p, ws, "click", users[n % 20], click(f"e{n}", users[n % 20], f"i{(n * 7) % 40}"))
    p.flush()
    p.close()

    r = redis.Redis.from_url(ws.redis_url.reveal())
    poll(lambda: all(r.exists(Keys(ws.redis_prefix).meta(u)) for u in users), what="lists")
    for u in users:
        items = r.zrevrange(Keys(ws.redis_prefix).recs(u), 0, -1)
        assert 0 < len(items) <= ws.recs_k
    r.close()

    # Every user's list, however the 400 clicks were batched: a user whose events came in
    # two batches can get a second list before a user of the second batch gets a first.
    messages = read_all(ws, ws.topic(ws.topic_recommendations), expect=20,
                        done=lambda got: {m.key.decode() for m in got} >= set(users))
    schema = Draft202012Validator(json.loads((SCHEMAS / "recommendation.json").read_text()))
    seen = set()
    for m in messages:
        value = json.loads(m.value)
        assert not list(schema.iter_errors(value)), value
        assert m.key.decode() == value["user_id"]
        seen.add(value["user_id"])
    assert seen == set(users)
    poll(lambda: metric(ws, "tailstream_events_processed_total") == 400, what="all events")


def test_malformed_events_go_to_the_dlq_with_reason(
        worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = worker
    p = producer(ws)
    seed_catalogue(p, ws, 10)
    bad = {
        b"this is not json": "not_json",
        encode({"event_id": "x1", "ts": time.time(), "item_id": "i1"}): "missing_field",
        encode({"event_id": "x2", "user_id": "u", "ts": "yesterday", "item_id": "i1"}):
            "wrong_type",
        encode({**click("x3", "u", "i1"), "v": 99}): "unknown_version",
        b"{" + b" " * 20_000 + b"}": "oversize",
    }
    for n in range(30):  # healthy events around the poison ones keep flowing
        send(p, ws, "click", "good", click(f"g{n}", "good", f"i{n % 10}"))
        if n % 6 == 0 and bad:
            raw, _ = bad_item = next(iter(bad.items()))
            send(p, ws, "click", "bad", raw)
            bad.pop(bad_item[0])
    p.flush()
    p.close()

    dead = read_all(ws, ws.topic(ws.topic_dlq), expect=5)
    assert len(dead) == 5
    reasons = sorted(dict(m.headers)["tailstream-reason"].decode() for m in dead)
    assert reasons == sorted(["not_json", "missing_field", "wrong_type", "unknown_version",
                              "oversize"])
    for m in dead:
        headers = dict(m.headers)
        assert headers["tailstream-source-topic"].decode() == ws.topic_for("click")
        assert int(headers["tailstream-source-offset"]) >= 0
    assert any(m.value == b"this is not json" for m in dead)  # the original bytes
    poll(lambda: metric(ws, "tailstream_events_processed_total") == 30, what="good events")
    assert metric(ws, "tailstream_dlq_total") == 5


def test_every_worker_reads_the_whole_catalogue_and_again_after_a_restart(
        worker: tuple[ManagedProcess, Settings]) -> None:
    """Events are shared out by the group; items are not (any list may hold any item).
    Read through the group, a second worker held half the catalogue, and a restarted one
    none of what came before its last commit."""
    first, ws = worker
    second, ws2 = start_worker(ws, index=1)
    try:
        wait_ready(second, ws2)
        p = producer(ws)
        for i in range(40):  # keyed by item: both partitions of the items topic
            send(p, ws, "item", f"i{i}", Item(f"i{i}", f"lamp {i}", "home", "acme", 5.0)
                 .to_dict())
        send(p, ws, "item", "broken", b'{"item_id": "broken", "title": ')
        p.flush()
        p.close()
        for s in (ws, ws2):
            poll(lambda s=s: metric(s, "tailstream_catalogue_updates_total") >= 40,
                 what="the whole catalogue in each worker")
        second.stop()
        second, ws2 = start_worker(ws, index=1)
        wait_ready(second, ws2)
        poll(lambda: metric(ws2, "tailstream_catalogue_updates_total") >= 40,
             what="the whole catalogue in the restarted worker")
        # Three reads of the malformed record (two workers, one restart): one dead letter.
        dead = read_all(ws, ws.topic(ws.topic_dlq), expect=2, timeout=5.0)
        assert [dict(m.headers)["tailstream-reason"] for m in dead] == [b"not_json"]
    finally:
        second.stop()
    assert first.alive()


def test_duplicate_event_ids_are_processed_once(
        worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = worker
    p = producer(ws)
    seed_catalogue(p, ws, 10)
    for _ in range(3):
        send(p, ws, "click", "u1", click("same-id", "u1", "i1"))
    # A batched envelope repeating an id, and one new event inside it.
    send(p, ws, "cart", "u1", encode([click("same-cart", "u1", "i2"),
                                      click("same-cart", "u1", "i2"),
                                      click("other-cart", "u1", "i3")]))
    p.flush()
    p.close()
    # Every one of the six events read: applied, or skipped as a duplicate (then the exact
    # split is asserted; nothing else is sent that could still change it).
    poll(lambda: metric(ws, "tailstream_events_processed_total")
         + metric(ws, "tailstream_duplicates_total") >= 6, what="all six events accounted for")
    assert metric(ws, "tailstream_events_processed_total{kind=click}") == 1
    assert metric(ws, "tailstream_events_processed_total{kind=cart}") == 2
    assert metric(ws, "tailstream_duplicates_total") == 3


def test_http_endpoint_serves_lists(worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = worker
    p = producer(ws)
    seed_catalogue(p, ws, 10)
    send(p, ws, "purchase", "buyer", {**click("b1", "buyer", "i3"), "price": 12.5,
                                      "quantity": 1})
    p.flush()
    p.close()
    base = f"http://{ws.web_host}:{ws.web_port}"
    r = redis.Redis.from_url(ws.redis_url.reveal())
    poll(lambda: r.exists(Keys(ws.redis_prefix).meta("buyer")), what="buyer's list")
    r.close()
    with urllib.request.urlopen(f"{base}/recommendations/buyer", timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["found"] is True and body["items"]
    assert {"item_id", "score", "tier", "reason"} <= set(body["items"][0])
    try:
        urllib.request.urlopen(f"{base}/recommendations/nobody", timeout=5)
        pytest.fail("expected 404")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
