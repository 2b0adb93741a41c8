"""What one training request ended as: a :class:`RunReport`, appended to ``runs.jsonl``
in the model store (one JSON line per run, whatever its outcome); and the policy
selector's state, kept beside it in ``selection.json`` so a restarted trainer carries on
choosing where it stopped."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SELECTION_FILE = "selection.json"


@dataclass
class RunReport:
    outcome: str  # promoted | canary | rejected | failed | skipped
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
    policy: str | None = None
    """The policy the candidate trained with (with selection: the best one tried)."""
    selection: dict[str, Any] = field(default_factory=dict)
    """Policy selection: the objective, each policy tried with its held-out value, the
    best, what was promoted, and the selector's statistics (empty without selection)."""
    decisions_refreshed: str | None = None
    """A rejected run: the served version whose decision thresholds it refitted on its
    held-out window (None: none refitted)."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def record_run(store_root: Path, report: RunReport) -> None:
    """Append the report to ``{store_root}/runs.jsonl``."""
    store_root.mkdir(parents=True, exist_ok=True)
    with open(store_root / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(report.to_dict(), default=str) + "\n")


def load_selection(store_root: Path) -> dict[str, Any] | None:
    """The selector state saved by :func:`save_selection` (None: none yet, or unreadable —
    said in the log; selection then starts afresh).

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> load_selection(root) is None
    True
    >>> save_selection(root, {"triggers": 3}); load_selection(root)
    {'triggers': 3}
    """
    path = store_root / SELECTION_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the policy selector's state in %s (%s): selection starts afresh",
                    path, exc)
        return None
    return state if isinstance(state, dict) else None


def save_selection(store_root: Path, state: dict[str, Any]) -> None:
    """Write the selector state atomically (temp file + rename)."""
    store_root.mkdir(parents=True, exist_ok=True)
    tmp = store_root / f".{SELECTION_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, store_root / SELECTION_FILE)
