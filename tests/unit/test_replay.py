"""Replaying logs: class mapping, counts, item records, pacing, and the real Taobao file."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tailstream.contract import Limits, Rejection, decode_payload, validate_event, validate_item
from tailstream.producers.records import ProducedRecord
from tailstream.producers.replay import LogReader, ReplayStats, pace, read_log

TAOBAO = (Path(__file__).parents[3] / "shared" / "datasets" / "taobao_userbehavior_subset"
          / "UserBehavior_head.csv")


def test_taobao_mapping_on_a_small_file(tmp_path: Path) -> None:
    f = tmp_path / "tb.csv"
    f.write_text("1,10,100,pv,1511658000\n1,10,100,cart,1511658001\n2,11,100,fav,1511658002\n"
                 "2,10,100,buy,1511658003\n3,12,101,weird,1511658004\n")
    reader = LogReader(f, "taobao")
    recs = list(reader)
    assert [r.kind for r in recs] == ["item", "click", "cart", "item", "fav", "purchase"]
    assert reader.stats == ReplayStats(rows=5, events=Counter(click=1, cart=1, fav=1, purchase=1),
                                       items=2, skipped=Counter(unmappable=1))
    assert_valid(recs)
    click = json.loads(recs[1].value)
    assert click == {"event_id": click["event_id"], "user_id": "1", "ts": 1511658000.0,
                     "item_id": "10", "category": "100"}
    assert json.loads(recs[0].value)["title"] == "item 10 in category 100"
    # Event ids are stable: a second replay is recognised as duplicates downstream.
    assert [r.value for r in read_log(f, "taobao")] == [r.value for r in recs]


def assert_valid(recs: list[ProducedRecord]) -> None:
    """Every replayed record passes the contract the workers apply."""
    for rec in recs:
        values = decode_payload(rec.value, Limits())
        assert not isinstance(values, Rejection) and not rec.malformed
        if rec.kind == "item":
            assert validate_item(values[0], Limits()).item_id == rec.key
        else:
            assert validate_event(rec.kind, values[0], Limits(), now=2e9).user_id == rec.key


def test_rees46_and_generic_csv(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("event_time,event_type,product_id,category_id,category_code,brand,price,"
                 "user_id,user_session\n"
                 "2019-10-01 00:00:00 UTC,view,5,9,electronics.smartphone,acme,99.5,7,s\n"
                 "2019-10-01 00:00:01 UTC,remove_from_cart,5,9,,acme,99.5,7,s\n"
                 "2019-10-01 00:00:02 UTC,purchase,5,9,electronics.smartphone,acme,99.5,7,s\n")
    reader = LogReader(f, "rees46")
    recs = list(reader)
    assert [r.kind for r in recs] == ["item", "click", "purchase"]
    assert reader.skipped == Counter(remove_from_cart=1)
    assert json.loads(recs[0].value)["title"] == "acme electronics smartphone"
    assert json.loads(recs[2].value)["price"] == 99.5
    assert recs[1].ts == 1569888000.0
    assert_valid(recs)

    g = tmp_path / "g.csv"
    g.write_text("who,what,action,when\nu1,i1,view,2024-01-01T00:00:00Z\nu1,i1,order,1704067201\n")
    recs = list(read_log(g, "csv", columns={"user_id": "who", "item_id": "what",
                                             "kind": "action", "ts": "when"},
                         kind_map={"view": "click", "order": "purchase"}, emit_items=False))
    assert [r.kind for r in recs] == ["click", "purchase"]
    assert [r.ts for r in recs] == [1704067200.0, 1704067201.0]
    with pytest.raises(ValueError, match="column mapping"):
        LogReader(g, "csv")
    with pytest.raises(ValueError, match="lacks"):
        LogReader(g, "csv", columns={"user_id": "who", "item_id": "what"})
    with pytest.raises(ValueError, match="unknown format"):
        LogReader(g, "parquet")


def test_generic_csv_skips_what_it_cannot_map(tmp_path: Path) -> None:
    g = tmp_path / "g.csv"
    g.write_text("user,item,ev,t,cat,cost\n"
                 "u1,i1,buy,2024-01-01T00:00:00+02:00,shoes,19.90\n"
                 "u1,i2,wishlist,1704067201,shoes,5\n"           # unmapped kind
                 "u2,i3,buy,2024-01-01 00:00:00,shoes,5\n"       # naive time: not guessed
                 "u2,,buy,1704067203,shoes,5\n"                   # no item
                 "u3,i4,add,1704067204,bags,nan\n")               # broken price dropped
    reader = LogReader(g, "csv", columns={"user_id": "user", "item_id": "item", "kind": "ev",
                                          "ts": "t", "category": "cat", "price": "cost"},
                       kind_map={"buy": "purchase", "add": "cart"})
    recs = list(reader)
    assert [r.kind for r in recs] == ["item", "purchase", "item", "cart"]
    assert reader.stats.skipped == Counter(wishlist=1, bad_ts=1, missing_id=1)
    assert reader.stats.rows == 5 and reader.stats.items == 2
    first = json.loads(recs[1].value)
    assert first["ts"] == 1704060000.0 and first["category"] == "shoes"
    assert first["price"] == 19.9
    assert "price" not in json.loads(recs[3].value)
    assert_valid(recs)


def test_pace_follows_event_time() -> None:
    recs = [ProducedRecord("click", "u", b"{}", ts=float(t)) for t in (0, 1, 2)]
    started = time.monotonic()
    assert list(pace(recs, speed=20.0)) == recs  # 2 s of event time at 20x: 0.1 s
    assert 0.08 <= time.monotonic() - started < 1.0
    started = time.monotonic()
    list(pace(recs, speed=None))
    assert time.monotonic() - started < 0.05
    with pytest.raises(ValueError):
        list(pace(recs, speed=-1.0))


@pytest.mark.skipif(not TAOBAO.exists(), reason="the Taobao subset is not in ../shared/datasets")
def test_the_real_taobao_file_maps_every_row() -> None:
    reader = LogReader(TAOBAO, "taobao")
    recs = list(reader)
    kinds = Counter(r.kind for r in recs)
    assert kinds == {"click": 85_773, "cart": 5_292, "fav": 2_959, "purchase": 2_144,
                     "item": 75_384}
    assert reader.stats == ReplayStats(rows=96_168, items=75_384, skipped=Counter(),
                                       events=Counter(click=85_773, cart=5_292, fav=2_959,
                                                      purchase=2_144))
    assert_valid(recs[:2000])
    events = [r for r in recs if r.kind != "item"]
    stamps = [r.ts for r in events]
    assert stamps == sorted(stamps)  # yielded in file order, which is time order
    ids = {json.loads(r.value)["event_id"] for r in events}
    assert len(ids) == 96_168  # unique, so the worker's de-duplication drops nothing
