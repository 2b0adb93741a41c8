"""The streaming count features of an interaction: what the river fast path learns from and
what the outcome head's *wide* part reads.

All are known before the event: the item's count and class counts from the count-min
sketches, the user's decayed class counts and category affinity from the profile, whether
the user touched the item before, its tier and price. Rates are add-one smoothed.

The head gets them as a fixed-order vector (:data:`FEATURE_NAMES`, :func:`feature_vector`)
with the log-scaled counts divided by :data:`LOG_SCALE`, so every input lies in about
``[0, 1]`` and the wide weights start on one footing (the head trains for tens of steps,
too few for Adam to even out inputs ten times apart).

Torch- and river-free: the worker, the trainer and the evaluation share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tailstream.contract import CLASSES, RARE_CLASSES

Features = dict[str, float]

FEATURE_NAMES: tuple[str, ...] = (
    "log_item_count", "tier_head", "tier_tail", "affinity", "repeat", "log_price",
    "log_user_events",
    *(f"{side}_rate_{c}" for c in RARE_CLASSES for side in ("item", "user")),
)
"""The order of :func:`feature_vector` (the wide part's input columns)."""

LOG_SCALE = 10.0
"""Divisor of the ``log_*`` features in :func:`feature_vector` (log1p of 22,000 is 10)."""


def interaction_features(*, item_count: float, item_class_counts: Mapping[str, float],
                         user_class_counts: Mapping[str, float], tier: str,
                         category_affinity: float, repeat: bool,
                         price: float | None) -> Features:
    """Features of a (user, item) interaction, all known before the event happens.

    Rates are add-one smoothed: ``(n_c + 1) / (n + K)``.

    >>> f = interaction_features(item_count=9, item_class_counts={"purchase": 2},
    ...     user_class_counts={}, tier="head", category_affinity=1.0, repeat=False, price=None)
    >>> round(f["item_rate_purchase"], 3), f["tier_head"]
    (0.231, 1.0)
    """
    k = len(CLASSES)
    x: Features = {
        "log_item_count": math.log1p(max(item_count, 0.0)),
        "tier_head": float(tier == "head"),
        "tier_tail": float(tier == "tail"),
        "affinity": category_affinity,
        "repeat": float(repeat),
        "log_price": math.log1p(price) if price is not None and price > 0 else 0.0,
    }
    user_total = sum(user_class_counts.values())
    x["log_user_events"] = math.log1p(user_total)
    items, users = max(item_count, 0.0) + k, user_total + k
    for c, item_key, user_key in _RATE_KEYS:
        x[item_key] = (item_class_counts.get(c, 0.0) + 1) / items
        x[user_key] = (user_class_counts.get(c, 0.0) + 1) / users
    return x


# The rate features' names, made once (an f-string per class per sample was a third of
# this function on the worker's path).
_RATE_KEYS = tuple((c, f"item_rate_{c}", f"user_rate_{c}") for c in RARE_CLASSES)


def feature_vector(x: Mapping[str, float]) -> tuple[float, ...]:
    """``x`` in :data:`FEATURE_NAMES` order, ``log_*`` entries divided by
    :data:`LOG_SCALE`; a missing feature is 0.

    >>> v = feature_vector({"log_item_count": 5.0, "repeat": 1.0})
    >>> len(v) == len(FEATURE_NAMES), v[0], v[FEATURE_NAMES.index("repeat")]
    (True, 0.5, 1.0)
    """
    return tuple([float(x.get(n, 0.0)) / scale for n, scale in _SCALES])


_SCALES = tuple((n, LOG_SCALE if n.startswith("log_") else 1.0) for n in FEATURE_NAMES)


ItemColumns = tuple[float, ...]
"""An item's part of a :func:`feature_vector` row (:func:`item_columns`)."""
UserColumns = tuple[float, ...]
"""A user's part of a :func:`feature_vector` row (:func:`user_columns`)."""


def item_columns(item_count: float, item_class_counts: Mapping[str, float], tier: str,
                 price: float | None) -> ItemColumns:
    """The item's columns of :func:`feature_vector` (count, tier, price and the item's
    rates), computed as :func:`interaction_features` does and scaled as
    :func:`feature_vector` does — once per item when a turn's lists show it to many
    users (:func:`joined_vector` adds the user's and the pair's). The dict stays for
    river, which reads features by name; a property test holds the two to the same
    floats (``tests/unit/test_feature_columns.py``).

    >>> [round(v, 4) for v in item_columns(9.0, {"purchase": 2.0}, "head", None)[:3]]
    [0.2303, 1.0, 0.0]
    """
    items = max(item_count, 0.0) + len(CLASSES)
    return (math.log1p(max(item_count, 0.0)) / LOG_SCALE, float(tier == "head"),
            float(tier == "tail"),
            (math.log1p(price) if price is not None and price > 0 else 0.0) / LOG_SCALE,
            *[(item_class_counts.get(c, 0.0) + 1) / items for c in RARE_CLASSES])


def user_columns(user_class_counts: Mapping[str, float]) -> UserColumns:
    """The user's columns of :func:`feature_vector` (event count and the user's rates),
    as :func:`interaction_features` computes them — once per user of a turn.

    >>> user_columns({})[0], len(user_columns({})) == 1 + len(RARE_CLASSES)
    (0.0, True)
    """
    user_total = sum(user_class_counts.values())
    users = user_total + len(CLASSES)
    return (math.log1p(user_total) / LOG_SCALE,
            *[(user_class_counts.get(c, 0.0) + 1) / users for c in RARE_CLASSES])


def joined_vector(item: ItemColumns, user: UserColumns, affinity: float, repeat: bool
                  ) -> tuple[float, ...]:
    """``feature_vector(interaction_features(...))`` from the item's and the user's
    columns and the pair's affinity and repeat flag: the same floats, in
    :data:`FEATURE_NAMES` order, without a dict per pair.

    >>> kw = dict(item_count=9.0, item_class_counts={"purchase": 2.0}, tier="tail",
    ...           price=12.5, user_class_counts={"click": 4.0, "cart": 1.0})
    >>> joined = joined_vector(item_columns(9.0, {"purchase": 2.0}, "tail", 12.5),
    ...                        user_columns({"click": 4.0, "cart": 1.0}), 0.5, True)
    >>> joined == feature_vector(interaction_features(category_affinity=0.5, repeat=True,
    ...                                               **kw))
    True
    """
    row = [item[0], item[1], item[2], float(affinity), float(repeat), item[3], user[0]]
    for item_rate, user_rate in zip(item[4:], user[1:], strict=True):
        row += (item_rate, user_rate)
    return tuple(row)
