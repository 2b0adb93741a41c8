"""`tailstream tune` on a tiny replay: optuna's trials, the settings file every command
takes back (--settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tailstream.cli import main
from tailstream.evaluation.tune import SPACE
from tailstream.settings import Settings, read_settings_file


def test_tune_writes_a_settings_file_the_commands_take(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    out = tmp_path / "tuned.env"
    code = main(["tune", "--tiny", "--threads", "1", "--events", "1500", "--blocks", "3",
                 "--trials", "2", "--metric", "hit_at_20", "--out", str(out),
                 "--data-dir", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "trial 0: hit_at_20 =" in err and "trial 1: hit_at_20 =" in err
    values = read_settings_file(out)
    assert set(values) == {f"TAILSTREAM_{k.upper()}" for k in SPACE}
    tuned = Settings.load(out, env={})
    for name, knob in SPACE.items():
        assert knob.low <= getattr(tuned, name) <= knob.high
    assert "best of 2 trials, hit_at_20 = " in out.read_text()


def test_an_unknown_metric_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not in the result"):
        main(["tune", "--tiny", "--threads", "1", "--events", "600", "--blocks", "2",
              "--trials", "1", "--strategy", "popularity", "--metric", "no_such_metric",
              "--out", str(tmp_path / "x.env"), "--data-dir", str(tmp_path)])
