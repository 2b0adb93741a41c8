"""The worker's parts around the pipeline, without a broker or Redis: how the app is wired,
the transport's helpers, batch-level failures, the assignment report, the restore gate,
and the transformer scoring service on a tiny random BERT."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, cast

import pytest
import torch
from faust.transport.drivers import aiokafka as faust_aiokafka

from tailstream.configs import policy, tower_config
from tailstream.contract import Event, Rejection
from tailstream.metrics import Metrics, TrainerMetrics
from tailstream.models.imbalance.buffer import Sample
from tailstream.models.towers.context import ContextEntry, UserRequest
from tailstream.models.towers.loading import checkpoint_tensors, load_served
from tailstream.models.towers.store import ModelStore
from tailstream.settings import Secret, Settings
from tailstream.streams.trainer.sources import InMemorySource
from tailstream.streams.trainer.trainer import Trainer
from tailstream.streams.worker import recovery as recovery_module
from tailstream.streams.worker.app import create_app, process_batch
from tailstream.streams.worker.imbalance import ImbalanceLoop
from tailstream.streams.worker.pipeline import RawMessage
from tailstream.streams.worker.recovery import Recovery
from tailstream.streams.worker.scoring import ScoringService
from tailstream.streams.worker.tables import Deliveries, WorkerTables
from tailstream.streams.worker.timers import AssignmentReport
from tailstream.streams.worker.transport import (
    InOrder,
    app_class,
    read_offset,
    resume_from_counts,
    rewind_inputs,
    set_before_commit,
    set_input_topics,
)

NOWHERE = dict(kafka_bootstrap="127.0.0.1:1", redis_url=Secret("redis://127.0.0.1:1/0"))


def worker_settings(tmp: Path, **overrides: Any) -> Settings:
    # The encoder process has its own tests (test_encoder_process.py); here the service
    # encodes in-process, so a start does not wait for a child to load.
    return Settings().replace(**{"encoder_process": False, **NOWHERE, "data_dir": tmp,
                                 **overrides})


# --------------------------------------------------------------------------- the app
def test_the_app_has_one_agent_its_tables_timers_and_pages(tmp_path: Path) -> None:
    w = create_app(worker_settings(tmp_path, scorer="baseline", batch_size=300))
    app: Any = w.app
    assert [a.rsplit(".", 1)[-1] for a in app.agents] == ["process_events"]
    assert set(app.tables) == {"user-profiles", "imbalance-counts"}
    timers = {f.__name__ for f in app._app_tasks}
    assert timers == {"publish_loss_weights", "flush_waiting_lists", "refresh_aged_lists",
                      "report_assignment", "rejoin_if_partitions_stuck",
                      "dead_letter_undecodable_batches", "publish_health", "watch_the_loop",
                      "read_catalogue"}
    # The group shares out the events; the catalogue is read whole, outside it.
    agent = next(iter(app.agents.values()))
    assert set(agent.channel.topics) == set(worker_settings(tmp_path).input_topics)
    assert set(app.web.views) == {"/metrics", "/imbalance", "/recommendations/{user_id}"}
    assert app.producer.buffer.max_messages == 20 * 300
    assert w.scoring is None


def test_a_transformer_worker_also_serves_and_follows_promotions(tmp_path: Path) -> None:
    w = create_app(worker_settings(tmp_path, scorer="transformer", stuck_partition_s=0,
                                   text_vectors_shared=False))
    tasks = {f.__name__ for f in w.app._app_tasks}  # type: ignore[attr-defined]
    assert {"serve_transformer", "follow_promotions"} <= tasks
    assert "rejoin_if_partitions_stuck" not in tasks  # the watch is off at 0
    assert w.scoring is not None
    w.scoring.close()


def test_the_changelog_consistency_check_is_off_on_the_embedded_broker_only(
        tmp_path: Path) -> None:
    kafka = create_app(worker_settings(tmp_path / "a", scorer="baseline"))
    tansu = create_app(worker_settings(tmp_path / "b", scorer="baseline")
                       .with_embedded_group_timing())
    assert kafka.app.conf.recovery_consistency_check is True
    assert tansu.app.conf.recovery_consistency_check is False


def test_the_worker_needs_both_endpoints(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TAILSTREAM_KAFKA_BOOTSTRAP"):
        create_app(Settings().replace(data_dir=tmp_path))


# --------------------------------------------------------------------------- batches
class FailingPipeline:
    def __init__(self, dlq_fails_for: set[int] | None = None) -> None:
        self.dead: list[tuple[int, Rejection]] = []
        self.dlq_fails_for = dlq_fails_for or set()

    async def process(self, batch: list[RawMessage]) -> None:
        raise RuntimeError("a bug")

    async def dead_letter(self, msg: RawMessage, why: Rejection) -> None:
        if msg.offset in self.dlq_fails_for:
            raise OSError("dlq down")
        self.dead.append((msg.offset, why))


def test_a_batch_level_failure_dead_letters_every_message_of_the_batch() -> None:
    batch = [RawMessage("clicks", 0, n, b"u", b"{}", None) for n in range(3)]
    pipeline = FailingPipeline(dlq_fails_for={1})
    asyncio.run(process_batch(pipeline, batch))  # type: ignore[arg-type]
    assert [o for o, _ in pipeline.dead] == [0, 2]  # one failed DLQ write stops nothing
    assert {why.reason for _, why in pipeline.dead} == {"processing_error"}
    assert "a bug" in pipeline.dead[0][1].detail


# --------------------------------------------------------------------------- transport
class FakeConsumer:
    def __init__(self, assigned: list[TP], read: dict[Any, int]) -> None:
        self._assigned = assigned
        self._read_offset = read
        self.high: dict[Any, int | None] = {}

    def assignment(self) -> list[TP]:
        return self._assigned

    def highwater(self, tp: Any) -> int | None:
        return self.high[tp]


class TP(NamedTuple):
    topic: str
    partition: int


def tp(topic: str, partition: int) -> TP:
    return TP(topic, partition)


def test_the_transport_reads_offsets_and_rewinds_input_partitions_only() -> None:
    clicks, items = tp("clicks", 0), tp("items", 0)
    consumer = FakeConsumer([clicks, items], {clicks: 41})
    assert read_offset(consumer, clicks) == 41 and read_offset(consumer, items) is None
    set_input_topics(consumer, frozenset({"clicks"}))
    rewind_inputs(consumer)
    assert consumer.rewind == {clicks}  # type: ignore[attr-defined]


def test_the_assignment_report_sets_lag_and_forgets_partitions_that_moved(
        tmp_path: Path) -> None:
    s = Settings().replace(partitions=2)
    metrics = Metrics()
    report = AssignmentReport(s, metrics)
    a, b = tp(s.topic_for("click"), 0), tp(s.topic_for("cart"), 1)
    consumer = FakeConsumer([a, b], {a: 9})
    consumer.high = {a: 15, b: 4}
    report.report(consumer)

    def lag(t: TP) -> float | None:
        return metrics.registry.get_sample_value(
            "tailstream_consumer_lag_messages", {"topic": t.topic, "partition": str(t.partition)})

    assert lag(a) == 15 - 10 and lag(b) == 4  # nothing read yet from b
    assert metrics.registry.get_sample_value("tailstream_assigned_partitions") == 2
    consumer._assigned = [a]
    report.report(consumer)
    assert lag(b) is None and lag(a) == 5


def test_the_agent_waits_for_the_restore_and_gives_up_after_the_bound(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(recovery_module, "RESTORE_WAIT_S", 0.05)
    rec = Recovery.__new__(Recovery)

    async def run() -> None:
        rec.restored = asyncio.Event()
        with caplog.at_level(logging.WARNING):
            await rec.wait_restored()
        assert rec.restored.is_set()

    asyncio.run(run())
    assert "not restored" in caplog.text
    assert rec.unguarded  # the restore to come must not keep the counts begun meanwhile


def test_a_restore_waits_for_the_batch_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebalance's restore loads the table's counts over the loop's: run while a batch is
    half done (awaiting Redis), it would drop the events that batch applied and not saved."""
    rec = Recovery.__new__(Recovery)
    order: list[str] = []

    async def restore_state() -> None:
        order.append("restore")
        rec.restored.set()

    monkeypatch.setattr(rec, "_restore", restore_state)

    async def batch() -> None:
        async with rec.turn:
            order.append("batch applies")
            await asyncio.sleep(0.05)  # the Redis round trip, while the rebalance arrives
            order.append("batch saves")

    async def run() -> None:
        rec.restored, rec.turn, rec.on_restored = asyncio.Event(), asyncio.Lock(), []
        rec.on_restored.append(lambda: order.append("reported"))
        in_flight = asyncio.create_task(batch())
        await asyncio.sleep(0.01)
        await rec.restore()
        await in_flight

    asyncio.run(run())
    assert order == ["batch applies", "batch saves", "restore", "reported"]


def count_clicks(loop: ImbalanceLoop, offsets: range) -> None:
    """A click counted at each offset of ``clicks``/0, as the pipeline counts them."""
    for offset in offsets:
        loop.observe(Event("click", f"e{offset}", "u1", 1.7e9 + offset, item_id="i1"), 0,
                     user_class_counts={}, category_affinity=0.0, repeat=False)
        loop.mark_counted(0, "clicks", offset)


class FakeCountsTable:
    """The ``imbalance-counts`` table's surface that recovery and :class:`WorkerTables`
    use: its store (``data``), iteration, and changelog sends (recorded)."""

    def __init__(self, data: dict[bytes, bytes]) -> None:
        self.data = data
        self.sent: list[tuple[int | None, bytes, bytes]] = []

    def items(self) -> Any:
        return self.data.items()

    def send_changelog(self, partition: int | None, key: bytes, value: bytes) -> None:
        self.sent.append((partition, key, value))


def test_a_restore_keeps_and_rewrites_counts_the_changelog_is_behind_on(
        tmp_path: Path) -> None:
    """What ``kill -9`` under load found: a rebalance's table recovery had put a batch-old
    state back in the table for a partition that stayed assigned; the restore loaded it
    and the batch's events left the counts for good. Now the loop's newer counts stay and
    go to the changelog again; a partition that moved here takes the table's."""
    s = worker_settings(tmp_path)
    loop = ImbalanceLoop(s)
    count_clicks(loop, range(10))
    behind = loop.take_touched()[0]
    count_clicks(loop, range(10, 30))
    loop.take_touched()
    moved = {**behind, "offsets": {"clicks": 5}}
    table = FakeCountsTable({b"p0": json.dumps(behind).encode(),
                             b"p1": json.dumps(moved).encode()})
    rec = Recovery.__new__(Recovery)
    rec.tables = WorkerTables(profiles=None, counts=table, partitions=s.partitions)
    rec.pipeline = cast(Any, SimpleNamespace(imbalance=loop))

    assert rec._load_counts() == [0]
    assert loop.partitions[0].totals["click"] == 30 and loop.counted(0, "clicks", 29)
    assert loop.counted(1, "clicks", 5) and not loop.counted(1, "clicks", 6)
    rec.tables.save_counts(loop.take_touched())
    assert [(p, k) for p, k, _ in table.sent] == [(0, b"p0")]
    assert json.loads(table.data[b"p0"])["offsets"] == {"clicks": 29}


def test_counts_begun_before_a_late_restore_give_way_to_the_changelog(
        tmp_path: Path) -> None:
    """The agent gave up waiting for a restore and applied a batch into counts begun from
    nothing: their watermarks are ahead of the table's, but they lack its history. Kept,
    the history would be gone and its replays skipped; the table's counts are loaded
    instead (reading then resumes where they end: the batch is applied again)."""
    s = worker_settings(tmp_path)
    stored = ImbalanceLoop(s)
    count_clicks(stored, range(20))
    table = FakeCountsTable({b"p0": json.dumps(stored.take_touched()[0]).encode()})
    early = ImbalanceLoop(s)
    count_clicks(early, range(20, 25))  # a batch before the restore
    rec = Recovery.__new__(Recovery)
    rec.tables = WorkerTables(profiles=None, counts=table, partitions=s.partitions)
    rec.pipeline = cast(Any, SimpleNamespace(imbalance=early))
    rec.unguarded = True

    assert rec._load_counts() == []
    assert early.partitions[0].totals["click"] == 20 and not early.counted(0, "clicks", 20)
    assert not rec.unguarded


def test_a_commit_waits_until_the_changelog_holds_what_it_covers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust's flush before a commit gives up on a buffered message not sent within 0.1 s;
    under load a commit got ahead of the counts' changelog and a worker killed then lost
    events for good (CI: 872). The consumer now awaits the worker's deliveries first: every
    record sent before the commit, not the ones sent while it waits."""
    order: list[str] = []

    async def faust_commit(self: Any, offsets: Any, start_new_transaction: bool = True
                           ) -> bool:
        order.append(f"commit {offsets}")
        return True

    monkeypatch.setattr(faust_aiokafka.Consumer, "_commit_offsets", faust_commit)
    consumer_class = app_class(0).consumer_class  # type: ignore[attr-defined]
    consumer = consumer_class.__new__(consumer_class)
    unconfirmed: list[int] = []
    deliveries = Deliveries(timeout_s=0.2, on_unconfirmed=unconfirmed.append)
    set_before_commit(consumer, deliveries.settle)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        counts, profiles, failing = (loop.create_future() for _ in range(3))
        deliveries.add([counts, profiles, failing])

        async def broker() -> None:
            await asyncio.sleep(0.02)
            order.append("counts confirmed")
            counts.set_result(None)
            deliveries.add([loop.create_future()])  # sent after the commit began
            await asyncio.sleep(0.02)
            order.append("profiles confirmed")
            profiles.set_result(None)
            failing.set_exception(OSError("broker gone"))

        confirm = asyncio.create_task(broker())
        assert await consumer._commit_offsets({"clicks/0": 41})
        await confirm

    asyncio.run(run())
    assert order == ["counts confirmed", "profiles confirmed", "commit {'clicks/0': 41}"]
    assert unconfirmed == [1]  # the failed send, said; the commit went ahead
    assert deliveries.pending == 1  # the late send waits for the next commit


def test_reading_resumes_where_the_counts_end_when_the_commit_is_past_them() -> None:
    """A committed offset past the restored counts' watermark (a commit that went ahead of
    the counts' changelog record, then a crash): the seek goes back to the first offset
    the counts do not hold, so those messages are counted rather than never read. Where
    the commit is at or before it, or the partition is read from 0 anyway, no seek."""
    clicks0, clicks1, clicks2, carts0, items0, fresh = (
        tp("clicks", 0), tp("clicks", 1), tp("clicks", 2), tp("carts", 0), tp("items", 0),
        tp("clicks", 3))
    consumer_class = app_class(0).consumer_class  # type: ignore[attr-defined]
    consumer = consumer_class.__new__(consumer_class)
    sought: list[tuple[TP, int]] = []

    async def seek(partition: TP, offset: int) -> None:
        sought.append((partition, offset))

    consumer.seek = seek
    consumer.assignment = lambda: [clicks0, clicks1, clicks2, carts0, items0, fresh]
    consumer._committed_offset = {clicks0: 50, clicks1: 30, carts0: None, items0: 99,
                                  fresh: 12, clicks2: 7}
    consumer.input_topics = frozenset({"clicks", "carts"})
    behind: list[int] = []
    resume_from_counts(consumer, {("clicks", 0): 42, ("clicks", 1): 31, ("carts", 0): 0,
                                  ("items", 0): 0, ("clicks", 3): 0}, behind.append)

    asyncio.run(consumer._seek_to_counts(from_start={fresh}))
    assert sought == [(clicks0, 42)] and behind == [1]
    asyncio.run(consumer._seek_to_counts(from_start=set()))  # the snapshot is used once
    assert sought == [(clicks0, 42)]


def test_records_read_again_are_not_dropped_by_a_read_offset_set_late(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust drops a record below its read offset, which it sets after a record's hand-over
    returns: a hand-over of offset 9 fetched before a seek back to 5, waiting while the seek
    ran, left the read offset at 9, and 5..8 read again would have been dropped. The
    records the in-order gate admits bring the read offset down to them."""
    clicks = tp("clicks", 0)

    async def faust_getmany(self: Any, timeout: float) -> Any:
        for offset in (5, 6, 4):
            yield clicks, SimpleNamespace(offset=offset)

    monkeypatch.setattr(faust_aiokafka.Consumer, "getmany", faust_getmany)
    consumer_class = app_class(0).consumer_class  # type: ignore[attr-defined]
    consumer = consumer_class.__new__(consumer_class)
    consumer.input_topics = frozenset({"clicks"})
    consumer.in_order = InOrder()
    consumer.in_order.sought(clicks, 5)
    consumer._read_offset = {clicks: 9}

    async def delivered() -> list[int]:
        return [m.offset async for _, m in consumer.getmany(0.0)]

    assert asyncio.run(delivered()) == [5, 6]  # 4: delivered before the seek already
    assert consumer._read_offset[clicks] == 5  # Faust sets 5, then 6, once each is handed


def test_the_restore_resumes_partitions_without_counts_from_their_start(
        tmp_path: Path) -> None:
    s = worker_settings(tmp_path).replace(partitions=2)
    loop = ImbalanceLoop(s)
    loop.mark_counted(1, s.topic_for("click"), 41)
    rec = Recovery.__new__(Recovery)
    rec.settings = s
    rec.tables = WorkerTables(profiles=None, counts=None, partitions=2)
    rec.pipeline = cast(Any, SimpleNamespace(imbalance=loop))
    at = rec._resume_at()
    assert at[(s.topic_for("click"), 1)] == 42 and at[(s.topic_for("cart"), 1)] == 0
    assert at[(s.topic_for("click"), 0)] == 0
    assert set(at) == {(t, p) for t in s.consumed_topics for p in (0, 1)}


# --------------------------------------------------------------------------- scoring
async def start_indexed(service: ScoringService, texts: dict[str, str]) -> None:
    """Start ``service`` and embed the catalogue ``texts`` (item → text) into its index."""
    await service.start()
    for item, text in texts.items():
        service.queue_item(item, text)
    while await service.embed_pending(64):
        pass


def tail_info(ids: Any) -> tuple[list[str], list[str | None], list[float]]:
    """Item facts for a scorer without a stream: every item tail, no category."""
    return (["tail"] * len(ids), [None] * len(ids), [0.0] * len(ids))


def test_the_scoring_service_serves_the_base_then_swaps_to_a_promoted_version(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = worker_settings(tmp_path, encoder_path=str(tiny_encoder), embed_dim=32,
                        text_max_len=32, text_vectors_shared=False, recs_k=5, device="cpu",
                        finetune_max_steps=30, finetune_batch_size=64,
                        finetune_min_samples=50, gate_quality_tolerance=1.0,
                        gate_recall_tolerance=1.0)
    metrics = Metrics()
    service = ScoringService(s, metrics)
    samples = shop_samples(600)
    texts = {x.item_id: x.item_text for x in samples}

    def item_info(ids: Any) -> tuple[list[str], list[str | None], list[float]]:
        return (["tail"] * len(ids), [None] * len(ids), [0.0] * len(ids))

    async def run() -> tuple[list[list[Any]], bool, bool]:
        await service.start()
        assert not service.ready  # nothing indexed yet: the pipeline serves the baseline
        for item, text in texts.items():
            service.queue_item(item, text)
        assert metrics.registry.get_sample_value("tailstream_index_pending_items") == len(texts)
        while await service.embed_pending(64):
            pass
        assert metrics.registry.get_sample_value("tailstream_index_pending_items") == 0
        assert service.ready and service.version.startswith("base-")
        request = UserRequest("u1", [ContextEntry("i", samples[0].item_text, "x",
                                                  samples[0].item_id)], set())
        lists = await service.recommend([request], item_info)
        refused = await service.swap_to("v00042", lambda ids: [texts[i] for i in ids])
        Trainer(s, ModelStore(s.model_store_dir), TrainerMetrics(),
                InMemorySource(samples, policy=policy(s)), lambda u: None,
                device=torch.device("cpu")).handle({"reason": "buffer"})
        swapped = await service.swap_to("v00001", lambda ids: [texts[i] for i in ids])
        return lists, refused, swapped

    try:
        lists, refused, swapped = asyncio.run(run())
    finally:
        service.close()
    assert len(lists) == 1 and len(lists[0]) == 5
    assert lists[0][0].item_id in texts
    assert not refused
    assert metrics.registry.get_sample_value("tailstream_model_loads_total",
                                             {"outcome": "failed"}) == 1
    assert swapped and service.version == "v00001"
    assert metrics.registry.get_sample_value("tailstream_serving_model_version_number") == 1
    assert metrics.registry.get_sample_value("tailstream_index_items") == len(texts)


def test_a_corrupt_current_version_gives_way_to_the_last_good_one(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = worker_settings(tmp_path, encoder_path=str(tiny_encoder), embed_dim=32,
                        text_max_len=32, text_vectors_shared=False, device="cpu",
                        finetune_max_steps=20, finetune_batch_size=64,
                        finetune_min_samples=50, gate_quality_tolerance=1.0,
                        gate_recall_tolerance=1.0)
    store = ModelStore(s.model_store_dir)
    base = load_served(store, "base", tiny_encoder, tower_config(s), torch.device("cpu"))
    tensors, _ = checkpoint_tensors(base.model)
    manifest = {"tower": tower_config(s).to_dict(),
                "encoder": {"base_fingerprint": base.text_fingerprint, "included": False}}
    for _ in range(2):
        store.promote(store.save(tensors, manifest), "test")
    assert store.current() == "v00002" and store.fallbacks() == ["v00002", "v00001", "base"]
    weights = store.root / "versions" / "v00002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"corrupt")
    metrics = Metrics()
    service = ScoringService(s, metrics)
    try:
        asyncio.run(service.start())
    finally:
        service.close()
    assert service.version == "v00001"  # not the baseline lists, not the corrupt one
    assert metrics.registry.get_sample_value("tailstream_model_loads_total",
                                             {"outcome": "failed"}) == 1


def test_a_deleted_item_leaves_the_transformer_index_before_the_next_list(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    s = worker_settings(tmp_path, encoder_path=str(tiny_encoder), embed_dim=32,
                        text_max_len=32, text_vectors_shared=False, recs_k=50, device="cpu",
                        rank_candidates=200, rank_head_candidates=200)
    service = ScoringService(s, Metrics())
    samples = shop_samples(300)
    texts = {x.item_id: x.item_text for x in samples}

    def item_info(ids: Any) -> tuple[list[str], list[str | None], list[float]]:
        return (["head"] * len(ids), [None] * len(ids), [0.0] * len(ids))

    async def run() -> tuple[set[str], set[str], set[str]]:
        await start_indexed(service, texts)
        request = UserRequest("u1", [], set())
        before = {r.item_id for r in (await service.recommend([request], item_info))[0]}
        gone = sorted(before)[:3]
        for item in gone:
            service.remove_item(item)
        after = {r.item_id for r in (await service.recommend([request], item_info))[0]}
        service.queue_item(gone[0], texts[gone[0]])  # announced again: back
        while await service.embed_pending(64):
            pass
        back = {r.item_id for r in (await service.recommend([request], item_info))[0]}
        return set(gone), after, back

    try:
        gone, after, back = asyncio.run(run())
    finally:
        service.close()
    assert not gone & after
    assert sorted(gone)[0] in back
    assert service.scorer is not None and len(service.scorer.index) == len(texts) - 2


def test_a_turn_that_must_encode_many_texts_leaves_the_event_loop_for_the_thread(
        tiny_encoder: Path, tmp_path: Path, shop_samples: Callable[..., list[Sample]]) -> None:
    from tailstream.models.serving.hybrid import QUERY_PREFIX
    from tailstream.streams.worker.scoring import INLINE_NEW_TEXTS, new_texts

    s = worker_settings(tmp_path, encoder_path=str(tiny_encoder), embed_dim=32,
                        text_max_len=32, text_vectors_shared=False, recs_k=5, device="cpu")
    metrics = Metrics()
    service = ScoringService(s, metrics)
    texts = {x.item_id: x.item_text for x in shop_samples(200)}

    def user(n: int, entries: list[str]) -> UserRequest:
        return UserRequest(f"u{n}", [ContextEntry("i", t, "click", None) for t in entries],
                           set())

    unseen = [f"a text nobody has seen {n}" for n in range(INLINE_NEW_TEXTS + 1)]

    async def run() -> tuple[int, int, int, int]:
        await start_indexed(service, texts)
        scorer = service.scorer
        assert scorer is not None
        known = user(0, list(texts.values())[:5])
        before = (new_texts(scorer, [known]), new_texts(scorer, [user(1, unseen)]),
                  new_texts(scorer, [known], ["blue mug", None]))
        await service.recommend([known], tail_info, inline=True)  # on the loop
        await service.recommend([user(1, unseen)], tail_info, inline=True)  # to the thread
        after = new_texts(scorer, [user(1, unseen)])  # encoded by that turn
        scorer.texts.vectors([QUERY_PREFIX + "blue mug"])
        return *before, after + new_texts(scorer, [known], ["blue mug"])

    try:
        cached, many, query, after = asyncio.run(run())
    finally:
        service.close()
    assert (cached, many, query, after) == (0, INLINE_NEW_TEXTS + 1, 1, 0)
    get = metrics.registry.get_sample_value
    assert get("tailstream_scoring_turns_total", {"where": "loop"}) == 1
    assert get("tailstream_scoring_turns_total", {"where": "thread"}) == 1


def test_batched_records_land_on_the_partition_faust_would_choose() -> None:
    """Profiles written a batch at a time keep the changelog partition of their user's
    input partition: the partition of aiokafka's default partitioner (Faust's)."""
    import random

    from aiokafka.partitioner import DefaultPartitioner

    from tailstream.streams.worker.batch_send import partition_of

    rng = random.Random(5)
    default = DefaultPartitioner()
    for _ in range(500):
        key = f"u{rng.randrange(10**9)}".encode()
        n = rng.randrange(1, 64)
        parts = list(range(n))
        assert partition_of(key, n) == default(key, parts, parts)


def test_the_scoring_thread_is_nicer_than_the_event_loop() -> None:
    import os
    import threading

    from tailstream.streams.worker.scoring import lower_thread_priority

    seen: list[int] = []

    def probe() -> None:
        lower_thread_priority(3)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen == [os.getpriority(os.PRIO_PROCESS, 0) + 3]
