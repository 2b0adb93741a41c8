"""`tailstream up` leaves no process behind: on Ctrl-C, on SIGTERM, and when killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAILSTREAM_")}
    env["TAILSTREAM_DATA_DIR"] = str(tmp_path)
    env["TAILSTREAM_WEB_PORT"] = "0"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tailstream.cli", "up"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    stack = tmp_path / "stack.json"
    deadline = time.monotonic() + 90
    while not stack.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"`tailstream up` did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pids = json.loads(stack.read_text())["pids"]
    assert {"tansu-broker", "redis-server", "worker-0"} <= set(pids)
    assert all(_alive(p) for p in pids.values())
    return proc, pids


def _wait_all_gone(pids: dict[str, int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids.values()):
            return
        time.sleep(0.2)
    left = {n: p for n, p in pids.items() if _alive(p)}
    for p in left.values():
        os.kill(p, signal.SIGKILL)
    pytest.fail(f"processes left behind: {left}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_stops_everything_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    proc, pids = _start_up(tmp_path)
    proc.send_signal(sig)
    assert proc.wait(30) == 0
    _wait_all_gone(pids)
    assert not (tmp_path / "stack.json").exists()


def test_children_die_when_up_is_killed(tmp_path: Path) -> None:
    proc, pids = _start_up(tmp_path)
    proc.kill()  # SIGKILL: no cleanup code runs; the kernel's parent-death signal must
    proc.wait(10)
    _wait_all_gone(pids)
