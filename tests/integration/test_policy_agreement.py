"""The worker decides the policy; the trainer trains with the one it published.

A worker-side pipeline with TAILSTREAM_WEIGHT_POLICY=inverse writes its buffer and live
weights to a real redis-server; a trainer whose own settings say focal (γ = 3) reads them
through the production source and must train, weigh and record the workers' policy.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import torch

from tailstream.configs import Policy
from tailstream.metrics import Metrics, TrainerMetrics
from tailstream.models.towers.encoder import write_tiny_encoder
from tailstream.models.towers.store import ModelStore
from tailstream.producers.synthetic import ShopSimulator
from tailstream.redis_io import Keys
from tailstream.settings import Secret, Settings
from tailstream.streams.stores.buffer_store import LiveWeights, RedisBufferStore
from tailstream.streams.stores.deduper import Deduper
from tailstream.streams.stores.publisher import ExposureWindow, RecList
from tailstream.streams.trainer.sources import TrainingData
from tailstream.streams.trainer.trainer import Trainer
from tailstream.streams.worker.pipeline import Pipeline, RawMessage

pytestmark = pytest.mark.integration


class Lists:
    """Where the worker's lists go in this test (no broker): nowhere."""

    def __init__(self) -> None:
        self.exposure = ExposureWindow()
        self.last_published: OrderedDict[str, float] = OrderedDict()

    @property
    def pending(self) -> int:
        return 0

    async def publish(self, lists: list[RecList]) -> int:
        return len(lists)


async def run_worker(ws: Settings, events: int) -> None:
    """The worker's pipeline over synthetic events, with its Redis-backed stores."""
    client = aioredis.Redis.from_url(ws.redis_url.reveal())
    dlq: list[Any] = []

    async def send_to_dlq(msg: RawMessage, why: Any) -> None:
        dlq.append(why)

    try:
        pipeline = Pipeline(ws, profiles={}, deduper=Deduper(client, prefix=ws.redis_prefix),
                            publisher=Lists(),
                            send_to_dlq=send_to_dlq, metrics=Metrics(),
                            buffer_store=RedisBufferStore(client, ws.redis_prefix))
        sim = ShopSimulator(n_users=300, n_items=400, seed=3)
        records = list(itertools.islice(itertools.chain(sim.catalogue(), sim.events()),
                                        events))
        batch: list[RawMessage] = []
        for offset, rec in enumerate(records):
            batch.append(RawMessage(ws.topic_for(rec.kind), 0, offset, rec.key.encode(), rec.value,
                                    rec.ts))
            if len(batch) == ws.batch_size:
                await pipeline.process(batch)
                batch = []
        if batch:
            await pipeline.process(batch)
        await pipeline.publish_weights()
        await pipeline.refresh.drain()
        assert not dlq, dlq[:3]
    finally:
        await client.aclose()


def test_the_trainer_uses_the_policy_the_workers_published(
        redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    prefix = f"pa{uuid.uuid4().hex[:8]}"
    ws = Settings().replace(redis_url=Secret(redis_url), redis_prefix=prefix,
                            data_dir=tmp_path, weight_policy="inverse", weight_max=20.0,
                            mix_warmup_events=500)
    asyncio.run(run_worker(ws, 6000))
    client = redis.Redis.from_url(redis_url)
    try:
        published = LiveWeights.from_hash(client.hgetall(Keys(prefix).weights))
    finally:
        client.close()
    assert published is not None
    assert published.policy == Policy("inverse", beta=ws.weight_beta, gamma=ws.weight_gamma,
                                      tau=ws.weight_tau, min_weight=ws.weight_min,
                                      max_weight=20.0)

    # The trainer's own environment says something else.
    ts = ws.replace(weight_policy="focal", weight_gamma=3.0, weight_max=50.0,
                    encoder_path=str(write_tiny_encoder(tmp_path / "enc")), embed_dim=32,
                    text_max_len=32, finetune_max_steps=20, finetune_batch_size=64,
                    finetune_min_samples=50, text_vectors_shared=False,
                    # The published policy alone (challengers would train others beside it).
                    selection_challengers=0)
    data = TrainingData(ts)
    store = ModelStore(ts.model_store_dir)
    try:
        trainer = Trainer(ts, store, TrainerMetrics(), data, lambda update: None,
                          device=torch.device("cpu"))
        with caplog.at_level(logging.WARNING):
            report = trainer.handle({"reason": "buffer", "requested_at": 1.0})
    finally:
        data.close()
    assert report.outcome in ("promoted", "rejected"), report.reason
    manifest = store.manifest(report.version or "")
    assert manifest["policy"] == {"policy": "inverse"}
    assert manifest["policy_published"]["policy"] == "inverse"
    assert manifest["finetune"]["policy"] == "inverse"
    assert manifest["finetune"]["gamma"] == ws.weight_gamma  # not the trainer's 3.0
    assert manifest["weights_used"] == published.weights
    assert manifest["counts_used"] == published.counts
    assert "not used" in caplog.text and "focal" in caplog.text
