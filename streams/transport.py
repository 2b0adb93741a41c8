"""Faust's aiokafka transport with a configurable fetch wait.

faust-streaming creates its consumer with ``fetch_max_wait_ms=1500`` hard-coded. A
broker that does not answer a pending fetch as soon as data arrives (Tansu, like some
other Kafka-protocol brokers) then adds up to that wait to every event's latency: we
measured a p50 of ~500 ms at 50 events/s. ``TAILSTREAM_KAFKA_FETCH_MAX_WAIT_MS`` bounds it.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


def app_class(fetch_max_wait_ms: int) -> type[faust.App]:
    """A ``faust.App`` subclass whose consumer waits at most ``fetch_max_wait_ms`` per fetch."""
    if fetch_max_wait_ms <= 0:
        return faust.App

    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # Read by AIOKafkaConsumer.start() when it builds its Fetcher.
            consumer._fetch_max_wait_ms = fetch_max_wait_ms
            return consumer

    class FastFetchConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> ConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(faust_aiokafka.Transport):
        Consumer = FastFetchConsumer

    class App(faust.App):
        def _new_transport(self) -> Any:
            return Transport(self.conf.broker_consumer, self)

    return App
