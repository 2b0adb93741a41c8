"""Replaying logs: every format (Taobao, REES46, CSV by mapping, JSON lines), searches,
catalogue records, timestamps, logs as they come (BOM, CRLF, quotes, spaces), counts and
warnings, pacing, and the real Taobao file."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tailstream.contract import Limits, Rejection, decode_payload, validate_event, validate_item
from tailstream.producers.readers import LogReader
from tailstream.producers.records import ProducedRecord
from tailstream.producers.replay import (
    LogError,
    LogSpec,
    NothingUsable,
    ReplayStats,
    pace,
    read_log,
)

TAOBAO = (Path(__file__).parents[3] / "shared" / "datasets" / "taobao_userbehavior_subset"
          / "UserBehavior_head.csv")
CSV_MAP = {"user_id": "who", "item_id": "what", "kind": "action", "ts": "when"}


def assert_valid(recs: list[ProducedRecord]) -> None:
    """Every replayed record passes the contract the workers apply."""
    for rec in recs:
        values = decode_payload(rec.value, Limits())
        assert not isinstance(values, Rejection) and not rec.malformed
        if rec.kind == "item":
            assert validate_item(values[0], Limits()).item_id == rec.key
        else:
            assert validate_event(rec.kind, values[0], Limits(), now=2e9).user_id == rec.key


def values(recs: list[ProducedRecord], kind: str | None = None) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in recs if kind is None or r.kind == kind]


def test_taobao_mapping_on_a_small_file(tmp_path: Path) -> None:
    f = tmp_path / "tb.csv"
    f.write_text("1,10,100,pv,1511658000\n1,10,100,cart,1511658001\n2,11,100,fav,1511658002\n"
                 "2,10,100,buy,1511658003\n3,12,101,weird,1511658004\n")
    reader = LogReader(f, "taobao")
    recs = list(reader)
    # An item's first event is preceded by a record describing it, with the event's time.
    assert [r.kind for r in recs] == ["item", "click", "cart", "item", "fav", "purchase"]
    assert recs[0].ts == recs[1].ts == 1511658000.0
    stats = reader.stats
    assert (stats.rows, stats.events, stats.items, stats.skipped) == (
        5, Counter(click=1, cart=1, fav=1, purchase=1), 2, Counter({"kind 'weird'": 1}))
    assert stats.examples == {"kind 'weird'": "line 5"} and stats.complete
    assert_valid(recs)
    click = json.loads(recs[1].value)
    assert click == {"event_id": click["event_id"], "user_id": "1", "ts": 1511658000.0,
                     "item_id": "10", "category": "100"}
    assert json.loads(recs[0].value)["title"] == "item 10 in category 100"
    # Event ids are stable: a second replay is recognised as duplicates downstream.
    assert [r.value for r in read_log(f, "taobao")] == [r.value for r in recs]


def test_rees46(tmp_path: Path) -> None:
    f = tmp_path / "r.csv"
    f.write_text("event_time,event_type,product_id,category_id,category_code,brand,price,"
                 "user_id,user_session\n"
                 "2019-10-01 00:00:00 UTC,view,5,9,electronics.smartphone,acme,99.5,7,s\n"
                 "2019-10-01 00:00:01 UTC,remove_from_cart,5,9,,acme,99.5,7,s\n"
                 "2019-10-01 00:00:02 UTC,purchase,5,9,electronics.smartphone,acme,99.5,7,s\n"
                 "2019-10-01 00:00:03 UTC,view,6,9,,,1.5,7,s\n")
    reader = LogReader(f, "rees46")
    recs = list(reader)
    assert [r.kind for r in recs] == ["item", "click", "purchase", "item", "click"]
    assert reader.skipped == Counter({"kind 'remove_from_cart'": 1})
    assert json.loads(recs[0].value)["title"] == "acme electronics smartphone"
    assert json.loads(recs[2].value)["price"] == 99.5
    assert json.loads(recs[3].value)["category"] == "9"  # category_id when no code
    assert recs[1].ts == 1569888000.0
    assert_valid(recs)


def test_generic_csv_skips_what_it_cannot_map(tmp_path: Path) -> None:
    g = tmp_path / "g.csv"
    g.write_text("user,item,ev,t,cat,cost\n"
                 "u1,i1,buy,2024-01-01T00:00:00+02:00,shoes,19.90\n"
                 "u1,i2,wishlist,1704067201,shoes,5\n"           # unmapped kind
                 "u2,i3,buy,yesterday,shoes,5\n"                 # not a time
                 "u2,,buy,1704067203,shoes,5\n"                  # no item
                 "u3,i5,buy,12345,shoes,5\n"                     # 1970: a unit bug
                 "u3,i4,add,1704067204,bags,nan\n")              # broken price dropped
    reader = LogReader(g, "csv", columns={"user_id": "user", "item_id": "item", "kind": "ev",
                                          "ts": "t", "category": "cat", "price": "cost"},
                       kind_map={"buy": "purchase", "add": "cart"})
    recs = list(reader)
    assert [r.kind for r in recs] == ["item", "purchase", "item", "cart"]
    assert reader.stats.skipped == Counter({"kind 'wishlist'": 1, "bad_ts": 1,
                                            "missing_item_id": 1, "ts_before_2000": 1})
    assert reader.stats.examples["bad_ts"] == "line 4: 'yesterday'"
    assert reader.stats.rows == 6 and reader.stats.items == 2
    first = json.loads(recs[1].value)
    assert first["ts"] == 1704060000.0 and first["category"] == "shoes"
    assert first["price"] == 19.9
    assert "price" not in json.loads(recs[3].value)
    assert_valid(recs)


def test_jsonl_with_searches_and_catalogue_records(tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    lines = [
        {"kind": "item", "item_id": "i1", "title": "Trail runner, red", "category": "shoes",
         "brand": "Acme", "price": 59.9},
        {"kind": "item", "item_id": 2, "category": "bags"},  # no title: filled
        {"kind": "search", "user_id": "u1", "ts": 1717243300, "query": "red shoes",
         "result_item_ids": ["i1", "2"], "clicked_item_id": "i1"},
        {"kind": "click", "event_id": "e-1", "user_id": 42, "ts": 1717243301, "item_id": "i1"},
        {"kind": "purchase", "user_id": "u1", "ts": "2024-06-01T12:01:42Z", "item_id": 2,
         "price": 10, "quantity": 2, "extra": "ignored"},
        {"kind": "view", "user_id": "u1", "ts": 1717243303, "item_id": "i1"},  # via --kinds
        {"kind": "refund", "user_id": "u1", "ts": 1717243304, "item_id": "i1"},
        {"kind": "click", "user_id": "u1", "item_id": "i1"},
        {"user_id": "u1", "ts": 1717243305, "item_id": "i1"},
        {"kind": "search", "user_id": "u1", "ts": 1717243306},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\nnot json\n[1]\n")
    reader = LogSpec(f, "jsonl", kind_map={"view": "click"}).reader()
    recs = list(reader)
    assert [r.kind for r in recs] == ["item", "item", "search", "click", "purchase", "click"]
    items = values(recs, "item")
    assert items[1] == {"item_id": "2", "title": "bags", "category": "bags"}
    search = values(recs, "search")[0]
    assert search["query"] == "red shoes" and search["result_item_ids"] == ["i1", "2"]
    assert search["event_id"].startswith("jsonl-") and search["clicked_item_id"] == "i1"
    click = values(recs, "click")[0]
    assert click == {"event_id": "e-1", "user_id": "42", "ts": 1717243301.0, "item_id": "i1"}
    buy = values(recs, "purchase")[0]
    assert buy["ts"] == 1717243302.0 and buy["quantity"] == 2 and "extra" not in buy
    assert [r.ts for r in recs[:2]] == [None, None]  # catalogue records from the log itself
    stats = reader.stats
    assert stats.rows == 12 and stats.items == 2
    assert stats.events == Counter(search=1, click=2, purchase=1)
    assert stats.skipped == Counter({"kind 'refund'": 1, "missing_ts": 1, "missing_kind": 1,
                                     "invalid_missing_field": 1, "not_json": 1,
                                     "not_object": 1})
    assert stats.examples["invalid_missing_field"] == "line 10: query"
    assert_valid(recs)


def test_hostile_json_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    f = tmp_path / "odd.jsonl"
    click = '{"kind": "click", "user_id": "u", "item_id": "i", "ts": %s}\n'
    f.write_text(click % '{"a": 1}' + click % "1e400" + click % "NaN" + "[" * 100_000 + "\n"
                 + click % ("9" * 500) + click % 1704067200)
    reader = LogReader(f, "jsonl")
    assert [r.ts for r in reader] == [1704067200.0]
    assert reader.stats.skipped == Counter(bad_ts=3, not_json=2)


def test_csv_with_map_and_kinds_replays_searches(tmp_path: Path) -> None:
    f = tmp_path / "shop.csv"
    f.write_text("sid;sku;event;when;q;name;cat;maker;cost;results\n"
                 "s1;;search;1717243200;red mug;;;;;a1|a2 a3\n"
                 "s1;a2;view;1717243201;;Red mug;kitchen;Acme;9.5;\n"
                 "s1;a2;buy;1717243202;;Red mug;kitchen;Acme;9.5;\n"
                 "s2;a3;search;1717243203;blue mug;;;;;\n"
                 "s2;;search;1717243204;;;;;;\n")
    spec = LogSpec(f, "csv", columns={"session": "sid", "item_id": "sku", "kind": "event",
                                      "ts": "when", "query": "q", "title": "name",
                                      "category": "cat", "brand": "maker", "price": "cost",
                                      "result_item_ids": "results"},
                   kind_map={"view": "click", "buy": "purchase", "search": "search"})
    reader = spec.reader()
    recs = list(reader)
    assert [r.kind for r in recs] == ["search", "item", "click", "purchase", "search"]
    first = values(recs, "search")[0]
    assert first["user_id"] == "s1" and first["query"] == "red mug"
    assert first["result_item_ids"] == ["a1", "a2", "a3"] and "clicked_item_id" not in first
    assert values(recs, "search")[1]["clicked_item_id"] == "a3"  # the item of a search row
    assert values(recs, "item")[0] == {"item_id": "a2", "title": "Red mug",
                                       "category": "kitchen", "brand": "Acme", "price": 9.5}
    assert "price" not in values(recs, "click")[0]  # the price paid: cart and purchase only
    assert values(recs, "purchase")[0]["price"] == 9.5
    assert reader.stats.skipped == Counter(missing_query=1)
    assert reader.stats.text_from == "title, brand, category"
    assert_valid(recs)


def test_times_without_a_zone_are_refused_unless_assume_utc(tmp_path: Path) -> None:
    f = tmp_path / "naive.csv"
    f.write_text("who,what,action,when\nu1,i1,click,2024-01-01T00:00:00+00:00\n"
                 "u1,i2,click,2024-01-01 10:00:00\n")
    with pytest.raises(LogError) as err:
        list(LogReader(f, "csv", columns=CSV_MAP))
    message = str(err.value)
    assert all(s in message for s in (str(f), "line 3", "'2024-01-01 10:00:00'",
                                      "--assume-utc"))
    recs = list(LogReader(f, "csv", columns=CSV_MAP, assume_utc=True, emit_items=False))
    assert [r.ts for r in recs] == [1704067200.0, 1704103200.0]
    j = tmp_path / "naive.jsonl"
    j.write_text('{"kind": "click", "user_id": "u", "item_id": "i", '
                 '"ts": "2024-01-01T10:00:00"}\n')
    with pytest.raises(LogError, match="no time zone"):
        LogSpec(j, "jsonl").check()
    assert LogSpec(j, "jsonl", assume_utc=True).check().total_events == 1


def test_timestamp_units_are_told_apart_by_size(tmp_path: Path) -> None:
    f = tmp_path / "units.jsonl"
    stamps = [1704067200, 1704067200500, "1704067201000000", 1704067202000000000,
              "2024-01-01T00:00:03.5+00:00"]
    f.write_text("".join(json.dumps({"kind": "click", "user_id": "u", "item_id": "i",
                                     "ts": s}) + "\n" for s in stamps))
    reader = LogReader(f, "jsonl")
    assert [r.ts for r in reader] == [1704067200.0, 1704067200.5, 1704067201.0, 1704067202.0,
                                      1704067203.5]
    assert reader.stats.ts_forms == Counter({"unix s": 1, "unix ms": 1, "unix us": 1,
                                             "unix ns": 1, "iso": 1})


def test_logs_as_they_come_bom_crlf_quotes_spaces_extra_columns(tmp_path: Path) -> None:
    f = tmp_path / "messy.csv"
    f.write_bytes("\ufeffExtra, Who ,What,Action,When,Title\r\n"
                  'x, 42 , 1001 ,view,1704067200,"Mug, red ""classic"""\r\n'
                  "\r\n"
                  'y,42,1002,VIEW,1704067201,"two\r\nlines"\r\n'
                  "z,43,1001,view,1704067202\r\n".encode())
    reader = LogReader(f, "csv", columns={"user_id": "who", "item_id": "what",
                                          "kind": "Action", "ts": "when", "title": "title"},
                       kind_map={"view": "click"})
    recs = list(reader)
    assert [r.kind for r in recs] == ["item", "click", "item", "click", "click"]
    assert values(recs, "item") == [
        {"item_id": "1001", "title": 'Mug, red "classic"', "category": "unknown"},
        {"item_id": "1002", "title": "two\r\nlines", "category": "unknown"}]
    clicks = values(recs, "click")
    assert [c["user_id"] for c in clicks] == ["42", "42", "43"]
    assert clicks[0]["event_id"].endswith("-2") and clicks[2]["event_id"].endswith("-6")
    assert reader.stats.rows == 3 and not reader.stats.skipped
    j = tmp_path / "bom.jsonl"
    j.write_bytes(b'\xef\xbb\xbf{"kind": "click", "user_id": " 7 ", "item_id": "i", '
                  b'"ts": 1704067200}\r\n\r\n')
    assert values(list(LogReader(j, "jsonl")))[0]["user_id"] == "7"


def test_tab_separated_and_taobao_with_crlf(tmp_path: Path) -> None:
    f = tmp_path / "t.tsv"
    f.write_text("who\twhat\taction\twhen\nu1\ti1\tclick\t1704067200\n")
    assert [r.kind for r in LogReader(f, "csv", columns=CSV_MAP)] == ["item", "click"]
    t = tmp_path / "tb.csv"
    t.write_bytes(b"\xef\xbb\xbf1, 10 ,100,pv,1511658000\r\n1,11,100\r\n")
    reader = LogReader(t, "taobao", emit_items=False)
    assert [json.loads(r.value)["item_id"] for r in reader] == ["10"]
    assert reader.stats.examples == {"unmappable": "line 2: 3 fields, not 5"}


def test_shared_item_text_is_warned_about(tmp_path: Path) -> None:
    f = tmp_path / "cats.csv"
    f.write_text("who,what,action,when,cat\n" + "".join(
        f"u{n},i{n},click,{1704067200 + n},{'shoes' if n % 3 else 'bags'}\n" for n in range(9)))
    columns = {**CSV_MAP, "category": "cat"}
    reader = LogReader(f, "csv", columns=columns)
    list(reader)
    assert reader.stats.items == 9 and reader.stats.shared_text == 9
    assert reader.stats.shared_text_warning
    assert "9 of 9 items (100%) share their text" in reader.summary()
    # With a title column, each item has its own text: no warning.
    g = tmp_path / "titled.csv"
    g.write_text("who,what,action,when,cat,name\n" + "".join(
        f"u{n},i{n},click,{1704067200 + n},shoes,Shoe {n}\n" for n in range(9)))
    reader = LogReader(g, "csv", columns={**columns, "title": "name"})
    list(reader)
    assert reader.stats.shared_text == 0 and "share their text" not in reader.summary()


def test_time_going_backwards_is_counted(tmp_path: Path) -> None:
    f = tmp_path / "unsorted.csv"
    f.write_text("who,what,action,when\n" + "".join(
        f"u,i,click,{t}\n" for t in (1704067200, 1704067300, 1704067290, 1704067000,
                                     1704067400)))
    reader = LogReader(f, "csv", columns=CSV_MAP, emit_items=False)
    list(reader)
    assert (reader.stats.backwards, reader.stats.max_backwards_s) == (1, 300.0)
    assert "1 events are more than 60 s earlier" in reader.summary()


def test_an_unusable_log_raises_after_its_summary(tmp_path: Path) -> None:
    seen: list[ReplayStats] = []
    f = tmp_path / "junk.csv"
    f.write_text("who,what,action,when\nu1,i1,zap,1704067200\n")
    reader = LogReader(f, "csv", columns=CSV_MAP, on_end=lambda r: seen.append(r.stats))
    with pytest.raises(NothingUsable, match="every one skipped"):
        list(reader)
    assert seen == [reader.stats] and reader.stats.complete
    assert "skipped: 1 row (kind 'zap' 1, e.g. line 2)" in reader.summary()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(NothingUsable, match="0 rows"):
        LogSpec(empty, "jsonl").check()
    # A reader closed early reports what it read, and raises nothing.
    many = tmp_path / "many.csv"
    many.write_text("who,what,action,when\n" + "u,i,click,1704067200\n" * 5)
    reader = LogReader(many, "csv", columns=CSV_MAP, emit_items=False,
                       on_end=lambda r: seen.append(r.stats))
    records = iter(reader)
    next(records)
    records.close()  # type: ignore[attr-defined]
    assert seen[-1].rows == 1 and not seen[-1].complete


def test_check_reads_only_the_first_rows(tmp_path: Path) -> None:
    f = tmp_path / "late.csv"
    f.write_text("who,what,action,when\n" + "u,i,click,1704067200\n" * 30
                 + "u,i,click,2024-01-01 00:00:00\n")
    spec = LogSpec(f, "csv", columns=CSV_MAP)
    assert spec.check(rows=10).rows == 10
    with pytest.raises(LogError, match="line 32"):
        spec.check(rows=100)


@pytest.mark.parametrize("columns,kinds,fmt,message", [
    (None, None, "csv", "needs a column mapping"),
    ({"user_id": "who", "item_id": "what"}, None, "csv", "lacks kind, ts"),
    ({"item_id": "what", "kind": "action", "ts": "when"}, None, "csv", "lacks user_id"),
    ({**CSV_MAP, "colour": "c"}, None, "csv", "unknown --map key 'colour'"),
    (CSV_MAP, {"q": "search"}, "csv", "no query column"),
    (CSV_MAP, {"view": "clicks"}, "csv", "not a kind"),
    (CSV_MAP, None, "taobao", "--map is for --format csv"),
    ({"user_id": "1", "item_id": "what", "kind": "3", "ts": "4"}, None, "csv",
     "all by header name or all by position"),
    ({"user_id": "who", "item_id": "what", "ts": "when"}, {"view": "click"}, "csv",
     "takes --kinds '\\*=click'"),
    (None, None, "parquet", "unknown format"),
])
def test_mappings_that_cannot_work_are_refused(columns: dict[str, str] | None,
                                               kinds: dict[str, str] | None, fmt: str,
                                               message: str, tmp_path: Path) -> None:
    with pytest.raises(LogError, match=message):
        LogSpec(tmp_path / "x.csv", fmt, columns=columns, kind_map=kinds)


def test_a_click_only_log_without_header_or_kind_column(tmp_path: Path) -> None:
    """Session logs as they are published (YooChoose's clicks: no header, no kind column,
    ISO times): columns by position, and one kind for every row (``--kinds '*=click'``),
    which also catches raw kinds the map does not list."""
    f = tmp_path / "clicks.dat"
    f.write_text("1,2014-04-07T10:51:09.277Z,214536502,0\n"
                 "1,2014-04-07T10:54:09.868Z,214536500,0\n"
                 "2,2014-04-07T13:56:37.614Z,214662742,S\n")
    reader = LogReader(f, "csv", columns={"session": "1", "ts": "2", "item_id": "3",
                                          "category": "4"}, kind_map={"*": "click"})
    recs = list(reader)
    assert_valid(recs)
    clicks = values(recs, "click")
    assert [(c["user_id"], c["item_id"]) for c in clicks] == [
        ("1", "214536502"), ("1", "214536500"), ("2", "214662742")]
    assert clicks[0]["ts"] == pytest.approx(1396867869.277)
    assert reader.stats.rows == 3 and not reader.stats.skipped
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("who,what,action,when\nu,i,view,1704067200\nu,j,buy,1704067201\n"
                     "u,k,wishlist,1704067202\n")
    recs = list(LogReader(mixed, "csv", columns=CSV_MAP,
                          kind_map={"buy": "purchase", "*": "click"}))
    assert [(r.kind, json.loads(r.value)["item_id"]) for r in recs if r.kind != "item"] == [
        ("click", "i"), ("purchase", "j"), ("click", "k")]


def test_columns_missing_from_the_header_are_named(tmp_path: Path) -> None:
    f = tmp_path / "h.csv"
    f.write_text("who,what,action,time\nu,i,click,1704067200\n")
    with pytest.raises(LogError) as err:
        LogSpec(f, "csv", columns=CSV_MAP).check()
    assert "no column 'when' (for ts)" in str(err.value)
    assert "'who', 'what', 'action', 'time'" in str(err.value)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("who,what,action,when\nJosé,i,click,1704067200\n".encode("latin-1"))
    with pytest.raises(LogError, match="not UTF-8"):
        LogSpec(latin, "csv", columns=CSV_MAP).check()
    with pytest.raises(LogError, match="cannot read"):
        LogSpec(tmp_path / "absent.csv", "csv", columns=CSV_MAP).check()


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
    stats = reader.stats
    assert (stats.rows, stats.items, stats.skipped, stats.backwards, stats.shared_text) == (
        96_168, 75_384, Counter(), 0, 0)
    assert stats.events == Counter(click=85_773, cart=5_292, fav=2_959, purchase=2_144)
    assert_valid(recs[:2000])
    events = [r for r in recs if r.kind != "item"]
    stamps = [r.ts for r in events]
    assert stamps == sorted(stamps)  # yielded in file order, which is time order
    ids = {json.loads(r.value)["event_id"] for r in events}
    assert len(ids) == 96_168  # unique, so the worker's de-duplication drops nothing
