"""Stopping a child never fails the caller's shutdown (stack/embedded.py)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from tailstream.stack import embedded
from tailstream.stack.embedded import ManagedProcess


class StarvedChild:
    """A child that ignores SIGTERM and, once killed, is not scheduled to exit in time (an
    idle-priority trainer on cores held by other work: what failed the demo)."""

    pid = 4242
    returncode = None
    stdin = None

    def __init__(self) -> None:
        self.signals: list[str] = []

    def poll(self) -> None:
        return None

    def send_signal(self, sig: int) -> None:
        self.signals.append("TERM")

    def kill(self) -> None:
        self.signals.append("KILL")

    def wait(self, timeout: float | None = None) -> int:
        raise subprocess.TimeoutExpired("trainer", timeout or 0.0)


def test_a_child_that_exits_late_after_sigkill_does_not_fail_the_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(embedded, "KILL_WAIT_S", 0.01)
    child = StarvedChild()
    mp = ManagedProcess.__new__(ManagedProcess)
    mp.name, mp.proc = "trainer", child  # type: ignore[assignment]
    mp._log = open(tmp_path / "trainer.log", "ab")  # noqa: SIM115 - closed by stop()
    with caplog.at_level(logging.WARNING):
        assert mp.stop(timeout=0.01) is None
    assert child.signals == ["TERM", "KILL"]
    assert "killed but not exited" in caplog.text
    assert mp._log.closed
