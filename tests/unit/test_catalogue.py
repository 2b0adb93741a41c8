"""The catalogue read whole by every worker: applied as an upsert, a malformed record
dead-lettered once whatever the number of readers (streams/worker/catalogue.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from tailstream.contract import encode
from tailstream.streams.worker.catalogue import LetterClaims, follow_catalogue
from tailstream.streams.worker.pipeline import RawMessage
from tests.unit.test_pipeline import Feed, make, run


class FakeRedis:
    """``SET NX EX`` on a dict shared by the workers (or failing: Redis away)."""

    def __init__(self, keys: dict[str, bytes] | None = None, fail: bool = False) -> None:
        self.keys = keys if keys is not None else {}
        self.fail = fail

    async def set(self, key: str, value: bytes, nx: bool = False, ex: int | None = None
                  ) -> bool | None:
        if self.fail:
            raise ConnectionError("Redis is away")
        assert nx and ex
        if key in self.keys:
            return None
        self.keys[key] = value
        return True


def _records(feed: Feed) -> list[RawMessage]:
    return [
        feed.msg("item", {"item_id": "i1", "title": "Red tee", "category": "fashion/tee"}),
        feed.msg("item", b'{"item_id": "i9", "title": '),  # not JSON
        feed.msg("item", [{"item_id": "i2", "title": "Mug", "category": "home/mug"},
                          {"title": "no id"}]),  # an envelope: one element is bad
    ]


def test_every_worker_applies_every_record_and_one_dead_letters_each_bad_one() -> None:
    shared: dict[str, bytes] = {}
    workers = [make() for _ in range(3)]
    for h in workers:
        h.pipeline.claim_letter = LetterClaims(FakeRedis(shared), "ts")
    records = _records(Feed(workers[0].settings))
    for h in workers:
        run(h.pipeline.apply_catalogue(records))
        run(h.pipeline.apply_catalogue(records))  # read again (a restart): an upsert
        assert h.pipeline.item_text == {"i1": "Red tee | fashion/tee",
                                        "i2": "Mug | home/mug"}
    letters = [r for h in workers for r in h.dlq.records]
    assert sorted((m.offset, why.reason) for m, why in letters) == [
        (1, "not_json"), (2, "missing_field")]
    assert workers[0].dlq.records and not workers[1].dlq.records
    assert len(shared) == 2


def test_a_claim_without_redis_is_granted() -> None:
    """Redis away: the dead letter is written (twice at worst), never dropped."""
    h = make()
    h.pipeline.claim_letter = LetterClaims(FakeRedis(fail=True), "ts")
    bad = Feed(h.settings).msg("item", b"{")
    run(h.pipeline.apply_catalogue([bad]))
    run(h.pipeline.apply_catalogue([bad]))
    assert [why.reason for _, why in h.dlq.records] == ["not_json", "not_json"]


def test_claims_name_the_record_not_only_its_offset() -> None:
    """A broker that lost its log puts another record at the same offset."""
    claims = LetterClaims(FakeRedis(), "ts")
    a = RawMessage("t-items", 0, 5, None, b"{", None)
    b = RawMessage("t-items", 0, 5, None, b"[", None)
    assert run(claims(a, None)) and not run(claims(a, None))
    assert run(claims(b, None)) and run(claims(a, 0))


def test_a_tombstone_read_by_every_worker_removes_the_item() -> None:
    h = make()
    feed = Feed(h.settings)
    run(h.pipeline.apply_catalogue([feed.msg("item", {"item_id": "i1", "title": "Tee",
                                                             "category": "c"})]))
    gone = RawMessage(h.settings.topic_for("item"), 0, 9, b"i1", None, None)
    run(h.pipeline.apply_catalogue([gone]))
    assert "i1" not in h.pipeline.item_text and "i1" in h.pipeline.state.deleted
    assert not h.dlq.records


class FakeConsumer:
    """aiokafka's consumer over in-memory partitions; fails once after the first fetch
    when ``fail_once`` (the broker went away)."""

    def __init__(self, topic: str, parts: dict[int, list[bytes]], fail_once: bool = False
                 ) -> None:
        self.topic, self.parts, self.fail_once = topic, parts, fail_once
        self.assigned: list[TopicPartition] = []
        self.positions: dict[TopicPartition, int] = {}
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1

    async def stop(self) -> None:
        pass

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(self.parts) if topic == self.topic else None

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = tps

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = 0

    async def getmany(self, timeout_ms: int = 0, max_records: int | None = None
                      ) -> dict[TopicPartition, list[Any]]:
        out: dict[TopicPartition, list[Any]] = {}
        for tp in self.assigned:
            values = self.parts[tp.partition][self.positions[tp]:]
            if values:
                out[tp] = [_Record(tp.topic, tp.partition, self.positions[tp] + k, v)
                           for k, v in enumerate(values)]
                self.positions[tp] += len(values)
        if not out:
            if self.fail_once:
                self.fail_once = False
                raise ConnectionError("the broker went away")
            await asyncio.sleep(0.01)
        return out


class _Record:
    def __init__(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.value = topic, partition, offset, value
        self.key, self.timestamp = None, 1_700_000_000_000


def test_the_follower_reads_every_partition_from_the_start_and_again_after_an_error(
        monkeypatch: Any) -> None:
    monkeypatch.setattr("tailstream.streams.worker.catalogue.RETRY_S", 0.0)
    h = make()
    topic = h.settings.topic_for("item")
    consumer = FakeConsumer(topic, {p: [encode({"item_id": f"i{p}{k}", "title": "x",
                                                "category": "c"})
                                        for k in range(p + 1)] for p in range(3)},
                            fail_once=True)
    seen: list[RawMessage] = []

    async def apply(records: list[RawMessage]) -> None:
        seen.extend(records)
        await h.pipeline.apply_catalogue(records)

    async def main() -> None:
        task = asyncio.create_task(follow_catalogue(h.settings, apply, consumer))
        while len(seen) < 12 and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()

    run(asyncio.wait_for(main(), 5))
    assert {tp.partition for tp in consumer.assigned} == {0, 1, 2}
    assert consumer.starts == 2  # the error: read again, from the start
    assert len(seen) == 12 and seen[0].timestamp == 1_700_000_000.0
    assert sorted(h.pipeline.item_text) == ["i00", "i10", "i11", "i20", "i21", "i22"]
