"""glibc heap settings, shared by both daemons (standard library only: ctypes).

:func:`apply` sets ``mallopt`` parameters unless the environment variable glibc reads
for the same parameter (``MALLOC_MMAP_THRESHOLD_`` ...) is set, which then wins;
:func:`trim` hands free heap pages back. Both are no-ops where the C library is not
glibc. The daemons choose the values: ``fedgate.agent.malloc`` (small resident set)
and ``fedgate.server.heap`` (no page faults per round).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

__all__ = ["M_TRIM_THRESHOLD", "M_MMAP_THRESHOLD", "M_ARENA_MAX", "MMAP_THRESHOLD_MAX", "ENV", "apply", "trim"]

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
#: the environment variable that sets each parameter at process start (and wins over apply)
ENV = {M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
       M_ARENA_MAX: "MALLOC_ARENA_MAX"}

_libc: Any = None
log = logging.getLogger(__name__)


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            glibc = all(hasattr(lib, f) for f in ("mallopt", "malloc_trim", "gnu_get_libc_version"))
            _libc = lib if glibc else False
        except OSError:
            _libc = False
    return _libc or None


def apply(settings: dict[int, int]) -> bool | None:
    """``mallopt`` each (parameter, value) not set by the environment.

    Returns None without glibc, else True when glibc took every value it was given.
    """
    libc = _glibc()
    if libc is None:
        return None
    ok = True
    for param, value in settings.items():
        if ENV[param] not in os.environ and not libc.mallopt(param, int(value)):
            log.debug("mallopt(%d, %d) refused", param, value)
            ok = False
    return ok


def trim() -> None:
    """Give free heap memory back to the kernel."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
