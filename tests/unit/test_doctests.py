"""Run the short examples in the docstrings of the pure modules."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "tailstream.contract",
    "tailstream.settings",
    "tailstream.demo",
    "tailstream.models.popularity",
    "tailstream.models.baseline",
    "tailstream.models.weights",
    "tailstream.models.sketch",
    "tailstream.models.rolling",
    "tailstream.models.buffer",
    "tailstream.models.sampling",
    "tailstream.models.online",
    "tailstream.models.triggers",
    "tailstream.streams.pipeline",
    "tailstream.streams.dedupe",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
