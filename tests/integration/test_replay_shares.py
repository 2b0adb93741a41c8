"""Replaying the real Taobao log: class shares and class-balanced weights as the issue states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
TAOBAO = (Path(__file__).parents[3] / "shared" / "datasets" / "taobao_userbehavior_subset"
          / "UserBehavior_head.csv")
ROWS = 15_000
NAMES = {"pv": "click", "cart": "cart", "fav": "fav", "buy": "purchase"}


@pytest.mark.skipif(not TAOBAO.exists(), reason="the Taobao subset is not in ../shared/datasets")
def test_demo_replay_reports_the_files_shares_and_effective_number_weights(
        tmp_path: Path) -> None:
    head = tmp_path / "head.csv"
    lines = TAOBAO.read_text().splitlines(keepends=True)[:ROWS]
    head.write_text("".join(lines))
    expected = Counter(NAMES[line.split(",")[3]] for line in lines)

    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILSTREAM_")}
    env.update(TAILSTREAM_DATA_DIR=str(tmp_path / "var"), TAILSTREAM_WEB_PORT="0",
               TAILSTREAM_WEIGHT_POLICY="class_balanced")
    out = tmp_path / "s.json"
    done = subprocess.run([sys.executable, "-m", "tailstream.cli", "demo", "--replay", str(head),
                           "--format", "taobao", "--no-ui", "--summary-json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["events_consumed"] == ROWS
    assert s["class_counts"] == dict(expected)
    for c, n in expected.items():
        assert s["class_shares"][c] == pytest.approx(n / ROWS, abs=1e-6)
    lw = s["loss_weights"]
    beta, n = lw["beta"], lw["counts"]
    ratio = lw["weights"]["purchase"] / lw["weights"]["click"]
    assert ratio == pytest.approx((1 - beta ** n["click"]) / (1 - beta ** n["purchase"]),
                                  rel=1e-9)
    assert s["buffer_sizes"]["purchase"] == expected["purchase"]  # every purchase kept
