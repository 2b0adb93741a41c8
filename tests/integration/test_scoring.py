"""Scoring and publishing on the real broker, redis-server and MiniLM: cold items and
cold users are served from text, and readers never see half a list."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from functools import partial

import pytest
import redis
import redis.asyncio as aioredis
from kafka import KafkaProducer

from tailstream.contract import encode, new_event_id
from tailstream.kafka_io import reader
from tailstream.metrics import Metrics
from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.streams.stores.publisher import Publisher, RecList, parse_meta

from .conftest import metric, poll

pytestmark = pytest.mark.integration


def indexed_shop(ws: Settings, n_items: int = 600, seed: int = 5) -> ShopSimulator:
    sim = ShopSimulator(n_users=200, n_items=n_items, seed=seed)
    send_records(sim.catalogue(), ws)
    poll(lambda: metric(ws, "tailstream_index_items") >= n_items, 180,
         "the worker to embed the catalogue")
    return sim


def test_a_new_item_reaches_a_list_within_five_seconds(
        worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = worker
    sim = indexed_shop(ws)
    # Traffic in one category, then a brand-new item in it: cold start from its text.
    category = sim.items[0].category
    in_cat = [it for it in sim.items if it.category == category][:12]
    p = KafkaProducer(bootstrap_servers=ws.kafka_bootstrap, linger_ms=2)
    new = sim.new_items(1, category)[0]
    new_id = new.key
    consumer = reader(ws, [ws.topic(ws.topic_recommendations)], from_beginning=False)
    try:
        p.send(ws.topic_for("item"), key=new.key.encode(), value=new.value)
        p.flush()
        sent_at = time.monotonic()
        poll(lambda: metric(ws, "tailstream_index_items") >= 601, 5, "the new item indexed")
        found_at = None
        users = itertools.cycle(f"cold{u}" for u in range(40))
        deadline = time.monotonic() + 5.0
        while found_at is None and time.monotonic() < deadline:
            for item in in_cat[:4]:  # users browsing the category
                user = next(users)
                p.send(ws.topic_for("click"), key=user.encode(), value=encode(
                    {"event_id": new_event_id(), "user_id": user, "ts": time.time(),
                     "item_id": item.item_id, "category": category}))
            p.flush()
            for records in consumer.poll(timeout_ms=200).values():
                for r in records:
                    if any(it["item_id"] == new_id for it in json.loads(r.value)["items"]):
                        found_at = time.monotonic()
    finally:
        consumer.close()
        p.close()
    assert found_at is not None, "the new item was in no list within 5 s"
    print(f"\nnew item {new_id} first recommended {found_at - sent_at:.2f} s after it was sent")
    assert found_at - sent_at <= 5.0


def test_a_user_with_only_a_search_gets_lists_about_the_query(
        worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = worker
    sim = indexed_shop(ws)
    # The worker's turns encode new texts (the queries) in its encoder process.
    poll(lambda: metric(ws, "tailstream_encoder_process") == 1, 60, "the encoder process")
    child_before = metric(ws, "tailstream_encoder_process_texts_total")
    r = redis.Redis.from_url(ws.redis_url.reveal())
    p = KafkaProducer(bootstrap_servers=ws.kafka_bootstrap, linger_ms=2)
    shares = []
    try:
        for n, cat in enumerate(["electronics/earbuds", "home/kettle", "fashion/sneakers"]):
            noun = cat.split("/")[1].replace("-", " ")
            user = f"searcher{n}"
            p.send(ws.topic_for("search"), key=user.encode(), value=encode(
                {"event_id": new_event_id(), "user_id": user, "ts": time.time(),
                 "query": f"wireless black {noun}" if noun == "earbuds" else f"red {noun}"}))
            p.flush()
            meta = poll(partial(r.hgetall, Keys(ws.redis_prefix).meta(user)), 20,
                        f"{user}'s list")
            found = parse_meta(user, meta)
            assert found is not None and found["items"]
            top = found["items"][:10]
            share = sum(it["category"] == cat for it in top) / len(top)
            shares.append(share)
            print(f"\n{user} searched {noun!r}: {share:.0%} of the top-10 in {cat}; reasons:",
                  Counter(it["reason"].split("'")[0] for it in top))
            assert share >= 0.6, top
            assert any(it["reason"].startswith("matches your search") for it in top)
    finally:
        p.close()
        r.close()
    assert sim.items
    assert metric(ws, "tailstream_encoder_process_texts_total") >= child_before + 3


def test_readers_never_see_a_partial_list(redis_url: str) -> None:
    """Two writers replace the same user's list over and over with lists that differ in
    every item; readers of the sorted set and of the meta hash must always see one whole
    list (all items from one writer, the meta's version matching its items)."""

    async def scenario() -> tuple[int, int]:
        client = aioredis.Redis.from_url(redis_url)
        sent: list[bytes] = []

        async def to_kafka(user: str, payload: bytes) -> None:
            sent.append(payload)

        publishers = [Publisher(client, to_kafka, Metrics(), prefix="atomic") for _ in "ab"]

        def lst(tag: str, n: int) -> RecList:
            return RecList("u1", [{"item_id": f"{tag}{k}", "score": 1.0 - k / 100,
                                   "tier": "tail"} for k in range(20)],
                           model_version=tag, trigger="event", generated_at=float(n),
                           event_id=None, source_ts=None)

        stop = asyncio.Event()
        reads = mixed = 0

        async def write(pub: Publisher, tag: str) -> None:
            for n in range(400):
                await pub.publish([lst(tag, n)])
            stop.set()

        async def read() -> None:
            nonlocal reads, mixed
            reader_client = aioredis.Redis.from_url(redis_url, decode_responses=True)
            while not stop.is_set():
                members = await reader_client.zrange(Keys("atomic").recs("u1"), 0, -1)
                meta = await reader_client.hgetall(Keys("atomic").meta("u1"))
                reads += 1
                if members and len({m[0] for m in members}) != 1 or members and len(members) != 20:
                    mixed += 1
                if meta:
                    items = json.loads(meta["items"])
                    if {it["item_id"][0] for it in items} != {meta["model_version"]}:
                        mixed += 1
                await asyncio.sleep(0)
            await reader_client.aclose()

        await asyncio.gather(write(publishers[0], "a"), write(publishers[1], "b"),
                             read(), read())
        await client.aclose()
        return reads, mixed

    reads, mixed = asyncio.run(scenario())
    print(f"\n{reads} reads during 800 concurrent replacements, {mixed} partial")
    assert reads > 100 and mixed == 0
