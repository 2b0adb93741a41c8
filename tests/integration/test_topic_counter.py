"""The demo's topic readers (kafka_io.TopicCounter) and producers against the real
broker: a reader that reads once per interval counts every record, those sent just before
it stops too, with far fewer polls (each a fetch the embedded broker pays for by listing
the partition), and the producers batch as the settings say."""

from __future__ import annotations

import threading
import time
from typing import Any

from tailstream.kafka_io import TopicCounter
from tailstream.settings import Settings
from tests.integration.conftest import poll, producer


def _counting_polls(counter: TopicCounter) -> list[int]:
    calls = [0]
    real = counter.consumer.poll

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    counter.consumer.poll = counted  # type: ignore[method-assign]
    return calls


def test_a_reader_that_rests_between_reads_misses_nothing_and_polls_less(
        topics: Settings) -> None:
    topic = topics.topic(topics.topic_recommendations)
    eager, lazy = TopicCounter(topics, [topic]), TopicCounter(topics, [topic], every_s=1.0)
    eager_polls, lazy_polls = _counting_polls(eager), _counting_polls(lazy)
    eager.start()
    lazy.start()
    p = producer(topics)
    stop = threading.Event()
    sent = [0]

    def stream() -> None:  # a list every 10 ms, as a busy worker publishes them
        while not stop.is_set():
            p.send(topic, key=f"u{sent[0] % 7}".encode(), value=b'{"n": %d}' % sent[0])
            sent[0] += 1
            time.sleep(0.01)

    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(4.0)
    stop.set()
    sender.join()
    p.send(topic, key=b"last", value=b"{}")  # right before the readers stop
    p.flush(10)
    total = sent[0] + 1
    poll(lambda: eager.count >= total or None, timeout=20, what="the eager reader")
    assert eager.stop() == total
    assert lazy.stop() == total  # its last rest's records read at stop
    assert lazy_polls[0] * 2 < eager_polls[0], (lazy_polls, eager_polls)


def test_the_producers_batch_as_the_settings_say(topics: Settings) -> None:
    """`make_producer` (produce, the demo's shop, bench serve) lingers
    TAILSTREAM_PRODUCER_LINGER_MS: fewer, fuller batches for the embedded broker."""
    from tailstream.producers.sender import make_producer

    assert topics.producer_linger_ms == 25
    p = make_producer(topics.replace(producer_linger_ms=40))
    try:
        assert p.config["linger_ms"] == 40
    finally:
        p.close()
