"""With a pseudonymisation key, no raw user id is stored or published by the worker."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator

import pytest
import redis

from tailstream.kafka_io import iter_messages, reader
from tailstream.privacy import pseudonymize
from tailstream.settings import Secret, Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import start_worker, wait_ready

from .conftest import click, poll, producer, send, wait_committed

pytestmark = pytest.mark.integration
KEY = "test-pseudonym-key"
USERS = [f"alice-{n}" for n in range(5)]


@pytest.fixture
def private_worker(topics: Settings) -> Iterator[tuple[ManagedProcess, Settings]]:
    proc, ws = start_worker(topics.replace(scorer="baseline", pseudonymize_key=Secret(KEY)))
    try:
        wait_ready(proc, ws)
        yield proc, ws
    finally:
        proc.stop()


def test_raw_user_ids_never_reach_redis_or_the_topics(
        private_worker: tuple[ManagedProcess, Settings]) -> None:
    _, ws = private_worker
    p = producer(ws)
    for n, user in enumerate(USERS):
        for i in range(3):
            send(p, ws, "click", user, click(f"priv-{n}-{i}", user, f"item-{i}"))
    p.flush()
    r = redis.Redis.from_url(ws.redis_url.reveal())
    pseudonyms = {pseudonymize(u, KEY) for u in USERS}

    def stored_users() -> set[str]:
        keys = [k.decode() for k in r.scan_iter(f"{ws.redis_prefix}:*")]
        return {u for u in pseudonyms if any(u in k for k in keys)}

    poll(lambda: stored_users() == pseudonyms, timeout=60, what="lists of every user")
    # Every click applied and committed: Faust flushed the changelogs and the recs topic
    # before it committed, so everything the worker wrote for them is there to check.
    wait_committed(ws)
    keys = [k.decode() for k in r.scan_iter(f"{ws.redis_prefix}:*")]
    values = b"".join(r.dump(k) or b"" for k in keys)
    assert not any(u in k for k in keys for u in USERS), "a raw id in a Redis key"
    assert not any(u.encode() in values for u in USERS), "a raw id in a Redis value"

    # The recommendations topic and the worker's changelogs (profiles, counts).
    topics = [ws.topic(ws.topic_recommendations),
              f"{ws.app_id}-user-profiles-changelog", f"{ws.app_id}-imbalance-counts-changelog"]
    consumer = reader(ws, topics)
    seen = 0
    try:
        for record in iter_messages(consumer, idle_timeout=3.0):
            seen += 1
            blob = (record.key or b"") + (record.value or b"")
            assert not any(u.encode() in blob for u in USERS), f"raw id in {record.topic}"
    finally:
        consumer.close()
    assert seen >= len(USERS)

    # Callers still ask with the id they know.
    url = f"http://{ws.web_host}:{ws.web_port}/recommendations/{USERS[0]}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        found = json.loads(resp.read())
    assert found["found"] and found["user_id"] == pseudonymize(USERS[0], KEY)
