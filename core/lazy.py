"""Package exports that load on first use (PEP 562).

Each fedgate package lists its public names and the module defining each; importing
the package loads none of them, so ``import fedgate.core.errors`` stays free of
compiled modules and a daemon pays only for what it touches.

>>> ns = {}
>>> all_, getattr_, dir_ = lazy_exports("demo", {"sqrt": "math"}, ns)
>>> all_, getattr_("sqrt")(9.0), "sqrt" in ns
(['sqrt'], 3.0, True)
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, table: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for a package whose names ``table`` maps to modules.

    A name is imported from its module on first access and then cached in
    ``namespace`` (the package's ``globals()``).
    """
    exported = sorted(table)

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exported))

    return exported, __getattr__, __dir__
