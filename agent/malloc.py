"""glibc heap settings for a long-running agent on a small gateway.

The agent's memory peak comes from its training rounds: feature blocks of a few hundred
KiB, read and freed one after the other in the uplink's worker thread. With glibc's
defaults those frees leave RSS behind: each thread gets its own 64 MiB heap arena, and
the mmap threshold grows with every freed block until blocks come from the heap and
stay resident. :func:`tune` fixes the threshold and caps the arenas;
:func:`trim` returns free heap pages to the kernel after a task. Both are no-ops where
the C library is not glibc. The ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` environment variables, when set, win over :func:`tune`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

__all__ = ["tune", "trim", "keep_blocks"]

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_libc: Any = None
_kept = 0  # the largest block size keep_blocks has made room for
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def _glibc() -> Any:
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def tune(*, arena_max: int = 1, mmap_threshold_bytes: int = 64 * 1024,
         trim_threshold_bytes: int = 256 * 1024) -> bool:
    """Cap the heap arenas and fix the mmap/trim thresholds; True if applied.

    One arena is enough: the agent's threads (event loop, uplink thread and worker) rarely
    allocate at the same time. Blocks of at least ``mmap_threshold_bytes`` (the
    feature blocks of a training round) are mapped and unmapped on free.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, arena_max, "MALLOC_ARENA_MAX"),
                (_M_MMAP_THRESHOLD, mmap_threshold_bytes, "MALLOC_MMAP_THRESHOLD_"),
                (_M_TRIM_THRESHOLD, trim_threshold_bytes, "MALLOC_TRIM_THRESHOLD_"))
    for param, value, env in settings:
        if env not in os.environ and not libc.mallopt(param, int(value)):
            log.debug("mallopt(%d, %d) refused", param, value)
    return True


def trim() -> None:
    """Give free heap memory back to the kernel (after a training task)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_blocks(nbytes: int) -> bool:
    """Serve blocks of up to ``nbytes`` from the heap and keep them there; True if changed.

    A federated round of a large model allocates and frees a few model-sized buffers
    (the received global model, its decoded vector, the encoded result). Mapped afresh
    each round they cost one page fault per 4 KiB (about 1 ms per 4 MB, every buffer,
    every round); kept in the heap they are reused. The peak memory of a round does not
    change, only what stays resident between rounds; :func:`trim` still hands free heap
    pages back after training. Called by the uplink with the model's size; only ever
    raises the thresholds, never lowers them.
    """
    global _kept
    libc = _glibc()
    want = min(_MMAP_THRESHOLD_MAX, int(nbytes) + 4096)
    if libc is None or want <= _kept:
        return False
    _kept = want
    ok = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, want)) and ok
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, 4 * want)) and ok
    if not ok:
        log.debug("mallopt refused the thresholds for %d-byte blocks", want)
    return ok
