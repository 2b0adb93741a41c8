"""Any log from the CLI: ``eval``, ``produce replay`` and ``demo --replay`` share one set of
log flags and one LogSpec builder; a log that cannot be read as asked, or gives nothing,
ends the command with a clear message and a non-zero exit, before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailstream.cli import build_parser, log_spec, main
from tailstream.settings import Settings

MAP = "user_id=who,item_id=what,kind=action,ts=when,query=q,title=name,category=cat"
KINDS = "view=click,buy=purchase,look=search"


def write_jsonl(path: Path, n: int = 120) -> Path:
    lines = [{"kind": "item", "item_id": f"i{k}", "title": f"Mug {k}",
              "category": "kitchen" if k % 2 else "garden"} for k in range(12)]
    for k in range(n):
        user, ts = f"u{k % 7}", 1717243200 + 10 * k
        if k % 10 == 0:
            lines.append({"kind": "search", "user_id": user, "ts": ts, "query": "red mug"})
        lines.append({"kind": "purchase" if k % 9 == 0 else "click", "user_id": user,
                      "ts": ts + 1, "item_id": f"i{(k * 5) % 12}"})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def write_csv(path: Path, n: int = 120) -> Path:
    rows = ["who,what,action,when,q,name,cat,unused"]
    for k in range(n):
        user, ts = f"u{k % 7}", 1717243200 + 10 * k
        if k % 10 == 0:
            rows.append(f"{user},,look,{ts},blue mug,,,x")
        item = (k * 5) % 12
        rows.append(f"{user},{item},{'buy' if k % 9 == 0 else 'view'},{ts + 1},,"
                    f"\"Mug {item}, blue\",{'kitchen' if item % 2 else 'garden'},x")
    path.write_text("\r\n".join(rows) + "\r\n")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


EVAL = ("--tiny", "--strategies", "popularity", "--blocks", "2", "--events", "80")


def test_eval_replays_a_jsonl_log_with_searches(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    log = write_jsonl(tmp_path / "log.jsonl")
    code, out, err = run(capsys, "eval", log, "--format", "jsonl", *EVAL, "--out", tmp_path)
    assert code == 0, err
    assert "log.jsonl (jsonl)" in out and (tmp_path / "eval.json").exists()
    # The summary, on stderr, before the command returns (it stopped after --events 80).
    assert "log.jsonl (jsonl): 92 rows read (stopped before the end of the file)" in err
    assert "events: 80 (click 64, cart 0, fav 0, purchase 8, search 8)" in err
    assert "items: 12 catalogue records" in err


def test_eval_replays_a_csv_log_by_its_mapping(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    log = write_csv(tmp_path / "log.csv")
    code, _, err = run(capsys, "eval", log, "--format", "csv", "--map", MAP, "--kinds", KINDS,
                       *EVAL, "--out", tmp_path)
    assert code == 0, err
    assert "search 8" in err and "texts from title, category" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [("eval",), ("produce", "replay"), ("demo", "--replay")])
def test_csv_without_a_map_is_a_clear_error(command: tuple[str, ...], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    log = write_csv(tmp_path / "log.csv")
    code, _, err = run(capsys, *command, log, "--format", "csv")
    assert code == 2
    assert "tailstream: error: --format csv needs a column mapping: --map user_id=COL" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [("eval",), ("produce", "replay"), ("demo", "--replay")])
def test_an_unusable_log_exits_non_zero_before_anything_starts(
        command: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "junk.csv"
    log.write_text("who,what,action,when\nu1,i1,zap,1717243200\nu1,i1,view,\n")
    code, _, err = run(capsys, *command, log, "--format", "csv", "--map",
                       "user_id=who,item_id=what,kind=action,ts=when", "--kinds", "view=click")
    assert code == 1
    assert "junk.csv (csv): 2 rows read" in err
    assert "skipped: 2 rows (kind 'zap' 1, e.g. line 2; missing_ts 1, e.g. line 3)" in err
    assert "tailstream: error: no usable events in" in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(capsys, *command, empty, "--format", "jsonl")
    assert code == 1 and "0 rows read" in err


def test_times_without_a_zone_are_refused_until_assume_utc(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "naive.csv"
    log.write_text("who,what,action,when\n" + "".join(
        f"u{k % 3},i{k % 5},view,2024-06-01 10:{k:02d}:00\n" for k in range(40)))
    flags = ("--format", "csv", "--map", "user_id=who,item_id=what,kind=action,ts=when",
             "--kinds", "view=click")
    code, _, err = run(capsys, "eval", log, *flags, *EVAL, "--out", tmp_path)
    assert code == 2
    assert (f"tailstream: error: {log}, line 2: the timestamp '2024-06-01 10:00:00' has no "
            "time zone") in err and "--assume-utc" in err
    args = build_parser().parse_args(["eval", str(log), *flags, "--assume-utc"])
    spec = log_spec(args, args.file, Settings())
    assert spec.assume_utc and spec.check().total_events == 40


def test_the_three_commands_share_the_log_flags(tmp_path: Path) -> None:
    log = write_csv(tmp_path / "log.csv")
    flags = ["--format", "csv", "--map", "user_id=who,item_id=what", "--map",
             "kind=action,ts=when,query=q", "--kinds", KINDS, "--assume-utc"]
    specs = []
    for argv in (["eval", str(log)], ["produce", "replay", str(log)],
                 ["demo", "--replay", str(log)]):
        args = build_parser().parse_args([*argv, *flags])
        specs.append(log_spec(args, log, Settings()))
    assert specs[0] == specs[1] == specs[2]
    assert specs[0].columns == {"user_id": "who", "item_id": "what", "kind": "action",
                                "ts": "when", "query": "q"}
    assert specs[0].kind_map == {"view": "click", "buy": "purchase", "look": "search"}
    with pytest.raises(SystemExit):  # produce replay names its format
        build_parser().parse_args(["produce", "replay", str(log)])


def test_a_log_read_in_the_wrong_format_gets_a_hint(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    log = write_jsonl(tmp_path / "log.jsonl", n=10)
    code, _, err = run(capsys, "eval", log)  # --format defaults to taobao
    assert code == 1 and "log.jsonl (taobao): 23 rows read" in err
    assert "nothing to replay (is it --format jsonl?)" in err
