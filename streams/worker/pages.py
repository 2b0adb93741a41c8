"""The worker's web pages (Faust's web server, bound to ``TAILSTREAM_WEB_HOST``).

* ``/metrics`` — every Prometheus metric of the worker (docs/metrics.md);
* ``/imbalance`` — the imbalance loop's snapshot as JSON (class counts and shares, weights
  and policy, buffer sizes, triggers, tiers, the river fast path);
* ``/recommendations/{user_id}`` — the user's current list from Redis (404 when none);
  callers ask with the id they know, pseudonymised here when that is on.
"""

from __future__ import annotations

import json
from typing import Any

import faust
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tailstream.metrics import Metrics
from tailstream.privacy import pseudonymize
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.streams.stores.publisher import parse_meta
from tailstream.streams.worker.pipeline import Pipeline

PROMETHEUS_TEXT = CONTENT_TYPE_LATEST.split(";")[0] + "; version=0.0.4"


def add_pages(app: faust.App, settings: Settings, pipeline: Pipeline, metrics: Metrics,
              redis: aioredis.Redis) -> None:
    keys = Keys(settings.redis_prefix)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.registry), content_type=PROMETHEUS_TEXT)

    @app.page("/imbalance")
    async def imbalance_page(web: Any, request: Any) -> Any:
        return web.json(json.loads(json.dumps(pipeline.imbalance.snapshot(), default=float)))

    @app.page("/recommendations/{user_id}")
    async def recommendations_page(web: Any, request: Any, user_id: str) -> Any:
        user_id = pseudonymize(user_id, settings.pseudonymize_key.reveal())
        found = parse_meta(user_id, await redis.hgetall(keys.meta(user_id)))
        if found is None:
            return web.json({"user_id": user_id, "items": [], "found": False}, status=404)
        return web.json({**found, "found": True})
