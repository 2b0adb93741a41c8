"""A worker told to swap to a corrupt checkpoint refuses it and keeps serving the version
it has (tiny random BERT encoder, so the transformer path runs in seconds)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import redis
from kafka import KafkaProducer

from tailstream.configs import tower_config
from tailstream.contract import encode, new_event_id
from tailstream.models.towers.encoder import load_encoder, write_tiny_encoder
from tailstream.models.towers.loading import build_model, checkpoint_tensors
from tailstream.models.towers.store import WEIGHTS_FILE, ModelStore
from tailstream.producers.sender import send_records
from tailstream.producers.synthetic import ShopSimulator
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.streams.stores.publisher import parse_meta

from .conftest import metric, poll

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings with the transformer on a tiny encoder, and a promoted v00001
    in the model store before the worker starts (so it serves v00001)."""
    encoder = write_tiny_encoder(tmp_path / "tiny-encoder")
    s = settings.replace(scorer="transformer", encoder_path=str(encoder), embed_dim=32,
                         text_max_len=32, torch_threads=1, text_vectors_shared=False)
    save_version(s)
    ModelStore(s.model_store_dir).promote("v00001", "test: the version being served")
    return s


def save_version(s: Settings) -> str:
    """A valid checkpoint for the tiny encoder (the untrained towers and head)."""
    enc = load_encoder(s.encoder_path)
    tower = tower_config(s)
    tensors, included = checkpoint_tensors(build_model(enc, tower))
    return ModelStore(s.model_store_dir).save(tensors, {
        "parent": "base", "tower": tower.to_dict(),
        "encoder": {"base_fingerprint": enc.fingerprint, "included": included,
                    "fingerprint": enc.fingerprint}})


def test_a_corrupt_announced_version_is_refused_and_the_current_one_keeps_serving(
        worker: tuple[ManagedProcess, Settings]) -> None:
    proc, ws = worker
    poll(lambda: metric(ws, "tailstream_model_loads_total") >= 1, 60, "the model loaded")
    assert metric(ws, "tailstream_serving_model_version_number") == 1  # v00001
    sim = ShopSimulator(n_users=20, n_items=60, seed=4)
    send_records(sim.catalogue(), ws)
    poll(lambda: metric(ws, "tailstream_index_items") >= 60, 60, "the catalogue indexed")

    # v00002: saved, then its weights altered on disk (a bad disk, a partial copy).
    store = ModelStore(ws.model_store_dir)
    bad = save_version(ws)
    path = store.root / "versions" / bad / WEIGHTS_FILE
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))

    producer = KafkaProducer(bootstrap_servers=ws.kafka_bootstrap, linger_ms=1)
    r = redis.Redis.from_url(ws.redis_url.reveal())
    try:
        announcement = json.dumps({"version": bad, "parent": "v00001", "action": "promote",
                                   "reason": "test", "encoder_changed": False}).encode()

        def refused() -> bool:
            # The worker follows model-updates from the end once it has joined: repeat
            # the announcement until it has read (and refused) one.
            if metric(ws, "tailstream_model_loads_total{outcome=failed}") >= 1:
                return True
            producer.send(ws.topic(ws.topic_model_updates), key=b"model", value=announcement)
            producer.flush()
            return False

        poll(refused, 60, "the worker to read the announcement", interval=0.2)
        assert metric(ws, "tailstream_serving_model_version_number") == 1
        assert proc.alive()

        # Lists keep coming, from v00001.
        user = "after-bad-announcement"
        event_id = new_event_id()
        producer.send(ws.topic_for("click"), key=user.encode(), value=encode(
            {"event_id": event_id, "user_id": user, "ts": time.time(),
             "item_id": sim.items[0].item_id}))
        producer.flush()
        found = poll(lambda: parse_meta(user, r.hgetall(Keys(ws.redis_prefix).meta(user))),
                     30, "the user's list")
        # That list is the worker's work after the refusal: still alive, still on v00001.
        assert metric(ws, "tailstream_serving_model_version_number") == 1
        assert proc.alive()
    finally:
        producer.close()
        r.close()
    log_text = proc.log_path.read_text(errors="replace")
    said = [line for line in log_text.splitlines() if f"could not load model {bad}" in line]
    print(f"\nworker refused {bad} ({said[0][:160] if said else '?'}); list of {user} from "
          f"{found['model_version']} with {len(found['items'])} items")
    assert found["model_version"] == "v00001" and found["items"]
    assert found["event_id"] == event_id
    assert said and "v00001 keeps serving" in said[0]
    assert "sha256" in log_text  # the reason is in the log
    assert store.current() == "v00001"
