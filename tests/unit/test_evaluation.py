"""``tailstream eval`` end to end on a small synthetic shop with a tiny random BERT: every
strategy runs, the adaptive one through the gate, and the report, JSON and charts are
written. The leak-free protocol on a hand-made log: no strategy or peer can rank an item
before it is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailstream.cli import main
from tailstream.contract import CATALOGUE, SEARCH, Item
from tailstream.evaluation.specs import STRATEGIES, EvalConfig
from tailstream.evaluation.strategies import Harness
from tailstream.evaluation.stream import collect
from tailstream.producers.records import ProducedRecord, wire_bytes
from tailstream.settings import Settings


def test_eval_runs_every_strategy_and_writes_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Triggers low enough that the loop asks for fine-tunes within 4,000 events.
    monkeypatch.setenv("TAILSTREAM_TRIGGER_MIN_SAMPLES", "150")
    monkeypatch.setenv("TAILSTREAM_TRIGGER_COOLDOWN_S", "0")
    out = tmp_path / "eval"
    code = main(["eval", "--tiny", "--events", "4000", "--users", "200", "--items", "300",
                 "--blocks", "3", "--steps", "5", "--batch", "64", "--out", str(out),
                 "--json", str(tmp_path / "summary.json")])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert list(result["strategies"]) == list(STRATEGIES)
    assert result["blocks"] == 3 and result["events"] > 0
    for name, m in result["strategies"].items():
        assert m["ranked"] > 0, name
        assert 0.0 <= m["hit_at_20"] <= 1.0
        assert m["cold_target_hits"] == 0 and m["unknown_shown"] == 0, name
        assert m["hit_at_20_se"] > 0 and m["map_at_5_search"] is not None, name
        if STRATEGIES[name].kind == "peer":
            assert "macro_f1" not in m, name  # lists only
        else:
            assert 0.0 <= m["macro_f1"] <= 1.0 and 0.0 <= m["g_mean"] <= 1.0, name
    fixed = [n for n, s in STRATEGIES.items() if s.kind == "transformer" and not s.adaptive]
    # Fixed strategies train after every block but the last, and serve every candidate.
    assert all(result["strategies"][n]["finetunes"] == 2 for n in fixed)
    assert all(result["strategies"][n]["promotions"] == 2 for n in fixed)
    # The adaptive loop trains only when its triggers fired, and the gate decides.
    gate = result["gate"]["adaptive"]
    assert gate and all(d["triggers"] and d["reason"] for d in gate)
    assert result["strategies"]["adaptive"]["finetunes"] == len(gate)
    assert result["strategies"]["adaptive"]["promotions"] == sum(d["promote"] for d in gate)
    # Its decisions come from the served version's layer (fitted by the trainer on the
    # gate's window, or refitted for the served weights at a rejected trigger): one
    # record per scored block after the first promotion or refresh, none before.
    first = min((d["block"] for d in gate if d["promote"] or d["decisions_refreshed"]),
                default=result["blocks"])
    assert all(not (d["promote"] and d["decisions_refreshed"]) for d in gate)
    fits = result["decisions"].get("adaptive", [])
    assert len(fits) == max(0, result["blocks"] - 1 - first)
    assert all(f["fitted_on"] > 0 for f in fits)
    report = (out / "report.md").read_text()
    assert "| adaptive |" in report and "promotion gate (adaptive)" in report
    # The first table ranks every strategy and peer by HitRate@20, with standard errors.
    board = report[report.index("| # | strategy | HitRate@20"):].split("\n\n")[0]
    assert len(board.splitlines()) == 2 + len(STRATEGIES) and " ± " in board
    assert len(list(out.glob("*.png"))) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"dataset", "events", "strategies"}
    assert "wrote" in capsys.readouterr().out


def test_an_unknown_strategy_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown strategies"):
        main(["eval", "--tiny", "--strategies", "ce,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown setting 'nope'"):
        main(["eval", "--tiny", "--strategies", "ce[nope=1]", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="only the transformer strategies"):
        main(["eval", "--tiny", "--strategies", "river[tail_share=0]", "--out", str(tmp_path)])


def test_an_ablation_runs_beside_its_base_with_its_own_settings(tmp_path: Path) -> None:
    """``ce[tail_share=0]`` is ``ce`` with no tail quota: same replay, same training,
    different lists — fewer tail items shown — and a report row beside its base."""
    out = tmp_path / "eval"
    code = main(["eval", "--tiny", "--events", "3000", "--users", "150", "--items", "300",
                 "--blocks", "3", "--steps", "3", "--batch", "64", "--out", str(out),
                 "--strategies", "ce,ce[tail_share=0,rank_popularity_weight=1],ce[tail_share=0.6]"])
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    names = ["ce", "ce[tail_share=0,rank_popularity_weight=1]", "ce[tail_share=0.6]"]
    assert list(result["strategies"]) == names
    none, most = (result["strategies"][n] for n in names[1:])
    # The outcome head is trained and scored the same way: its decisions do not move.
    assert none["macro_f1"] == most["macro_f1"]
    assert none["tail_exposure_share"] < most["tail_exposure_share"]
    report = (out / "report.md").read_text()
    assert "| ce (base) |" in report and f"| {names[1]} |" in report


# ---------------------------------------------------------------------- leak-free protocol
class Log:
    """A hand-made log: catalogue records, clicks and searches, one second apart."""

    def __init__(self) -> None:
        self.records: list[ProducedRecord] = []
        self.ts = 1.7e9

    def announce(self, item_id: str) -> None:
        """A catalogue record of its own (the item is known from here on)."""
        self.records.append(ProducedRecord(CATALOGUE, item_id, wire_bytes(
            Item(item_id, f"{item_id} mug", "mugs").to_dict())))

    def click(self, user: str, item_id: str, *, describe: bool = False) -> None:
        """A click; ``describe``: with the record a reader writes in front of an item's
        first event (same time stamp: it describes the item, it does not announce it)."""
        self.ts += 1.0
        if describe:
            self.records.append(ProducedRecord(CATALOGUE, item_id, wire_bytes(
                Item(item_id, f"{item_id} mug", "mugs").to_dict()), ts=self.ts))
        self.records.append(ProducedRecord("click", user, wire_bytes(
            {"event_id": f"e{len(self.records)}", "user_id": user, "ts": self.ts,
             "item_id": item_id, "category": "mugs"}), ts=self.ts))

    def search(self, user: str, query: str, clicked: str | None = None) -> None:
        self.ts += 1.0
        value: dict[str, object] = {"event_id": f"e{len(self.records)}", "user_id": user,
                                    "ts": self.ts, "query": query}
        if clicked is not None:
            value["clicked_item_id"] = clicked
        self.records.append(ProducedRecord(SEARCH, user, wire_bytes(value), ts=self.ts))


def future_log() -> Log:
    """Items F and K are first interacted with in block 1 (by t1, and by t3 after a search
    whose record names K as its click), then become everybody's favourites: a model that
    could see the future would put them first. N is announced on the catalogue before t2
    interacts with it: known, so rankable."""
    log = Log()
    for i in range(8):
        log.announce(f"c{i}")
    for j in range(30):
        log.click(f"u{j % 10}", f"c{(j * 3) % 8}")
    log.announce("N")
    for j in range(6):
        log.click(f"u{j}", f"c{(j * 5 + 1) % 8}")
    log.click("t1", "c2")
    log.click("t1", "F", describe=True)  # cold target
    log.click("t2", "N")  # announced before: a warm target
    log.search("t3", "fancy kettle", clicked="K")
    log.click("t3", "K", describe=True)  # cold target, though the search record names it
    for j in range(10):
        log.click(f"u{j}", "F")
        log.search(f"u{j}", "fancy kettle")
        log.click(f"u{j}", "K")
    return log


COLD = {("t1", "F"), ("t3", "K")}


@pytest.fixture(scope="module")
def future_harness(tmp_path_factory: pytest.TempPathFactory) -> Harness:
    settings = Settings.from_env({})
    cfg = EvalConfig(blocks=3, rank_every=1, steps=2, batch_size=16, tiny=True)
    stream = collect(future_log().records, settings, blocks=cfg.blocks,
                     rank_every=cfg.rank_every)
    return Harness(stream, settings, cfg, tmp_path_factory.mktemp("future"))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_no_strategy_ranks_an_item_before_it_is_known(future_harness: Harness,
                                                      name: str) -> None:
    h = future_harness
    scored = [it for it in h.stream.interactions if it.ranked and h.counted(it)]
    pairs = [(it.sample.user_id, it.sample.item_id) for it in scored]
    assert COLD <= set(pairs)  # both cold targets are scored, in counted blocks
    result = h.run(name)
    assert len(result.ranks) == len(scored)
    ranks = dict(zip(pairs, result.ranks, strict=True))
    assert {p: ranks[p] for p in COLD} == {p: 0 for p in COLD}, name
    m = result.metrics(len(h.stream.item_text), len(h.stream.interactions))
    assert m["cold_target_hits"] == 0 and m["unknown_shown"] == 0 and m["ranked_cold"] == 2
    if STRATEGIES[name].kind == "transformer":
        # Announced on the catalogue before: known, and a 10-item catalogue fits the list.
        assert ranks[("t2", "N")] > 0, name


def test_the_replay_numbers_items_as_they_become_known(future_harness: Harness) -> None:
    stream = future_harness.stream
    assert stream.known_ids[:9] == [*(f"c{i}" for i in range(8)), "N"]
    assert stream.known_ids[9:] == ["F", "K"]  # after t1's and t3's interactions
    by_pair = {(it.sample.user_id, it.sample.item_id): it for it in stream.interactions}
    assert by_pair[("t1", "F")].known == 9 and not by_pair[("t1", "F")].target_known
    assert by_pair[("t2", "N")].target_known and by_pair[("t2", "N")].known == 10
    assert by_pair[("t3", "K")].query == "fancy kettle"
    assert not by_pair[("t3", "K")].target_known and by_pair[("t3", "K")].known == 10
    assert [s.query for s in stream.searches][:2] == ["fancy kettle"] * 2


def test_a_log_out_of_time_order_is_replayed_in_time_order() -> None:
    """Real logs come sorted by user or session (the full Taobao file is): replayed in
    file order, a test-then-train evaluation would train on the future of what it tests
    next. The replay sorts by time, each catalogue record travelling with the event that
    followed it in the file: the same stream as the log in time order."""
    settings = Settings.from_env({})
    records = future_log().records
    units: list[list[ProducedRecord]] = [[]]  # each event with the records before it
    for rec in records:
        units[-1].append(rec)
        if rec.kind != CATALOGUE:
            units.append([])
    by_user = sorted(units[:-1], key=lambda unit: unit[-1].key)  # stable: time within a user
    shuffled = [rec for unit in by_user for rec in unit] + units[-1]
    assert shuffled != records
    want = collect(records, settings, blocks=3, rank_every=1)
    got = collect(shuffled, settings, blocks=3, rank_every=1)
    assert [it.sample.event_id for it in got.interactions] == \
        [it.sample.event_id for it in want.interactions]
    assert got.known_ids == want.known_ids
    assert [(it.known, it.target_known, it.query) for it in got.interactions] == \
        [(it.known, it.target_known, it.query) for it in want.interactions]
    assert got.searches == want.searches


def test_classes_the_log_lacks_are_none_and_shown_as_a_dash() -> None:
    from tailstream.evaluation.report import table
    from tailstream.evaluation.results import StrategyResult

    res = StrategyResult("s")
    for y, p, prob in [("click", "click", 0.1), ("click", "purchase", 0.6),
                       ("purchase", "purchase", 0.9), ("cart", "click", 0.2)]:
        res.y_true.append(y)
        res.y_pred.append(p)
        res.p_purchase.append(prob)
        res.p_cart.append(0.0)
    m = res.metrics(10, 4)
    assert m["recall_fav"] is None and m["f1_fav"] is None  # no fav in the log
    assert m["recall_cart"] == 0.0 and m["g_mean"] == 0.0  # cart present, never found
    assert m["purchase_roc_auc"] == 1.0 and m["minority_macro_recall"] == 0.5
    assert m["hit_at_20"] is None and m["map_at_5_search"] is None  # no list scored
    rows = table({"s": m, "t": {**m, "recall_click": 0.1}}, (("recall_fav", "R fav"),
                                                           ("recall_click", "R click")))
    assert rows[2] == "| s | — | **0.500** |" and rows[3] == "| t | — | 0.100 |"
