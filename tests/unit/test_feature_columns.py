"""A list's count features built from per-item and per-user columns are the training
samples' features, float for float (:func:`joined_vector` against
``feature_vector(interaction_features(...))``)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from tailstream.contract import CLASSES
from tailstream.models.imbalance.features import (
    FEATURE_NAMES,
    feature_vector,
    interaction_features,
    item_columns,
    joined_vector,
    user_columns,
)

counts = st.floats(min_value=-5.0, max_value=1e7, allow_nan=False, allow_infinity=False)
class_counts = st.dictionaries(st.sampled_from(CLASSES), counts, max_size=len(CLASSES))
# A user's decayed class counts are never negative (log1p of a total below −1 is no number).
user_counts = st.dictionaries(st.sampled_from(CLASSES),
                              st.floats(min_value=0.0, max_value=1e7), max_size=len(CLASSES))
# One (item, user, pair) of a list or a training sample: both tests draw the same inputs.
INPUTS = dict(item_count=counts, item_classes=class_counts, user_classes=user_counts,
              tier=st.sampled_from(["head", "torso", "tail"]),
              price=st.none() | st.floats(min_value=-1.0, max_value=1e6, allow_nan=False),
              affinity=st.floats(min_value=0.0, max_value=1.0), repeat=st.booleans())


@given(**INPUTS)
def test_joined_columns_are_the_samples_features(
        item_count: float, item_classes: dict[str, float], user_classes: dict[str, float],
        tier: str, price: float | None, affinity: float, repeat: bool) -> None:
    expected = feature_vector(interaction_features(
        item_count=item_count, item_class_counts=item_classes,
        user_class_counts=user_classes, tier=tier, category_affinity=affinity,
        repeat=repeat, price=price))
    got = joined_vector(item_columns(item_count, item_classes, tier, price),
                        user_columns(user_classes), affinity, repeat)
    assert got == expected and len(got) == len(FEATURE_NAMES)


@given(**INPUTS)
def test_the_features_are_the_formulas_written_out(
        item_count: float, item_classes: dict[str, float], user_classes: dict[str, float],
        tier: str, price: float | None, affinity: float, repeat: bool) -> None:
    """``interaction_features`` gives the floats of its formulas written out one by one,
    key for key in order (the columns are held to it above): it stays a flat dict build,
    not a join of the columns, because it runs for most events on the ingest path and
    the join costs 1.3 µs more a call."""
    k = len(CLASSES)
    total = sum(user_classes.values())
    want = {"log_item_count": math.log1p(max(item_count, 0.0)),
            "tier_head": float(tier == "head"), "tier_tail": float(tier == "tail"),
            "affinity": affinity, "repeat": float(repeat),
            "log_price": math.log1p(price) if price is not None and price > 0 else 0.0,
            "log_user_events": math.log1p(total)}
    for c in CLASSES[1:]:
        want[f"item_rate_{c}"] = (item_classes.get(c, 0.0) + 1) / (max(item_count, 0.0) + k)
        want[f"user_rate_{c}"] = (user_classes.get(c, 0.0) + 1) / (total + k)
    got = interaction_features(item_count=item_count, item_class_counts=item_classes,
                               user_class_counts=user_classes, tier=tier,
                               category_affinity=affinity, repeat=repeat, price=price)
    assert got == want and list(got) == list(want)


def test_a_user_or_an_item_changes_only_its_own_columns() -> None:
    item = item_columns(3.0, {"purchase": 1.0}, "head", 10.0)
    a = joined_vector(item, user_columns({"click": 1.0}), 0.0, False)
    b = joined_vector(item, user_columns({"click": 5.0, "purchase": 2.0}), 0.0, False)
    changed = {FEATURE_NAMES[k] for k in range(len(a)) if a[k] != b[k]}
    assert changed and all(n.startswith("user_") or n == "log_user_events" for n in changed)
