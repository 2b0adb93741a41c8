"""The trainer process (``tailstream trainer``): training requests in, gated model
versions out.

It reads the ``training-requests`` topic (written by the workers' imbalance loop) from
where it left off (its position is kept in Redis), coalesces the requests that queued up
during a run into one run on the newest buffer, hands that to the
:class:`~tailstream.streams.trainer.trainer.Trainer`, and publishes each promotion on
``model-updates``. It serves its own ``/metrics`` (``TAILSTREAM_TRAINER_PORT``) and runs
at a lower CPU priority (``TAILSTREAM_TRAINER_NICE``, set by the CLI) so that on a shared
CPU the stream comes first.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import start_http_server

from tailstream.kafka_io import reader
from tailstream.metrics import TrainerMetrics
from tailstream.models.towers.store import ModelStore
from tailstream.producers.sender import make_producer
from tailstream.settings import Settings
from tailstream.streams.stores.vector_cache import RedisVectorStore
from tailstream.streams.trainer.sources import TrainingData
from tailstream.streams.trainer.trainer import Trainer

log = logging.getLogger(__name__)


def coalesce(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """One request answering all that queued up: the newest, with their number.

    >>> coalesce([{"requested_at": 2.0}, {"requested_at": 5.0, "reason": "drift"}])
    {'requested_at': 5.0, 'reason': 'drift', 'coalesced': 2}
    """
    latest: dict[str, Any] = max(requests, key=lambda r: float(r.get("requested_at", 0.0)))
    return {**latest, "coalesced": len(requests)}


def run_trainer(settings: Settings, stop: threading.Event) -> None:
    """Consume training requests until ``stop`` is set."""
    metrics = TrainerMetrics()
    server, thread = start_http_server(settings.trainer_port, addr=settings.web_host,
                                       registry=metrics.registry)
    store = ModelStore(settings.model_store_dir)
    data = TrainingData(settings)
    producer = make_producer(settings)
    updates_topic = settings.topic(settings.topic_model_updates)

    def publish(update: dict[str, Any]) -> None:
        producer.send(updates_topic, key=b"model", value=json.dumps(update).encode())
        producer.flush(10)

    shared = (RedisVectorStore(data.redis, settings.redis_prefix, settings.text_vectors_ttl_s)
              if settings.text_vectors_shared else None)
    trainer = Trainer(settings, store, metrics, data, publish, shared_vectors=shared)
    topic = settings.topic(settings.topic_training_requests)
    consumer = reader(settings, [topic], from_beginning=True)
    _resume(consumer, data, topic)
    log.info("trainer ready on %s (device %s, serving %s); metrics on :%d", topic,
             trainer.device, store.current(), settings.trainer_port)
    try:
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=500)
            requests = [json.loads(r.value) for recs in polled.values() for r in recs]
            if not requests:
                continue
            metrics.requests.inc(len(requests))
            trainer.handle(coalesce(requests))
            data.redis.hset(data.keys.trainer_offsets, mapping={
                str(tp.partition): consumer.position(tp) for tp in consumer.assignment()})
    finally:
        consumer.close()
        producer.close()
        data.close()
        server.shutdown()
        thread.join(5)


def _resume(consumer: KafkaConsumer, data: TrainingData, topic: str) -> None:
    """Seek to where this trainer last was (requests already answered stay answered)."""
    for part, off in data.redis.hgetall(data.keys.trainer_offsets).items():
        consumer.seek(TopicPartition(topic, int(part)), int(off))
