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
    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # Read by AIOKafkaConsumer.start() when it builds its Fetcher.
            if fetch_max_wait_ms > 0:
                consumer._fetch_max_wait_ms = fetch_max_wait_ms
            return consumer

    class FastFetchConsumer(faust_aiokafka.Consumer):
        #: input partitions to read from offset 0 at the next seek (set on a broker reset)
        rewind: set[Any] = set()
        input_topics: frozenset[str] = frozenset()

        def _new_consumer_thread(self) -> ConsumerThread:
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

        async def perform_seek(self) -> None:
            """Faust seeks to committed offsets; with none committed it leaves the position
            where the fetcher got to while partitions were resumed, and the records fetched
            in that window were dropped (faust-streaming#216). Read those from the start,
            as auto_offset_reset=earliest promises, and all of a reset broker's inputs."""
            await super().perform_seek()
            uncommitted = {tp for tp in self.assignment() if tp.topic in self.input_topics
                           and self._committed_offset.get(tp) is None}
            for tp in uncommitted | (self.rewind & set(self.assignment())):
                await self.seek(tp, 0)
            self.rewind = set()

    class Transport(faust_aiokafka.Transport):
        Consumer = FastFetchConsumer

    class App(faust.App):  # noqa: D106
        def _new_transport(self) -> Any:
            return Transport(self.conf.broker_consumer, self)

    return App


async def request_rejoin(consumer: Any) -> None:
    """Make the aiokafka consumer under Faust rejoin its group (in the consumer's thread,
    where its event loop runs)."""
    thread = consumer._thread

    async def rejoin() -> None:
        thread._ensure_consumer()._coordinator.request_rejoin()

    await thread.call_thread(rejoin)
