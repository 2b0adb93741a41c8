"""``bench/decision_layer.py``: record the adaptive strategy's decision-layer inputs during
a tiny evaluation, then replay the layer under each way of combining the models."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tailstream.bench.decision_layer import log_pool, main, replay


def test_the_record_holds_each_block_and_replays_under_every_combination(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILSTREAM_TRIGGER_MIN_SAMPLES", "150")
    monkeypatch.setenv("TAILSTREAM_TRIGGER_COOLDOWN_S", "0")
    rec = tmp_path / "rec.pkl"
    code = main(["record", str(rec), "eval", "--tiny", "--events", "3000", "--users", "150",
                 "--items", "300", "--blocks", "3", "--steps", "3", "--batch", "64",
                 "--strategies", "adaptive", "--out", str(tmp_path / "eval")])
    assert code == 0
    calls = pickle.loads(rec.read_bytes())
    blocks = [c for c in calls if c[0] == "block"]
    assert len(blocks) == 2  # 3 blocks, the first is not scored
    assert {c[0] for c in calls} <= {"block", "refit"}
    for _, head, river, labels, prior in calls:
        assert head.shape == river.shape == (len(labels), 4)
        assert np.allclose(prior.sum(), 1.0)
    rows = sum(len(c[3]) for c in blocks)
    for combine in ("head", "stack", "head_raw", "river", "log_pool"):
        out = replay(calls, combine)
        assert out["rows"] == rows and 0.0 <= out["pr_auc_pooled"] <= 1.0, combine


def test_the_log_pool_is_the_normalised_geometric_mean() -> None:
    a = np.array([[0.8, 0.2]])
    b = np.array([[0.5, 0.5]])
    g = np.sqrt(a * b)
    assert np.allclose(log_pool([a, b]), g / g.sum())
