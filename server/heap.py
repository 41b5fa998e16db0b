"""glibc heap settings for the server daemon: received updates reuse resident memory.

Every round the server receives N model-sized frames (libzmq allocates each in its I/O
thread) and frees them once checked; each round's task frames are allocated and freed
the same way. With glibc's defaults freed heap tops above 128 KiB are trimmed and the
mmap threshold moves with the sizes seen, so the next round's buffers fault their
pages in again (each 4 MiB frame costs about a thousand page faults). :func:`tune`
fixes both thresholds so those buffers come from the heap and stay resident between
rounds: the peak RSS is the same (it is reached within a round anyway), the page faults
are gone. A no-op where the C library is not glibc; the ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_ARENA_MAX`` environment variables, when set, win
(the mechanism is :mod:`fedgate.core.heap`; this module holds the server's values).
"""
from __future__ import annotations

from fedgate.core import heap

__all__ = ["tune"]


def tune(*, mmap_threshold_bytes: int = heap.MMAP_THRESHOLD_MAX, trim_threshold_bytes: int = 256 * 2**20,
         arena_max: int = 1) -> bool:
    """Serve blocks below ``mmap_threshold_bytes`` from the heap, keep up to
    ``trim_threshold_bytes`` of free heap resident, and use ``arena_max`` heap arenas
    (one: a frame the I/O thread receives reuses the memory the round loop freed, so the
    peak is that of the sum, not the sum of per-thread peaks); True if applied."""
    return bool(heap.apply({heap.M_MMAP_THRESHOLD: min(mmap_threshold_bytes, heap.MMAP_THRESHOLD_MAX),
                            heap.M_TRIM_THRESHOLD: trim_threshold_bytes, heap.M_ARENA_MAX: arena_max}))
