"""The trainer process (``tailstream trainer``): training requests in, gated model
versions out.

It reads the ``training-requests`` topic (written by the workers' imbalance loop) from
where it left off (its position is kept in Redis), coalesces the requests that queued up
during a run into one run on the newest buffer, hands that to the
:class:`~tailstream.streams.trainer.trainer.Trainer`, and publishes each promotion on
``model-updates`` — after a canary (:mod:`~tailstream.streams.trainer.canary`), which it
judges between polls; requests that come while a canary is served wait for its end. It
serves its own ``/metrics`` (``TAILSTREAM_TRAINER_PORT``) and yields
to the stream (:mod:`~tailstream.streams.trainer.yielding`): the lowest CPU priority
(``TAILSTREAM_TRAINER_NICE``, set by the CLI, and ``SCHED_IDLE``), capped torch threads,
and pauses between training steps while a worker is over its latency budget.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from prometheus_client import start_http_server
from redis.exceptions import RedisError

from tailstream.kafka_io import reader
from tailstream.metrics import TrainerMetrics
from tailstream.models.towers.store import ModelStore
from tailstream.producers.sender import make_producer
from tailstream.settings import Settings
from tailstream.streams.stores.vector_cache import RedisVectorStore
from tailstream.streams.trainer.canary import CanaryController
from tailstream.streams.trainer.sources import TrainingData
from tailstream.streams.trainer.trainer import Trainer
from tailstream.streams.trainer.yielding import Yielder, lower_priority

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
    canary = CanaryController(settings, store, metrics, data.redis, publish)
    trainer.canary = canary
    yielder = Yielder(settings, data.redis, metrics)
    trainer.on_step = yielder.on_step
    log.info("trainer priority: %s; back-pressure %s (p99 budget %.0f ms)",
             ", ".join(lower_priority(settings)) or "unchanged",
             "on" if yielder.enabled else "off", settings.latency_budget_ms)
    topic = settings.topic(settings.topic_training_requests)
    consumer = reader(settings, [topic], from_beginning=True)
    position = Position(consumer, data, topic)
    position.resume(stop)
    canary.restore()
    log.info("trainer ready on %s (device %s, serving %s, canary %s); metrics on :%d", topic,
             trainer.device, store.current(),
             f"{100 * canary.cfg.share:.0f}% for {canary.cfg.window_s:.0f}s"
             if canary.enabled else "off", settings.trainer_port)
    held: list[dict[str, Any]] = []
    try:
        while not stop.is_set():
            canary.tick()
            polled = consumer.poll(timeout_ms=500)
            requests = [json.loads(r.value) for recs in polled.values() for r in recs]
            metrics.requests.inc(len(requests))
            held.extend(requests)
            # While a canary is served, requests wait (unanswered, so a restart reads them
            # again); once it ended, one run answers them all.
            if not held or canary.active is not None:
                continue
            trainer.handle(coalesce(held))
            held = []
            position.save()
    finally:
        consumer.close()
        producer.close()
        data.close()
        server.shutdown()
        thread.join(5)


class Position:
    """The trainer's position in training-requests, kept in Redis so a restart resumes
    there. Redis being away never stops the trainer: the start waits for it (one log line),
    a failed save is retried after the next run (at worst a request is answered twice)."""

    def __init__(self, consumer: KafkaConsumer, data: TrainingData, topic: str) -> None:
        self.consumer = consumer
        self.data = data
        self.topic = topic
        self._saving_failed = False

    def resume(self, stop: threading.Event, retry_s: float = 2.0) -> None:
        """Seek to where this trainer last was (requests already answered stay answered)."""
        warned = False
        while not stop.is_set():
            try:
                stored = self.data.redis.hgetall(self.data.keys.trainer_offsets)
            except RedisError as exc:
                if not warned:
                    log.warning("redis unavailable (%s): waiting for it to read the trainer's "
                                "position; retrying every %.0fs", type(exc).__name__, retry_s)
                    warned = True
                stop.wait(retry_s)
                continue
            for part, off in stored.items():
                self.consumer.seek(TopicPartition(self.topic, int(part)), int(off))
            if warned:
                log.info("redis is back: the trainer resumes from its stored position")
            return

    def save(self) -> None:
        try:
            self.data.redis.hset(self.data.keys.trainer_offsets, mapping={
                str(tp.partition): self.consumer.position(tp)
                for tp in self.consumer.assignment()})
        except RedisError as exc:
            if not self._saving_failed:
                log.warning("could not save the trainer's position to redis (%s); retrying "
                            "after the next run", type(exc).__name__)
            self._saving_failed = True
            return
        self._saving_failed = False
