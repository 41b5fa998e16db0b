"""The examples in the drivers' docstrings run."""
from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["decode", "config", "plan", "values", "acquisition", "serial_line"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = importlib.import_module(f"fedgate.drivers.{name}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
