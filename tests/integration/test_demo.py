"""`tailstream demo` as a user runs it: its own embedded services, a summary that adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _service_pids() -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"tansu" in cmd or b"redis-server" in cmd or b"tailstream.cli\x00worker" in cmd:
            out.add(int(entry.name))
    return out


@pytest.mark.timeout(660)  # the subprocess's own bound (600 s) decides, not the suite's 300
def test_demo_runs_end_to_end_and_cleans_up(tmp_path: Path) -> None:
    before = _service_pids()
    summary_path = tmp_path / "s.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILSTREAM_")}
    env["TAILSTREAM_DATA_DIR"] = str(tmp_path / "var")
    env["TAILSTREAM_WEB_PORT"] = "0"
    # A fine-tune running when the 15 s are up extends the shop until it and its canary
    # are decided (at most a run's allowance + 30 s + 3 canary windows, and another
    # allowance once a run was rejected; a run's allowance is finetune_max for each
    # policy it trains: two with the default challenger) and the summary waits for it to
    # settle (at most an allowance + 120 s + 3 windows); the trainer pauses while the
    # worker is over its latency budget, so on a slow machine a run takes its whole
    # allowance. 30 s per policy bounds the demo at about 15 + 210 + 240 s plus the start
    # and the catalogue; the timeout leaves room above that.
    env["TAILSTREAM_FINETUNE_MAX_SECONDS"] = "30"
    done = subprocess.run(
        [sys.executable, "-m", "tailstream.cli", "demo", "--seconds", "15", "--rate", "300",
         "--users", "300", "--items", "2000", "--malformed-every", "200", "--no-ui",
         "--summary-json", str(summary_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    s = json.loads(summary_path.read_text())
    for key in ("events_produced", "events_consumed", "dlq", "malformed_injected",
                "recommendations_published", "users_with_recs_in_redis", "latency_ms_p50",
                "latency_ms_p99", "event_loop_stalls", "finetune_unhelpful_pauses"):
        assert key in s, key
    assert s["events_produced"] >= 3000
    assert s["events_consumed"] == s["events_produced"]
    assert s["malformed_injected"] > 0 and s["dlq"] == s["malformed_injected"]
    assert s["recommendations_published"] > 0
    # The shop opened on an indexed catalogue: every item record was sent first.
    assert s["catalogue_items_produced"] == 2000 and s["catalogue_indexed_s"] > 0
    assert s["users_with_recs_in_redis"] > 0
    assert 0 < s["latency_ms_p50"] <= s["latency_ms_p99"]
    stages = s["latency_stages_ms"]  # where the freshness went, from the worker's histogram
    assert set(stages) == {"read", "queue", "turn", "publish"} and stages["turn"] > 0
    # What the served lists did online, and the canaries (none may start in 15 s).
    online = s["online"]
    assert online["impressions"]["lists"] > 0
    assert online["impressions"]["items"] >= online["impressions"]["lists"]
    assert set(online["attributed"]["by_class"]) == {"click", "cart", "fav", "purchase"}
    assert set(online["impressions"]["by_tier"]) == {"head", "torso", "tail"}
    assert online["impressions"]["by_version"]
    assert {"started", "promoted", "rolled_back", "decisions"} <= set(s["canary"])
    assert s["canary"]["started"] >= s["canary"]["promoted"] + s["canary"]["rolled_back"]
    assert _service_pids() <= before, "the demo left processes behind"
