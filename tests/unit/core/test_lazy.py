from __future__ import annotations

import doctest

import pytest

import fedgate.core.lazy as lazy


def test_docstring_example():
    assert doctest.testmod(lazy).failed == 0


def test_unknown_name_is_an_attribute_error_naming_the_package():
    _, getattr_, _ = lazy.lazy_exports("fedgate.demo", {}, {})
    with pytest.raises(AttributeError, match="'fedgate.demo' has no attribute 'nope'"):
        getattr_("nope")
