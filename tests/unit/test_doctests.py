"""Run the short examples in the docstrings of every module (and insist the pure ones
have some)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tailstream

MUST_HAVE_EXAMPLES = {
    "tailstream.configs",
    "tailstream.contract",
    "tailstream.evaluation.measures",
    "tailstream.evaluation.report",
    "tailstream.evaluation.results",
    "tailstream.kafka_io",
    "tailstream.models.imbalance.buffer",
    "tailstream.models.imbalance.online",
    "tailstream.models.imbalance.policies",
    "tailstream.models.imbalance.rolling",
    "tailstream.models.imbalance.sketch",
    "tailstream.models.imbalance.triggers",
    "tailstream.models.serving.baseline",
    "tailstream.models.serving.index",
    "tailstream.models.serving.popularity",
    "tailstream.models.serving.scorer",
    "tailstream.models.towers.adapters",
    "tailstream.models.towers.context",
    "tailstream.models.towers.loading",
    "tailstream.models.towers.store",
    "tailstream.models.towers.two_tower",
    "tailstream.models.training.finetune",
    "tailstream.models.training.gate",
    "tailstream.models.training.metrics",
    "tailstream.models.training.routine",
    "tailstream.models.training.sampling",
    "tailstream.models.training.selection",
    "tailstream.models.imbalance.decisions",
    "tailstream.models.serving.blend",
    "tailstream.models.serving.canary",
    "tailstream.models.serving.signals",
    "tailstream.redis_io",
    "tailstream.settings",
    "tailstream.stack.client",
    "tailstream.stack.demo",
    "tailstream.streams.stores.buffer_store",
    "tailstream.streams.stores.deduper",
    "tailstream.streams.stores.impressions",
    "tailstream.streams.trainer.process",
    "tailstream.streams.worker.state",
    "tailstream.streams.worker.stuck",
    "tailstream.streams.worker.timers",
}
# Modules whose import starts or needs something a unit test must not (none today).
SKIP: set[str] = set()

MODULES = sorted(
    name for _, name, is_pkg in pkgutil.walk_packages(tailstream.__path__, "tailstream.")
    if not is_pkg and name not in SKIP)


def test_the_list_of_modules_is_complete() -> None:
    assert MUST_HAVE_EXAMPLES <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    if name in MUST_HAVE_EXAMPLES:
        assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
