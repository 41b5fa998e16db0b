"""Weighted means of updates: streamed one by one (also q8-coded, in place) or stacked.

Part of :mod:`fedgate.core.aggregate` (import the public names from there).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgate.core import _aggregate as _k
from fedgate.core import _fused as _f
from fedgate.core._updates import _F32, _F64, _FLOATS, FloatArray, _q8_view, _stack, _vector, _weights
from fedgate.core.errors import AggregationError

__all__ = ["StreamingMean", "weighted_mean"]


# -------------------------------------------------------------------------- means


class StreamingMean:
    """Weighted mean of updates that arrive one by one, in O(dim) memory.

    The sum is accumulated in float64 whatever the number of updates; float32
    input is read directly (no temporary copy).

    Parameters
    ----------
    dim : int
        Length of every update.

    >>> import numpy as np
    >>> m = StreamingMean(2)
    >>> m.add(np.array([1.0, 1.0], dtype=np.float32), weight=10)
    >>> m.add(np.array([4.0, 0.0], dtype=np.float32), weight=5)
    >>> m.count, m.total_weight, m.result().tolist()
    (2, 15.0, [2.0, 0.6666666865348816])
    """

    __slots__ = ("_acc", "_count", "_dim", "_shape", "_total")

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
            raise AggregationError(f"dim = {dim!r}: must be a positive int")
        self._dim = int(dim)
        self._shape = (self._dim,)
        self._acc = np.zeros(self._dim, dtype=np.float64)
        self._count = 0
        self._total = 0.0

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def count(self) -> int:
        """Number of updates added."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total

    def add(self, vec: FloatArray, weight: float = 1.0, *, check_finite: bool = True) -> None:
        """Fold one update in.

        Parameters
        ----------
        vec : (dim,) float32 or float64
        weight : float > 0, e.g. the client's number of training examples.
        check_finite : bool
            Refuse NaN/Inf (default). Pass False only if the caller checked already.
        """
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise AggregationError(f"weight = {weight!r}: must be finite and > 0")
        if (
            type(vec) is np.ndarray
            and vec.shape == self._shape
            and (vec.dtype is _F32 or vec.dtype is _F64)
            and vec.strides[0] == vec.itemsize
        ):
            arr = vec  # the common case, checked cheaply: this runs once per client update
        else:
            arr = _vector(vec, "update", self._dim)
        if check_finite:
            j = _k.first_nonfinite(arr)
            if j >= 0:
                raise AggregationError(f"update has a non-finite value {float(arr[j])!r} at index {j}")
        _k.accumulate(self._acc, arr, w)
        self._count += 1
        self._total += w

    def add_q8(self, buf: Any, offset: int, block: int, weight: float = 1.0) -> None:
        """Fold in one q8-coded update read in place (no decoded copy), as ``add`` of its values.

        Parameters
        ----------
        buf : bytes-like, holding at ``offset`` the q8 scales and codes of ``dim`` values
            (the layout of :mod:`fedgate.core.codec`); check it with :func:`check_q8_update`
            first (scales finite and >= 0, values finite).
        offset, block : int, where the scales start and the values per scale.
        weight : float > 0
        """
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise AggregationError(f"weight = {weight!r}: must be finite and > 0")
        mv = _q8_view(buf, offset, block, self._dim)
        _f.accumulate_q8(self._acc, mv, offset, block, w)
        self._count += 1
        self._total += w

    def add_stack(self, stack: FloatArray, weights: Any = None, *, check_finite: bool = True) -> None:
        """Fold several updates in at once, ``(n, dim)``; cache-blocked, same result as n ``add`` calls."""
        arr = _stack(stack, check_finite=check_finite)
        if arr.shape[1] != self._dim:
            raise AggregationError(f"stack has dim {arr.shape[1]}, expected {self._dim}")
        w = _weights(weights, arr.shape[0])
        if np.any(w <= 0):
            raise AggregationError("weights must be > 0")
        _k.accumulate_stack(self._acc, arr, w)
        self._count += arr.shape[0]
        self._total += float(w.sum())

    def merge(self, other: StreamingMean) -> None:
        """Absorb another accumulator of the same dim (relay tiers, sharded servers)."""
        if not isinstance(other, StreamingMean) or other.dim != self._dim:
            raise AggregationError(f"cannot merge {other!r} into StreamingMean({self._dim})")
        self._acc += other._acc
        self._count += other._count
        self._total += other._total

    def reset(self) -> None:
        self._acc.fill(0.0)
        self._count = 0
        self._total = 0.0

    def result(self, dtype: npt.DTypeLike = np.float32) -> FloatArray:
        """The weighted mean, ``(dim,)`` of ``dtype`` (float32 by default)."""
        if self._count == 0:
            raise AggregationError("no update was added")
        out = np.empty(self._dim, dtype=dtype)
        if out.dtype not in _FLOATS:
            raise AggregationError(f"dtype must be float32 or float64, got {out.dtype}")
        _k.scale_into(out, self._acc, 1.0 / self._total)
        return out

    def __repr__(self) -> str:
        return f"StreamingMean(dim={self._dim}, count={self._count}, total_weight={self._total})"


def weighted_mean(stack: FloatArray, weights: Any = None) -> FloatArray:
    """Weighted mean of the rows of ``stack``.

    Parameters
    ----------
    stack : (n, dim) float32 or float64 (or a sequence of equal 1-D arrays)
    weights : (n,) non-negative, not all zero; None for equal weights.

    Returns
    -------
    (dim,) array of the stack's dtype, accumulated in float64.
    """
    arr = _stack(stack, check_finite=False)
    w = _weights(weights, arr.shape[0])
    acc = np.zeros(arr.shape[1], dtype=np.float64)
    if _k.accumulate_stack(acc, arr, w, True):  # finiteness tested block by block
        _stack(arr)  # raises, naming the update and index
    out = np.empty(arr.shape[1], dtype=arr.dtype)
    _k.scale_into(out, acc, 1.0 / float(w.sum()))
    return out
