"""The canary end to end, on the real broker, Redis and a transformer worker (MiniLM,
``towers`` lists so that a list is the model's work alone): a candidate serves half of the
users, their interactions are attributed to the lists they were served, and the trainer's
canary controller promotes a candidate whose online hit rate is not worse and rolls back
one whose is — without the serving version ever changing on the failed canary.

The versions are forced: ``v00001`` (serving at the start) and ``v00003`` have a
scrambled item tower (random projections: lists unrelated to what the user looks at),
``v00002`` is the untrained base model (lists of items like the ones the user viewed).
The simulated users keep to one category each and take the first item of their category
among the top 3 of their current list (a hit), else browse another item of it (a miss),
so better lists are hit more often whatever model made them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from kafka import KafkaProducer

from tailstream.configs import tower_config
from tailstream.contract import encode, new_event_id
from tailstream.kafka_io import create_topics, iter_messages, reader
from tailstream.metrics import TrainerMetrics
from tailstream.models.serving.canary import CanaryVerdict
from tailstream.models.towers.loading import checkpoint_tensors, load_served
from tailstream.models.towers.store import ModelStore
from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import start_worker, wait_ready
from tailstream.streams.stores.publisher import parse_meta
from tailstream.streams.trainer.canary import CanaryController

from .conftest import metric, own_settings, poll

pytestmark = pytest.mark.integration

USERS = 40
TOP = 3


def save_versions(s: Settings) -> None:
    """v00001 and v00003 scrambled (random item projections), v00002 the base model."""
    store = ModelStore(s.model_store_dir)
    base = load_served(store, "base", None, tower_config(s), torch.device("cpu"))
    tensors, included = checkpoint_tensors(base.model)
    manifest = {"parent": "base", "tower": tower_config(s).to_dict(), "encoder": {
        "base_fingerprint": base.text_fingerprint, "included": included,
        "fingerprint": base.text_fingerprint}}

    def scrambled(seed: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        w = tensors["item_proj.weight"]
        return {**tensors, "item_proj.weight": torch.randn(w.shape, generator=gen)}

    store.promote(store.save(scrambled(1), {**manifest, "note": "scrambled"}), "test: serving")
    store.save(tensors, {**manifest, "note": "the base model"})
    store.save(scrambled(2), {**manifest, "note": "scrambled"})


@pytest.fixture
def stack(broker: str, redis_url: str, tmp_path: Path
          ) -> Iterator[tuple[ManagedProcess, Settings]]:
    s = own_settings(broker, redis_url, tmp_path, scorer="transformer", rank_mode="towers",
                     recs_k=10, tail_share=0.0, rank_popularity_weight=0.0,
                     text_vectors_shared=False, torch_threads=1, canary_share=0.5,
                     canary_window_s=12.0, canary_min_lists=30, canary_confidence=0.95)
    save_versions(s)
    create_topics(s)
    proc, ws = start_worker(s)
    try:
        wait_ready(proc, ws)
        poll(lambda: metric(ws, "tailstream_model_loads_total") >= 1, 120, "the model loaded")
        yield proc, ws
    finally:
        proc.stop()


class Shoppers:
    """Users of one category each, who take the first item of their category among the
    top of their current list (read from Redis), else browse another item of it."""

    def __init__(self, ws: Settings, sim: ShopSimulator) -> None:
        self.ws = ws
        self.keys = Keys(ws.redis_prefix)
        self.redis = redis.Redis.from_url(ws.redis_url.reveal())
        self.producer = KafkaProducer(bootstrap_servers=ws.kafka_bootstrap, linger_ms=2)
        self.rng = random.Random(3)
        cats = [c for c in sim.categories if len(sim._by_cat[c]) >= 15][:20]
        self.category = {f"shopper{i}": cats[i % len(cats)] for i in range(USERS)}
        self.items = {c: [sim.items[i].item_id for i in sim._by_cat[c]] for c in cats}
        self.hits = {"serving": 0, "canary": 0}
        self.events = 0

    def lists(self) -> dict[str, dict[str, Any] | None]:
        pipe = self.redis.pipeline(transaction=False)
        for user in self.category:
            pipe.hgetall(self.keys.meta(user))
        return {u: parse_meta(u, raw) for u, raw in zip(self.category, pipe.execute(),
                                                        strict=True)}

    def act(self) -> None:
        """Every user's next click, on their current list (then wait for the new lists)."""
        before = self.lists()
        for user, cat in self.category.items():
            shown = before[user]
            items = shown["items"] if shown else []
            mine = [it["item_id"] for it in items[:TOP] if it.get("category") == cat]
            if mine:
                item = mine[0]
            else:
                listed = {it["item_id"] for it in items}
                item = self.rng.choice([i for i in self.items[cat] if i not in listed])
            self.producer.send(self.ws.topic_for("click"), key=user.encode(), value=encode({
                "event_id": new_event_id(), "user_id": user, "ts": time.time(),
                "item_id": item, "category": cat}))
            self.events += 1
        self.producer.flush()

        def renewed() -> bool:
            now = self.lists()
            return all(now[u] is not None and (before[u] is None or now[u]["generated_at"]
                                               > before[u]["generated_at"])
                       for u in self.category)

        poll(renewed, 30, "every shopper's new list", 0.05)

    def close(self) -> None:
        self.producer.close()
        self.redis.close()


def run_canary(ctl: CanaryController, shoppers: Shoppers, ws: Settings, store: ModelStore,
               version: str, serving: str, timeout: float = 240.0) -> CanaryVerdict:
    """Start the canary of ``version``, keep the shoppers shopping until it is judged;
    the serving version must not change meanwhile."""
    ctl.start(version, serving, f"test: forced {version}")
    number = int(version[1:])
    poll(lambda: metric(ws, "tailstream_canary_model_version_number") == number, 60,
         f"the worker serving the canary {version}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shoppers.act()
        assert store.current() == serving
        assert metric(ws, "tailstream_serving_model_version_number") == int(serving[1:])
        verdict = ctl.tick()
        if verdict is not None:
            return verdict
    raise AssertionError(f"the canary of {version} was not judged in {timeout:.0f} s")


def test_a_worse_candidate_is_rolled_back_and_a_better_one_promoted_by_the_canary(
        stack: tuple[ManagedProcess, Settings]) -> None:
    proc, ws = stack
    sim = ShopSimulator(n_users=10, n_items=600, seed=11)
    send_records(sim.catalogue(), ws)
    poll(lambda: metric(ws, "tailstream_index_items") >= 600, 180, "the catalogue indexed")
    store = ModelStore(ws.model_store_dir)
    client = redis.Redis.from_url(ws.redis_url.reveal())
    updates: list[dict[str, Any]] = []
    producer = KafkaProducer(bootstrap_servers=ws.kafka_bootstrap)

    def publish(update: dict[str, Any]) -> None:
        updates.append(update)
        producer.send(ws.topic(ws.topic_model_updates), key=b"model",
                      value=json.dumps(update).encode())
        producer.flush()

    metrics = TrainerMetrics()
    ctl = CanaryController(ws, store, metrics, client, publish)
    shoppers = Shoppers(ws, sim)
    try:
        for _ in range(2):  # every shopper has a list and a context
            shoppers.act()
        better = run_canary(ctl, shoppers, ws, store, "v00002", "v00001")
        poll(lambda: metric(ws, "tailstream_serving_model_version_number") == 2, 60,
             "the worker serving the promoted canary")
        assert metric(ws, "tailstream_canary_model_version_number") == 0
        for _ in range(2):
            shoppers.act()
        worse = run_canary(ctl, shoppers, ws, store, "v00003", "v00002")
        poll(lambda: metric(ws, "tailstream_canary_model_version_number") == 0, 60,
             "the worker dropping the rolled-back canary")
        shoppers.act()
        after = shoppers.lists()
        impressions = read_impressions(ws)
    finally:
        shoppers.close()
        producer.close()
        client.close()
    print(f"\nbetter: {better.reason}\nworse: {worse.reason}\n{shoppers.events} clicks; "
          f"{len(impressions)} users in the impressions topic")

    # The base model's lists were hit more than the scrambled ones': promoted.
    assert better.decision == "promote" and better.code == "not_worse", better
    assert better.candidate_rate is not None and better.serving_rate is not None
    assert better.candidate_rate > better.serving_rate
    # The scrambled candidate did worse online than the version serving: rolled back,
    # with the reason; the serving version never changed.
    assert worse.decision == "roll_back" and worse.code == "worse", worse
    assert store.current() == "v00002"
    assert metric(ws, "tailstream_serving_model_version_number") == 2
    manifest = store.manifest("v00003")
    assert manifest["status"] == "rolled_back"
    assert manifest["reason"].startswith("canary rolled back: worse online: hit rate")
    assert manifest["canary"]["verdict"]["decision"] == "roll_back"
    assert store.manifest("v00002")["status"] == "promoted"
    assert [u["action"] for u in updates] == ["canary", "promote", "canary",
                                              "canary_rollback"]
    # Everyone is served the serving version again.
    assert {lst["model_version"] for lst in after.values() if lst} == {"v00002"}
    assert metric(ws, "tailstream_impression_lists_total{arm=canary}") > 0
    assert metric(ws, "tailstream_judged_lists_total{model_version=v00003}") >= 30
    # Each list is an impression record on the topic, keyed by user.
    some = next(iter(impressions.values()))
    assert set(some) >= {"user_id", "list_id", "model_version", "arm", "policy", "trigger",
                         "published_at", "items"}
    assert some["policy"] == "towers" and some["items"][0]["position"] == 1
    assert set(impressions) <= set(shoppers.category)


def read_impressions(ws: Settings) -> dict[str, dict[str, Any]]:
    """The impressions topic, the last record per user."""
    consumer = reader(ws, [ws.topic(ws.topic_impressions)])
    try:
        return {r.key.decode(): json.loads(r.value)
                for r in iter_messages(consumer, idle_timeout=1.5)}
    finally:
        consumer.close()
