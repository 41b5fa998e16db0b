"""Robust combiners: coordinate-wise median and trimmed mean, Krum and Bulyan.

Part of :mod:`fedgate.core.aggregate` (import the public names from there; its
docstring says how the coordinate-wise rules and Krum's distances compute).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgate.core import _aggregate as _k
from fedgate.core import _order as _o
from fedgate.core._means import weighted_mean
from fedgate.core._updates import FloatArray, _stack
from fedgate.core.errors import AggregationError

__all__ = ["bulyan", "krum", "median", "trimmed_mean"]

# Above this many updates, coordinate-wise rules switch from a sorting network (cost
# ~ n log^2 n per coordinate, fully vectorised) to counting passes (~ n per pass).
_NETWORK_MAX_N = {0: 256, 1: 512}  # by mode: 0 median, 1 trimmed mean (measured crossovers)


# ------------------------------------------------------- coordinate-wise robust rules


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort comparators for n inputs (min goes to the lower index)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@lru_cache(maxsize=64)
def _network(n: int, lo: int, hi: int, as_set: bool) -> npt.NDArray[np.int32]:
    """Comparators of a sorting network pruned to what positions lo..hi need.

    ``as_set``: only the sum of positions lo..hi matters (trimmed mean), so
    comparators that merely permute values inside that range are dropped.
    """
    summed = set(range(lo, hi + 1)) if as_set else set()
    single = set() if as_set else {lo, hi}
    kept = []
    for i, j in reversed(_batcher_pairs(n)):
        if i in single or j in single or ((i in summed) != (j in summed)):
            kept.append((i, j))
            single |= {i, j}
            summed -= {i, j}
        elif i in summed and j in summed:
            continue
    kept.reverse()
    return np.array(kept, dtype=np.int32).reshape(-1, 2)


def _order_reduce(arr: FloatArray, mode: int, lo: int, hi: int) -> FloatArray:
    """Coordinate-wise order statistics of a stack checked for everything but finiteness.

    The kernels test each tile they copy for NaN/Inf (no separate pass over the
    stack); if one is found, the full check runs to name the offending value.
    """
    n, d = arr.shape
    out = np.empty(d, dtype=arr.dtype)
    if n == 1:
        bad = _k.first_nonfinite(arr[0]) >= 0
        out[:] = arr[0]
    elif n <= _NETWORK_MAX_N[mode]:
        bad = _o.network_reduce(arr, _network(n, lo, hi, mode == 1), mode, lo, hi, out)
    else:
        ns = min(128, 1 << (n.bit_length() - 1))  # sampled rows that pick the first pivots
        bad = _o.count_select_reduce(arr, _network(ns, 0, ns - 1, False), mode, lo, hi, out)
    if bad:
        _stack(arr)  # raises, naming the update and index
        raise AggregationError("stack has a non-finite value")  # pragma: no cover
    return out


def median(stack: FloatArray) -> FloatArray:
    """Coordinate-wise median of the rows (mean of the two middle values for even n).

    Parameters
    ----------
    stack : (n, dim) float32 or float64, finite

    Returns
    -------
    (dim,) array of the stack's dtype.
    """
    arr = _stack(stack, check_finite=False)
    n = arr.shape[0]
    return _order_reduce(arr, 0, (n - 1) // 2, n // 2)


def trimmed_mean(stack: FloatArray, beta: float) -> FloatArray:
    """Coordinate-wise trimmed mean: drop ``floor(beta * n)`` values at each end.

    Parameters
    ----------
    stack : (n, dim) float32 or float64, finite
    beta : float in [0, 0.5), the fraction cut from EACH tail (scipy's
        ``trim_mean(proportiontocut=beta)``).

    Returns
    -------
    (dim,) array of the stack's dtype; the mean is accumulated in float64.
    """
    if not (isinstance(beta, (int, float, np.floating)) and 0 <= beta < 0.5):
        raise AggregationError(f"beta = {beta!r}: must be in [0, 0.5)")
    arr = _stack(stack, check_finite=False)
    n = arr.shape[0]
    t = int(beta * n)
    if n - 2 * t < 1:
        raise AggregationError(f"beta = {beta!r} trims all {n} updates")
    return _order_reduce(arr, 1, t, n - t - 1)


# ------------------------------------------------------------------ Krum and Bulyan


def _pairwise_sq_dists(arr: FloatArray) -> npt.NDArray[np.float64]:
    """(n, n) squared Euclidean distances, Gram form in float64 over column chunks."""
    n, d = arr.shape
    chunk = max(256, (1 << 22) // (8 * n))
    gram = np.zeros((n, n), dtype=np.float64)
    for c0 in range(0, d, chunk):
        blk = arr[:, c0 : c0 + chunk].astype(np.float64)
        blk -= blk.mean(axis=0)  # translation-invariant; keeps the Gram form accurate
        gram += blk @ blk.T
    sq = np.diag(gram).copy()
    dist = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def _krum_scores(dist: npt.NDArray[np.float64], f: int) -> npt.NDArray[np.float64]:
    n = dist.shape[0]
    k = n - f - 2
    # smallest k distances to others (the zero self-distance sorts first: skip it)
    part = np.partition(dist, k, axis=1)[:, : k + 1]
    return part.sum(axis=1)


def _check_f(n: int, f: Any, need: int, rule: str) -> int:
    if not isinstance(f, (int, np.integer)) or isinstance(f, bool) or f < 0:
        raise AggregationError(f"f = {f!r}: must be an int >= 0")
    if n < need:
        raise AggregationError(f"{rule} with f = {f} needs at least {need} updates, got {n}")
    return int(f)


def krum(stack: FloatArray, f: int, m: int = 1) -> tuple[FloatArray, npt.NDArray[np.intp]]:
    """Krum (m = 1) or Multi-Krum (m > 1) of Blanchard et al. (2017).

    Each update is scored by the sum of squared distances to its ``n - f - 2``
    nearest neighbours; the ``m`` lowest scores are averaged.

    Parameters
    ----------
    stack : (n, dim) float32 or float64, finite, with n >= 2 f + 3
    f : int, number of Byzantine updates tolerated
    m : int in [1, n - f], how many best-scored updates to average

    Returns
    -------
    aggregate : (dim,) array of the stack's dtype
    selected : (m,) int indices of the chosen rows, best score first
    """
    arr = _stack(stack)
    n = arr.shape[0]
    f = _check_f(n, f, 2 * int(f) + 3 if isinstance(f, (int, np.integer)) else 0, "krum")
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or not 1 <= m <= n - f:
        raise AggregationError(f"m = {m!r}: must be an int in [1, {n - f}]")
    scores = _krum_scores(_pairwise_sq_dists(arr), f)
    selected = np.argsort(scores, kind="stable")[:m]
    if m == 1:
        return arr[selected[0]].copy(), selected
    return weighted_mean(arr[np.sort(selected)]), selected


def bulyan(stack: FloatArray, f: int) -> tuple[FloatArray, npt.NDArray[np.intp]]:
    """Bulyan (El Mhamdi et al., 2018) over Krum, with a symmetric trimmed mean.

    Selects ``theta = n - 2f`` updates by repeated Krum, then takes the
    coordinate-wise mean of the ``theta - 2f`` central values (``f`` trimmed per tail).

    Parameters
    ----------
    stack : (n, dim) float32 or float64, finite, n >= 4 f + 3
    f : int

    Returns
    -------
    aggregate : (dim,) array of the stack's dtype
    selected : (theta,) int indices in selection order
    """
    arr = _stack(stack)
    n = arr.shape[0]
    f = _check_f(n, f, 4 * int(f) + 3 if isinstance(f, (int, np.integer)) else 0, "bulyan")
    dist = _pairwise_sq_dists(arr)
    remaining = list(range(n))
    selected: list[int] = []
    while len(selected) < n - 2 * f:
        sub = dist[np.ix_(remaining, remaining)]
        k = max(len(remaining) - f - 2, 1)
        if k >= len(remaining):
            best = 0
        else:
            best = int(np.argsort(np.partition(sub, k, axis=1)[:, : k + 1].sum(axis=1), kind="stable")[0])
        selected.append(remaining.pop(best))
    chosen = np.ascontiguousarray(arr[selected])
    theta = chosen.shape[0]
    return _order_reduce(chosen, 1, f, theta - f - 1), np.array(selected, dtype=np.intp)
