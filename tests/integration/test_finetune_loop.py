"""The whole loop in the embedded demo: minority samples trigger a fine-tune, the gate
decides with a logged reason, a promoted version reaches the lists — while events flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)  # the subprocess's own bound (540 s) decides, not the suite's 300
def test_buffered_minority_samples_become_a_promoted_model_in_the_lists(
        tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    data = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILSTREAM_")}
    env.update(
        TAILSTREAM_DATA_DIR=str(data), TAILSTREAM_WEB_PORT="0", TAILSTREAM_TRAINER_PORT="0",
        # Small, fast runs; and a gate that promotes any candidate that improves something,
        # so the promotion path is exercised deterministically (the gate's reject path is
        # tested in tests/unit/test_trainer.py).
        TAILSTREAM_TRIGGER_MIN_SAMPLES="400", TAILSTREAM_TRIGGER_COOLDOWN_S="10",
        TAILSTREAM_FINETUNE_MAX_STEPS="60", TAILSTREAM_GATE_RECALL_TOLERANCE="1.0",
        TAILSTREAM_GATE_QUALITY_TOLERANCE="1.0",
        # No canary: the gate's decision promotes at once (the canary between the gate and
        # the promotion is tested in test_canary.py).
        TAILSTREAM_CANARY_SHARE="0",
        # The promotion path, not the back-pressure (tests/unit/test_yielding.py): on a
        # machine where the worker is always over its budget the trainer would pause its
        # run past this test's timeout; the duty floor keeps half the clock for its steps.
        TAILSTREAM_TRAINER_MIN_DUTY="0.5")
    done = subprocess.run(
        [sys.executable, "-m", "tailstream.cli", "demo", "--seconds", "40", "--rate", "250",
         "--users", "400", "--items", "800", "--no-ui", "--summary-json", str(out)],
        env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-4000:]
    s = json.loads(out.read_text())
    print("\nfinetunes", s["finetunes"], "lists by version", s["lists_by_model_version"],
          "by trigger", s["lists_by_trigger"], "events/s during / outside fine-tunes",
          s["events_per_s_during_finetune"], s["events_per_s_outside_finetune"])

    # Buffered minority samples triggered at least one run, and each run has a reason.
    assert s["triggers_fired"]["buffer"] >= 1
    assert s["finetunes"]["runs"] >= 1 and s["finetunes"]["promoted"] >= 1
    runs = [json.loads(line) for line in (data / "models" / "runs.jsonl").read_text()
            .splitlines()]
    assert len(runs) == s["finetunes"]["runs"]
    for run in runs:
        assert run["outcome"] in ("promoted", "rejected", "failed", "skipped")
        assert run["reason"]
    trainer_log = (data / "logs" / "trainer.log").read_text()
    assert "fine-tune promoted v0000" in trainer_log

    # The promoted version serves: lists published after the promotion carry it (the
    # bulk refresh of active users, and lists for new events).
    promoted = [r["version"] for r in runs if r["outcome"] == "promoted"][-1]
    assert s["serving_model_version"] == int(promoted[1:])
    assert s["lists_by_model_version"].get(promoted, 0) > 0
    assert s["lists_by_trigger"].get("promotion", 0) > 0
    manifest = json.loads((data / "models" / "versions" / promoted / "manifest.json")
                          .read_text())
    assert manifest["status"] == "promoted" and manifest["gate"]["promote"]

    # Events kept flowing while the trainer worked.
    during, outside = s["events_per_s_during_finetune"], s["events_per_s_outside_finetune"]
    assert during is not None and outside is not None
    assert during >= 0.8 * outside
    assert s["events_consumed"] == s["events_produced"]
