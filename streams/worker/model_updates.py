"""Following the ``model-updates`` topic from every worker (a broadcast, not a queue).

A consumer group would hand each update to one worker only, so each worker reads every
partition of the topic with a group-less aiokafka consumer, from the end: what happened
before it started it learns from the model store's ``CURRENT`` pointer instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from tailstream.settings import Settings

log = logging.getLogger(__name__)


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Security settings in aiokafka's spelling (an SSL context instead of a CA file)."""
    opts: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_sasl_mechanism:
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = settings.kafka_sasl_password.reveal()
    if "SSL" in settings.kafka_security_protocol.upper():
        opts["ssl_context"] = ssl.create_default_context(
            cafile=settings.kafka_ssl_cafile or None)
    return opts


async def follow_model_updates(settings: Settings,
                               on_update: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    """Call ``on_update`` with every model-updates event published from now on."""
    topic = settings.topic(settings.topic_model_updates)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, **aiokafka_options(settings))
    await consumer.start()
    try:
        parts: set[int] | None = None
        while not parts:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                await asyncio.sleep(1.0)
                await consumer._client.force_metadata_update()  # topic made after start
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
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
