"""Run the short examples in the docstrings of every module (and insist the pure ones
have some)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tailstream

MUST_HAVE_EXAMPLES = {
    "tailstream.contract", "tailstream.settings", "tailstream.demo",
    "tailstream.models.popularity", "tailstream.models.baseline", "tailstream.models.weights",
    "tailstream.models.sketch", "tailstream.models.rolling", "tailstream.models.buffer",
    "tailstream.models.sampling", "tailstream.models.online", "tailstream.models.triggers",
    "tailstream.models.evaluation", "tailstream.models.gate", "tailstream.models.finetune",
    "tailstream.models.index", "tailstream.models.scorer", "tailstream.models.adapters",
    "tailstream.models.store", "tailstream.models.two_tower", "tailstream.models.loading",
    "tailstream.streams.state", "tailstream.streams.dedupe", "tailstream.streams.stuck",
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
