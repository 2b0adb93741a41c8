"""`produce replay` delivers every row of a real log to the broker (counted by a consumer)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tailstream.kafka_io import reader
from tailstream.producers.replay import read_log
from tailstream.producers.sender import send_records
from tailstream.settings import Settings

pytestmark = pytest.mark.integration
TAOBAO = (Path(__file__).parents[3] / "shared" / "datasets" / "taobao_userbehavior_subset"
          / "UserBehavior_head.csv")


def count_back(s: Settings, kinds: list[str], expect: int, timeout: float = 60) -> Counter[str]:
    consumer = reader(s, [s.topic_for(k) for k in kinds])
    by_topic: Counter[str] = Counter()
    ids: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while sum(by_topic.values()) < expect and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=500, max_records=5000).items():
                by_topic[tp.topic] += len(records)
                ids.update(json.loads(r.value)["event_id"] for r in records)
    finally:
        consumer.close()
    assert len(ids) == sum(by_topic.values()), "an event arrived twice"
    return by_topic


@pytest.mark.skipif(not TAOBAO.exists(), reason="the Taobao subset is not in ../shared/datasets")
def test_taobao_replay_delivers_all_rows(topics: Settings) -> None:
    stats = send_records(read_log(TAOBAO, "taobao", emit_items=False), topics)
    assert stats.sent == 96_168
    got = count_back(topics, ["click", "cart", "fav", "purchase"], expect=96_168)
    assert got == {topics.topic_for("click"): 85_773, topics.topic_for("cart"): 5_292,
                   topics.topic_for("fav"): 2_959, topics.topic_for("purchase"): 2_144}


def test_small_log_replay_is_delivered(topics: Settings, tmp_path: Path) -> None:
    log = tmp_path / "tb.csv"
    log.write_text("".join(f"{u},{i},{i % 7},{b},{1511658000 + n}\n" for n, (u, i, b) in
                           enumerate((n % 13, n % 101, ("pv", "pv", "cart", "buy")[n % 4])
                                     for n in range(1000))))
    stats = send_records(read_log(log, "taobao"), topics)
    assert stats.sent == 1000 and stats.by_kind["item"] == 101
    got = count_back(topics, ["click", "cart", "purchase"], expect=1000)
    assert sum(got.values()) == 1000
