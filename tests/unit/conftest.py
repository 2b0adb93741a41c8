"""Unit-test fixtures: a tiny random BERT (real tokenizer) and shop-like training samples."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tailstream.models.imbalance.buffer import Sample
from tailstream.models.towers.encoder import write_tiny_encoder

CATEGORIES = ("kettle", "mug", "lamp", "earbuds", "sneakers", "jeans")
STYLES = ("deluxe", "eco", "retro", "basic")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with all-MiniLM-L6-v2's tokenizer."""
    return write_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


def make_samples(n: int = 2000, seed: int = 0, items_per_category: int = 30) -> list[Sample]:
    """Interactions with a learnable signal: "deluxe" items are bought and "eco" items
    carted more often, and each user keeps to one category and mostly one style, so both
    the outcome head and retrieval have something to learn."""
    rng = random.Random(seed)
    items = {f"i{c}{k}": (c, STYLES[k % len(STYLES)],
                          f"{STYLES[k % len(STYLES)]} {c} {k} | home/{c}")
             for c in CATEGORIES for k in range(items_per_category)}
    by_cat: dict[str, list[str]] = {}
    by_style: dict[tuple[str, str], list[str]] = {}
    for item_id, (cat, style, _) in items.items():
        by_cat.setdefault(cat, []).append(item_id)
        by_style.setdefault((cat, style), []).append(item_id)
    history: dict[str, list[str]] = {}
    out = []
    for i in range(n):
        u = i % 60
        user = f"u{u}"
        cat = CATEGORIES[u % len(CATEGORIES)]
        style = STYLES[(u // len(CATEGORIES)) % len(STYLES)]
        pool = by_style[(cat, style)] if rng.random() < 0.8 else by_cat[cat]
        item = rng.choice(pool)
        text = items[item][2]
        r = rng.random()
        if text.startswith("deluxe") and r < 0.35:
            label = "purchase"
        elif text.startswith("eco") and r < 0.35:
            label = "cart"
        elif r < 0.03:
            label = "fav"
        else:
            label = "click"
        past = history.setdefault(user, [])
        ctx = " ; ".join(items[x][2] for x in past[:3])
        past.insert(0, item)
        out.append(Sample(f"e{seed}-{i}", user, item, label, 1.7e9 + i, user_text=ctx,
                          item_text=text))
    return out


@pytest.fixture
def shop_samples() -> Callable[..., list[Sample]]:
    return make_samples
