"""Each input partition is delivered in offset order without holes (the kill -9 losses)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from tailstream.streams.worker.transport import InOrder, app_class, count_rereads

A, B, LOG = TP("clicks", 2), TP("carts", 0), TP("user-profiles-changelog", 0)


class Msg(NamedTuple):
    offset: int


def test_records_go_on_from_the_last_seek_in_order() -> None:
    g = InOrder()
    assert g.admit(B, 5) and g.admit(B, 6)  # never sought: taken as they come
    g.sought(A, 757)
    assert [g.admit(A, o) for o in (923, 924)] == [False, False]  # from before the seek
    assert g.take_reseeks() == {A: 757} and g.take_reseeks() == {}
    g.sought(A, 757)
    assert [g.admit(A, o) for o in (757, 758, 757)] == [True, True, False]  # no repeats


def test_a_hole_is_read_again_unless_it_was_stepped_over_or_stays() -> None:
    g = InOrder()
    g.sought(A, 10)
    g.skipped(A, 10)  # undecodable: a hole on purpose
    assert g.admit(A, 11)
    for _ in range(InOrder.JUMP_TRIES - 1):  # read again while the records may come
        assert not g.admit(A, 20)
        assert g.take_reseeks() == {A: 12}
        g.sought(A, 12)
    assert g.admit(A, 20)  # the same hole every time: gone from the log, go on


def test_the_consumer_holds_back_stale_records_and_reads_from_the_seek(
        monkeypatch: pytest.MonkeyPatch) -> None:
    consumer_class = app_class(100)("t-in-order", broker="kafka://127.0.0.1:1"
                                    ).transport.Consumer
    consumer: Any = object.__new__(consumer_class)
    consumer.in_order = InOrder()
    consumer._read_offset = {}  # Faust's, made by its __init__
    rereads: list[int] = []
    count_rereads(consumer, rereads.append)
    consumer.input_topics = frozenset()  # set by the first restore, while a fetch is out
    seeks: list[tuple[TP, int]] = []
    # The restart's seek to the committed offset 757 has taken effect; a fetch begun
    # before it delivers clicks/2 from the old position (923..), then the partition's
    # records come again from 757.
    fetches = [{A: [923, 924], B: [5, 6], LOG: [40, 90]}, {A: [757, 758]}]

    async def seek(self: Any, tp: TP, offset: int) -> None:
        seeks.append((tp, offset))

    async def fetch(self: Any, active: Any, timeout: float) -> dict[TP, list[int]]:
        return fetches.pop(0)

    async def deliver(self: Any, timeout: float) -> AsyncIterator[tuple[TP, Msg]]:
        records = await self._getmany(None, timeout)
        self.input_topics = frozenset({"clicks", "carts"})
        for tp, offsets in records.items():
            for offset in offsets:
                yield tp, Msg(offset)

    monkeypatch.setattr(faust_aiokafka.Consumer, "seek", seek)
    monkeypatch.setattr(faust_aiokafka.Consumer, "_getmany", fetch)
    monkeypatch.setattr(faust_aiokafka.Consumer, "getmany", deliver)
    monkeypatch.setattr(faust_aiokafka.Consumer, "assignment", lambda self: {A, B, LOG})

    async def drain() -> list[tuple[TP, int]]:
        return [(tp, m.offset) async for tp, m in consumer.getmany(1.0)]

    asyncio.run(consumer.seek(A, 757))
    first = asyncio.run(drain())
    assert first == [(B, 5), (B, 6), (LOG, 40), (LOG, 90)]  # not an input: as it comes
    second = asyncio.run(drain())
    assert seeks == [(A, 757), (A, 757)]  # sought back before the next fetch
    assert second == [(A, 757), (A, 758)]
    assert rereads == [1]  # one partition sought back: the worker's metric
