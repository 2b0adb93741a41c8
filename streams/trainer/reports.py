"""What one training request ended as: a :class:`RunReport`, appended to ``runs.jsonl``
in the model store (one JSON line per run, whatever its outcome)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunReport:
    outcome: str  # promoted | rejected | failed | skipped
    reason: str
    version: str | None = None
    parent: str | None = None
    cause: str | None = None
    seconds: float = 0.0
    steps: int = 0
    pairs_per_s: float = 0.0
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def record_run(store_root: Path, report: RunReport) -> None:
    """Append the report to ``{store_root}/runs.jsonl``."""
    store_root.mkdir(parents=True, exist_ok=True)
    with open(store_root / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(report.to_dict(), default=str) + "\n")
