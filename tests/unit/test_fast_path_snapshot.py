"""The river fast path's parameters as arrays (models/imbalance/online.py
``FastPathSnapshot``): the same probabilities as river's own ``predict_proba_one``."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tailstream.models.imbalance.features import feature_vector, interaction_features
from tailstream.models.imbalance.online import OnlineOutcomeModel


@pytest.mark.parametrize("imbalance", ["weights", "oversample", "none"])
def test_a_snapshot_predicts_what_river_predicts(imbalance: str) -> None:
    model = OnlineOutcomeModel(imbalance=imbalance, seed=2)
    rng = random.Random(0)
    xs = []
    untrained = model.snapshot()
    for _ in range(2_000):
        x = interaction_features(
            item_count=rng.randint(0, 500),
            item_class_counts={"cart": rng.randint(0, 5), "purchase": rng.randint(0, 3)},
            user_class_counts={"click": rng.randint(0, 30), "fav": rng.randint(0, 2)},
            tier=rng.choice(["head", "torso", "tail"]), category_affinity=rng.random(),
            repeat=rng.random() < 0.2, price=rng.choice([None, rng.random() * 100]))
        label = rng.choices(["click", "cart", "fav", "purchase"], [90, 5, 3, 2])[0]
        model.predict_then_learn(x, label, weight=rng.random() * 3)
        xs.append(x)
    snap = model.snapshot()
    assert model.snapshot() is snap  # rebuilt only after learning
    rows = np.array([feature_vector(x) for x in xs[-300:]])
    river = np.array([[model.predict_proba(x)[c] for c in model.classes] for x in xs[-300:]])
    assert np.allclose(snap.proba(rows), river, atol=1e-12)
    assert river[:, 3].std() > 0.01  # the rows tell purchases apart: a real comparison
    assert np.allclose(untrained.proba(rows), 0.25)  # before learning: uniform, as river
