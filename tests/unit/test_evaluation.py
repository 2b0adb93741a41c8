"""``tailstream eval`` end to end on a small synthetic shop with a tiny random BERT: every
strategy runs, the adaptive one through the gate, and the report, JSON and charts are
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailstream.cli import main
from tailstream.evaluation.specs import STRATEGIES


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
