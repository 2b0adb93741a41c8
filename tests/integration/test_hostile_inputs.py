"""The outsider's hostile inputs against a real worker on the real broker: every Kafka
codec, an undecodable batch, the 1 MB envelope with one bad element, messages at and just
over each size limit, colliding user ids, item deletion, duplicate keys and display text.
Each case ends processed or in the DLQ with its reason, and the worker goes on."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kafka import KafkaProducer

from tailstream.contract import encode, new_event_id
from tailstream.kafka_io import create_topics, iter_messages, kafka_python_options, reader
from tailstream.redis_io import Keys
from tailstream.settings import Settings
from tailstream.stack.embedded import ManagedProcess
from tailstream.stack.processes import start_worker, wait_ready
from tailstream.streams.stores.publisher import parse_meta

from .conftest import metric, own_settings, poll

pytestmark = pytest.mark.integration

TS = 1_700_000_000.0


@pytest.fixture(scope="module")
def hostile(broker: str, redis_url: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ManagedProcess, Settings]]:
    """One worker for the whole file (baseline scorer: the inputs are what is tested)."""
    s = own_settings(broker, redis_url, tmp_path_factory.mktemp("hostile"), scorer="baseline",
                     partitions=1)
    create_topics(s)
    proc, ws = start_worker(s)
    try:
        wait_ready(proc, ws)
        yield proc, ws
    finally:
        proc.stop()


def producer(ws: Settings, **options: Any) -> KafkaProducer:
    config: dict[str, Any] = {"linger_ms": 20, "max_request_size": 8 << 20, **options}
    return KafkaProducer(bootstrap_servers=ws.kafka_bootstrap, **kafka_python_options(ws),
                         **config)


def click(user: str, item: str = "i1", **extra: Any) -> dict[str, Any]:
    return {"event_id": new_event_id(), "user_id": user, "ts": TS, "item_id": item, **extra}


def processed(ws: Settings) -> float:
    return metric(ws, "tailstream_events_processed_total")


def dead_letters(ws: Settings, reason: str, at_least: int) -> list[Any]:
    """The DLQ records with ``reason`` (waits until there are ``at_least``)."""
    def read() -> list[Any]:
        consumer = reader(ws, [ws.topic(ws.topic_dlq)])
        try:
            return [r for r in iter_messages(consumer, idle_timeout=1.0)
                    if dict(r.headers).get("tailstream-reason") == reason.encode()]
        finally:
            consumer.close()

    found: list[Any] = []

    def enough() -> bool:
        found[:] = read()
        return len(found) >= at_least

    poll(enough, 60, f"{at_least} DLQ records with reason {reason}", 0.5)
    return found


def send_and_count(ws: Settings, p: KafkaProducer, values: list[bytes | dict[str, Any]],
                   kind: str = "click") -> None:
    for value in values:
        p.send(ws.topic_for(kind), key=b"k",
               value=value if isinstance(value, bytes) else encode(value))
    p.flush()


def test_batches_of_every_kafka_codec_are_read(hostile: tuple[ManagedProcess, Settings]
                                               ) -> None:
    proc, ws = hostile
    before = processed(ws)
    for codec in ("gzip", "snappy", "lz4", "zstd"):
        p = producer(ws, compression_type=codec)
        send_and_count(ws, p, [click(f"codec-{codec}-{n}") for n in range(40)])
        p.close()
    poll(lambda: processed(ws) >= before + 160, 60, "160 compressed events processed")
    assert proc.alive()


def test_an_undecodable_batch_is_dead_lettered_by_offset_and_skipped(
        hostile: tuple[ManagedProcess, Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    import kafka.record.default_records as batches

    proc, ws = hostile
    before = processed(ws)
    good = producer(ws)
    send_and_count(ws, good, [click("around-bad", f"i{n}") for n in range(3)])
    real = batches.lz4_encode
    # A producer whose lz4 is broken: the batch says lz4, its bytes are not (CRC valid).
    monkeypatch.setattr(batches, "lz4_encode", lambda payload: b"\x00corrupt" + payload[:9])
    bad = producer(ws, compression_type="lz4", linger_ms=200)
    futures = [bad.send(ws.topic_for("click"), key=b"k", value=encode(click("in-bad")))
               for _ in range(3)]
    bad.flush()
    bad_offsets = sorted(f.get(10).offset for f in futures)
    monkeypatch.setattr(batches, "lz4_encode", real)
    send_and_count(ws, good, [click("around-bad", f"j{n}") for n in range(3)])
    good.close()
    bad.close()
    letters = dead_letters(ws, "undecodable_batch", 3)
    offsets = sorted(int(dict(r.headers)["tailstream-source-offset"]) for r in letters)
    assert offsets == bad_offsets
    assert all(r.value == b"" for r in letters)
    poll(lambda: processed(ws) >= before + 6, 60, "the six good events around it processed")
    assert proc.alive()


def outsider_envelope() -> bytes:
    events = [click(f"env{n % 50}", f"i{n % 300}", pad="p" * 930) for n in range(1000)]
    events[417]["price"] = -5
    raw = encode(events)
    assert 1_000_000 < len(raw) <= 1_048_576
    return raw


def test_the_outsiders_envelope_loses_nothing_and_costs_no_neighbour(
        hostile: tuple[ManagedProcess, Settings]) -> None:
    proc, ws = hostile
    before = processed(ws)
    errors_before = metric(ws, "tailstream_dlq_total{reason=processing_error}")
    p = producer(ws)
    send_and_count(ws, p, [*(click(f"neighbour{n}") for n in range(5)), outsider_envelope(),
                           *(click(f"neighbour{n}") for n in range(5, 10))])
    p.close()
    poll(lambda: processed(ws) >= before + 999 + 10, 90, "999 + 10 events processed")
    (letter,) = [r for r in dead_letters(ws, "bad_value", 1)
                 if dict(r.headers).get("tailstream-envelope-index") == b"417"]
    assert json.loads(letter.value)["price"] == -5
    assert len(letter.value) < 2000  # the element, not the megabyte
    assert metric(ws, "tailstream_dlq_total{reason=processing_error}") == errors_before
    assert proc.alive()


def exactly(size: int) -> bytes:
    """A valid click of exactly ``size`` bytes."""
    value = click("sized", pad="")
    raw = encode(value)
    value["pad"] = "p" * (size - len(raw))
    raw = encode(value)
    assert len(raw) == size
    return raw


def envelope_of(size: int, events: int = 100) -> bytes:
    """A valid envelope of exactly ``size`` bytes."""
    values = [click(f"env-sized{n}", pad="") for n in range(events)]
    raw = encode(values)
    values[0]["pad"] = "p" * (size - len(raw))
    raw = encode(values)
    assert len(raw) == size
    return raw


def test_messages_at_each_size_limit_pass_and_just_over_go_to_the_dlq(
        hostile: tuple[ManagedProcess, Settings]) -> None:
    proc, ws = hostile
    before = processed(ws)
    oversize_before = metric(ws, "tailstream_dlq_total{reason=oversize}")
    p = producer(ws)
    over = envelope_of(ws.max_envelope_bytes + 1)
    send_and_count(ws, p, [exactly(ws.max_event_bytes), exactly(ws.max_event_bytes + 1),
                           envelope_of(ws.max_envelope_bytes), over])
    p.close()
    poll(lambda: processed(ws) >= before + 1 + 100, 60, "the message and envelope at the limit")
    poll(lambda: metric(ws, "tailstream_dlq_total{reason=oversize}") >= oversize_before + 2,
         30, "the two just over the limits dead-lettered")
    big = [r for r in dead_letters(ws, "oversize", 2)
           if dict(r.headers).get("tailstream-value-bytes") == str(len(over)).encode()]
    assert len(big) == 1 and len(big[0].value) == ws.dlq_max_value_bytes
    assert dict(big[0].headers)["tailstream-value-sha256"] == \
        hashlib.sha256(over).hexdigest().encode()
    assert proc.alive()


def test_a_5_mb_field_and_a_3_mb_envelope_are_bounded_dlq_records(
        hostile: tuple[ManagedProcess, Settings]) -> None:
    proc, ws = hostile
    before = processed(ws)
    p = producer(ws)
    huge_field = encode(click("huge", title="x" * 5_000_000))
    huge_envelope = encode([click(f"e{n}", pad="p" * 3000) for n in range(1000)])
    send_and_count(ws, p, [huge_field, huge_envelope, click("after-huge")])
    p.close()
    poll(lambda: processed(ws) >= before + 1, 60, "the event after them processed")
    sizes = {int(dict(r.headers)["tailstream-value-bytes"])
             for r in dead_letters(ws, "oversize", 2) if "tailstream-value-bytes" in
             dict(r.headers)}
    assert {len(huge_field), len(huge_envelope)} <= sizes
    assert proc.alive()


def list_of(ws: Settings, user: str) -> dict[str, Any] | None:
    client = redis.Redis.from_url(ws.redis_url.reveal())
    try:
        return parse_meta(user, client.hgetall(Keys(ws.redis_prefix).meta(user)))
    finally:
        client.close()


def page(ws: Settings, user: str) -> tuple[int, dict[str, Any]]:
    from urllib.parse import quote

    url = f"http://{ws.web_host}:{ws.web_port}/recommendations/{quote(user, safe='')}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # loopback URL
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def test_a_user_named_like_another_users_key_cannot_touch_it(
        hostile: tuple[ManagedProcess, Settings]) -> None:
    _, ws = hostile
    p = producer(ws)
    send_and_count(ws, p, [click("victim", "i1")])
    poll(lambda: list_of(ws, "victim"), 30, "victim's list")
    send_and_count(ws, p, [click("victim:meta", "i2")])
    p.close()
    poll(lambda: list_of(ws, "victim:meta"), 30, "victim:meta's list")
    for user in ("victim", "victim:meta"):
        status, body = page(ws, user)
        assert status == 200 and body["found"] and body["user_id"] == user
        assert list_of(ws, user) is not None


def test_a_tombstone_deletes_the_item_from_later_lists(
        hostile: tuple[ManagedProcess, Settings]) -> None:
    _, ws = hostile
    p = producer(ws)
    items = [{"item_id": f"tomb-{n}", "title": f"Lamp {n}", "category": "home/lamp-tomb"}
             for n in range(5)]
    for item in items:
        p.send(ws.topic_for("item"), key=item["item_id"].encode(), value=encode(item))
    send_and_count(ws, p, [click(f"tomb-user{n}", f"tomb-{n % 5}", category="home/lamp-tomb")
                           for n in range(20)])
    probes = iter(range(1000))

    def probe() -> set[str]:
        """A new user clicks tomb-0: the items of the list made for them."""
        user = f"tomb-probe-{next(probes)}"
        send_and_count(ws, p, [click(user, "tomb-0", category="home/lamp-tomb")])
        found = poll(lambda: list_of(ws, user), 30, f"{user}'s list")
        return {it["item_id"] for it in found["items"]}

    # Popularity is refreshed about once a second: probe until the category's lists show.
    poll(lambda: {"tomb-1", "tomb-3"} <= probe(), 30, "tomb-1 and tomb-3 recommended before")
    deleted_before = metric(ws, "tailstream_catalogue_deletions_total")
    p.send(ws.topic_for("item"), key=b"tomb-3", value=None)
    p.flush()
    poll(lambda: metric(ws, "tailstream_catalogue_deletions_total") > deleted_before, 30,
         "the tombstone applied")
    send_and_count(ws, p, [click("tomb-user9", "tomb-3", category="home/lamp-tomb")])
    for _ in range(3):  # several lists after it: the category is there, tomb-3 never
        after = probe()
        assert "tomb-1" in after and "tomb-3" not in after, after
    p.close()


def test_duplicate_keys_are_refused_and_titles_are_shown_clean(
        hostile: tuple[ManagedProcess, Settings]) -> None:
    _, ws = hostile
    p = producer(ws)
    p.send(ws.topic_for("click"), key=b"k",
           value=b'{"event_id":"dup1","user_id":"a","user_id":"b","ts":1700000000,'
                 b'"item_id":"i1"}')
    title = "Red \x1b[31mkettle\x1b[0m \u202eevil\u202c\x07"
    p.send(ws.topic_for("item"), key=b"ansi-1",
           value=encode({"item_id": "ansi-1", "title": title, "category": "home/ansi"}))
    send_and_count(ws, p, [click("ansi-user", "ansi-1", category="home/ansi"),
                           click("ansi-user", "ansi-2", category="home/ansi")])
    p.close()
    (letter,) = [r for r in dead_letters(ws, "not_json", 1)
                 if b"duplicate key" in dict(r.headers)["tailstream-detail"]]
    assert b"user_id" in dict(letter.headers)["tailstream-detail"]
    found = poll(lambda: list_of(ws, "ansi-user"), 30, "ansi-user's list")
    for item in found["items"]:
        assert not any(ch in item["reason"] for ch in "\x1b\u202e\u202c\x07"), item
