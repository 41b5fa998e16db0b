"""glibc heap settings for a long-running agent on a small gateway.

The agent's memory peak comes from its training rounds: feature blocks of a few hundred
KiB, read and freed one after the other in the uplink's worker thread. With glibc's
defaults those frees leave RSS behind: each thread gets its own 64 MiB heap arena, and
the mmap threshold grows with every freed block until blocks come from the heap and
stay resident. :func:`tune` fixes the threshold and caps the arenas;
:func:`trim` returns free heap pages to the kernel after a task. Both are no-ops where
the C library is not glibc. The ``MALLOC_ARENA_MAX`` / ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` environment variables, when set, win over :func:`tune`
(the mechanism is :mod:`fedgate.core.heap`; this module holds the agent's values).
"""
from __future__ import annotations

from fedgate.core import heap
from fedgate.core.heap import trim

__all__ = ["tune", "trim", "keep_blocks"]

_kept = 0  # the largest block size keep_blocks has made room for


def tune(*, arena_max: int = 1, mmap_threshold_bytes: int = 64 * 1024,
         trim_threshold_bytes: int = 256 * 1024) -> bool:
    """Cap the heap arenas and fix the mmap/trim thresholds; True if applied.

    One arena is enough: the agent's threads (event loop, uplink thread and worker) rarely
    allocate at the same time. Blocks of at least ``mmap_threshold_bytes`` (the
    feature blocks of a training round) are mapped and unmapped on free.
    """
    return heap.apply({heap.M_ARENA_MAX: arena_max, heap.M_MMAP_THRESHOLD: mmap_threshold_bytes,
                       heap.M_TRIM_THRESHOLD: trim_threshold_bytes}) is not None


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
    want = min(heap.MMAP_THRESHOLD_MAX, int(nbytes) + 4096)
    if want <= _kept:
        return False
    ok = heap.apply({heap.M_MMAP_THRESHOLD: want, heap.M_TRIM_THRESHOLD: 4 * want})
    if ok is None:
        return False
    _kept = want
    return ok  # (a refused value is logged by fedgate.core.heap)
