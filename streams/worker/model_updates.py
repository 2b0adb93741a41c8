"""Following the ``model-updates`` topic from every worker (a broadcast, not a queue), and
the worker's transformer tasks.

A consumer group would hand each update to one worker only, so each worker reads every
partition of the topic with a group-less aiokafka consumer, from the end: what happened
before it started it learns from the model store's ``CURRENT`` pointer instead.

:func:`add_model_tasks` adds the two Faust tasks of a transformer worker: load the served
version and embed catalogue items as they arrive; swap to each promoted version (and
refresh the active users' lists) without a restart.

Updates by ``action``: ``promote`` and ``rollback`` (serve ``version``), ``canary`` (serve
``version`` to ``share`` of the users beside the serving version, and refresh their
lists), ``canary_rollback`` (stop, and give those users the serving version's lists
again), ``decisions`` (the trainer refitted the serving ``version``'s decision layer at a
rejected trigger: serve ``decisions`` with the same weights; lists are not recomputed,
the next ones carry the new outcomes). A worker that starts while a canary runs joins it from Redis
(``{prefix}:canary``), since it reads the topic from its end.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer

from tailstream.kafka_io import aiokafka_options
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.worker.pipeline import Pipeline
from tailstream.streams.worker.scoring import ScoringService
from tailstream.streams.worker.transport import assign_every_partition

log = logging.getLogger(__name__)

EMBED_EVERY_S = 1.0
"""While users wait for lists, catalogue items are embedded only this often."""


async def follow_model_updates(settings: Settings,
                               on_update: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Call ``on_update`` with every model-updates event published from now on."""
    topic = settings.topic(settings.topic_model_updates)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, **aiokafka_options(settings))
    await consumer.start()
    try:
        tps = await assign_every_partition(consumer, topic)
        await consumer.seek_to_end(*tps)
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    try:
                        update = json.loads(record.value)
                    except (TypeError, ValueError):
                        log.warning("ignoring a malformed model update at offset %d",
                                    record.offset)
                        continue
                    await on_update(update)
    finally:
        await consumer.stop()


def model_update_stages(update: dict[str, Any], first_list_at: float) -> dict[str, float]:
    """Seconds from the trigger (the training request) to the candidate, the promotion and
    the first list carrying the new version; {} when the update does not say when it was
    requested (a rollback, an older trainer).

    >>> model_update_stages({"requested_at": 100.0, "candidate_at": 130.0,
    ...                      "promoted_at": 131.5}, 133.0)
    {'candidate': 30.0, 'promotion': 31.5, 'first_list': 33.0}
    """
    start = update.get("requested_at")
    if not isinstance(start, int | float):
        return {}
    stages = {"candidate": update.get("candidate_at"), "promotion": update.get("promoted_at"),
              "first_list": first_list_at}
    return {k: round(float(v) - start, 3) for k, v in stages.items()
            if isinstance(v, int | float)}


async def measure_model_update(update: dict[str, Any], pipeline: Pipeline,
                               timeout_s: float = 300.0) -> dict[str, float]:
    """Wait for this worker's first list with the promoted version, then set
    ``tailstream_model_update_seconds{stage}`` and log the model-update latency."""
    version = str(update.get("version", ""))
    published: dict[str, float] = getattr(pipeline.publisher, "first_published", {})
    deadline = asyncio.get_running_loop().time() + timeout_s
    while version not in published and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if version not in published:
        return {}
    stages = model_update_stages(update, published[version])
    for stage, seconds in stages.items():
        pipeline.metrics.model_update.labels(stage).set(seconds)
    if stages:
        log.info("model-update latency of %s: %s", version, ", ".join(
            f"{k} {v:.1f}s" for k, v in stages.items()))
    return stages


def add_model_tasks(app: faust.App, settings: Settings, scoring: ScoringService,
                    pipeline: Pipeline) -> None:
    """The transformer worker's tasks: serve the current version, follow promotions."""

    def item_texts(ids: Sequence[str]) -> list[str]:
        return [pipeline.item_text.get(i) or f"item {i}" for i in ids]

    @app.task
    async def serve_transformer() -> None:
        """Load the served model version, then embed catalogue items as they arrive."""
        await scoring.start()
        await join_running_canary(settings, scoring, pipeline, item_texts)
        gc.freeze()  # the model's objects join the generation the collector never walks
        last_embed = 0.0
        while scoring.scorer is not None:
            # Users waiting for a list go first: a chunk of catalogue items holds the torch
            # thread for tens of ms. Items still get a chunk at least every second.
            now = time.monotonic()
            if pipeline.refresh.waiting and now - last_embed < EMBED_EVERY_S:
                await asyncio.sleep(0.005)
                continue
            last_embed = now
            if not await scoring.embed_pending(settings.embed_chunk):
                await asyncio.sleep(0.1)

    async def on_model_update(update: dict[str, Any]) -> None:
        await apply_model_update(update, scoring, pipeline, item_texts)

    @app.task
    async def follow_promotions() -> None:
        """Swap to each promoted version without a restart (every worker)."""
        await follow_model_updates(settings, on_model_update)


async def apply_model_update(update: dict[str, Any], scoring: ScoringService,
                             pipeline: Pipeline,
                             item_texts: Callable[[Sequence[str]], list[str]]) -> None:
    """One model-updates event (the module docstring lists the actions)."""
    version = str(update.get("version", ""))
    action = update.get("action")
    log.info("model update: %s %s", action, version)
    if action in ("canary", "canary_rollback"):
        await on_canary_update(update, scoring, pipeline, item_texts)
        return
    if action == "decisions":
        layer = update.get("decisions")
        scoring.refresh_decisions(version, layer if isinstance(layer, dict) else None)
        return
    if await scoring.swap_to(version, item_texts):
        measure = asyncio.get_running_loop().create_task(
            measure_model_update(update, pipeline))
        n = await pipeline.refresh.refresh_active("promotion")
        log.info("refreshed %d active users with %s", n, version)
        await measure


async def on_canary_update(update: dict[str, Any], scoring: ScoringService,
                           pipeline: Pipeline,
                           item_texts: Callable[[Sequence[str]], list[str]]) -> None:
    """A canary starts (serve its candidate to its share, refresh those users' lists) or
    is rolled back (drop it, refresh the same users with the serving version)."""
    version = str(update.get("version", ""))
    try:
        share = float(update.get("share", 0.0))
    except (TypeError, ValueError):
        share = 0.0
    if update.get("action") == "canary":
        if await scoring.start_canary(version, share, item_texts):
            n = await pipeline.refresh.refresh_canary_users(version, share)
            log.info("canary %s: refreshed %d active users it serves", version, n)
        return
    if scoring.end_canary(version):
        n = await pipeline.refresh.refresh_canary_users(version, share)
        log.info("canary %s rolled back (%s): refreshed %d users with %s", version,
                 update.get("reason", ""), n, scoring.version)


async def join_running_canary(settings: Settings, scoring: ScoringService, pipeline: Pipeline,
                              item_texts: Callable[[Sequence[str]], list[str]]) -> bool:
    """At start: serve the canary the trainer is running, if any (it is announced once,
    and this worker reads model-updates from the end)."""
    redis = getattr(pipeline.publisher, "redis", None)
    if redis is None or scoring.scorer is None:
        return False
    try:
        raw = await asyncio.wait_for(redis.hgetall(Keys(settings.redis_prefix).canary), 2.0)
    except Exception as exc:  # noqa: BLE001 - without Redis no canary is joined
        log.warning("could not read the running canary from redis (%r)", exc)
        return False
    info = {(k.decode() if isinstance(k, bytes) else str(k)):
            (v.decode() if isinstance(v, bytes) else str(v)) for k, v in raw.items()}
    if not info.get("version") or float(info.get("ends_by", "0") or 0) < time.time():
        return False
    return await scoring.start_canary(info["version"], float(info.get("share", "0") or 0),
                                      item_texts)
