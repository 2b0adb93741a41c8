"""The CPU scripts under tests/perf keep running: each one, tiny, through its command line
(a script that broke with a refactor would be found only by the next person timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parents[1] / "perf"


def run_script(name: str, *args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, str(PERF / name), *args], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_the_sources_script_times_updates_and_lists() -> None:
    out = run_script("signals_cpu.py", "--events", "3000", "--users", "40", "--repeats", "1")
    assert out["users"] == 40 and isinstance(out["interactions"], int)
    assert out["interactions"] > 2000
    assert isinstance(out["us_per_interaction"], float) and out["us_per_interaction"] > 0
    assert isinstance(out["us_per_list"], float) and out["us_per_list"] > 0


def test_the_pipeline_script_times_every_event_without_dead_letters() -> None:
    out = run_script("pipeline_cpu.py", "--events", "2000", "--envelope", "10",
                     "--repeats", "1")
    assert out["dlq"] == 0 and isinstance(out["events"], int) and out["events"] > 1500
    assert isinstance(out["us_per_event"], float) and out["us_per_event"] > 0
