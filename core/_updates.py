"""Single updates: input validation, finiteness, norms, clipping, in-place update checks.

Part of :mod:`fedgate.core.aggregate` (import the public names from there). The
validators ``_vector``, ``_stack`` and ``_weights`` are shared by every rule of the
package; ``check_f32_update`` / ``check_q8_update`` read a received frame in place.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgate.core import _aggregate as _k
from fedgate.core import _fused as _f
from fedgate.core.errors import AggregationError

__all__ = [
    "check_f32_update",
    "check_q8_update",
    "clip_norm",
    "first_nonfinite",
    "is_finite",
    "l2_norm",
]

FloatArray = npt.NDArray[np.floating[Any]]
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_FLOATS = (_F32, _F64)


# --------------------------------------------------------------------------- checks


def _vector(vec: Any, name: str = "vec", dim: int | None = None) -> FloatArray:
    arr = np.asarray(vec)
    if arr.dtype not in _FLOATS:
        raise AggregationError(f"{name} must be float32 or float64, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise AggregationError(f"{name} must be 1-D, got shape {arr.shape}")
    if dim is not None and arr.shape[0] != dim:
        raise AggregationError(f"{name} has {arr.shape[0]} values, expected {dim}")
    if arr.shape[0] == 0:
        raise AggregationError(f"{name} is empty")
    return np.ascontiguousarray(arr)


def _stack(stack: Any, name: str = "stack", check_finite: bool = True) -> FloatArray:
    if isinstance(stack, np.ndarray):
        arr = stack
    elif isinstance(stack, Sequence) and len(stack) > 0:
        try:
            arr = np.stack([np.asarray(v) for v in stack])
        except ValueError as exc:
            raise AggregationError(f"{name}: updates have different shapes ({exc})") from exc
    else:
        arr = np.asarray(stack)
    if arr.dtype not in _FLOATS:
        raise AggregationError(f"{name} must be float32 or float64, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise AggregationError(f"{name} must be 2-D (n_updates, dim), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise AggregationError(f"{name} is empty (shape {arr.shape})")
    arr = np.ascontiguousarray(arr)
    if check_finite:
        for i in range(arr.shape[0]):
            j = _k.first_nonfinite(arr[i])
            if j >= 0:
                raise AggregationError(f"{name}: update {i} has a non-finite value {float(arr[i, j])!r} at index {j}")
    return arr


def _weights(weights: Any, n: int) -> npt.NDArray[np.float64]:
    if weights is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise AggregationError(f"weights must have shape ({n},), got {w.shape}")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise AggregationError(f"weights[{bad[0]}] = {float(w[bad[0]])!r}: weights must be finite and >= 0")
    if not w.sum() > 0:
        raise AggregationError("weights sum to zero")
    return np.ascontiguousarray(w)


def first_nonfinite(vec: FloatArray) -> int:
    """Index of the first NaN or Inf in a 1-D float array, or -1 if all are finite."""
    return int(_k.first_nonfinite(_vector(vec)))


def is_finite(vec: FloatArray) -> bool:
    """True when every value of the 1-D float32/float64 vector is finite."""
    return first_nonfinite(vec) < 0


def l2_norm(vec: FloatArray) -> float:
    """Euclidean norm of a 1-D float vector, accumulated in float64."""
    return float(np.sqrt(_k.sq_norm(_vector(vec))))


def clip_norm(vec: FloatArray, max_norm: float, *, inplace: bool = False) -> FloatArray:
    """Scale ``vec`` so its L2 norm is at most ``max_norm`` (DP-FedAvg "flat clip").

    Parameters
    ----------
    vec : (dim,) float32 or float64
    max_norm : float > 0
    inplace : bool
        False (default) returns a clipped copy and leaves ``vec`` alone; True scales
        ``vec`` itself (it must then be a writable C-contiguous array) and returns it.

    Returns
    -------
    (dim,) array of the input dtype; unchanged values if the norm is within bound.
    """
    if not (np.isfinite(max_norm) and max_norm > 0):
        raise AggregationError(f"max_norm = {max_norm!r}: must be finite and > 0")
    arr = _vector(vec)
    if inplace and (arr is not vec or not arr.flags.writeable):
        raise AggregationError("clip_norm(inplace=True) needs a writable C-contiguous ndarray")
    norm = float(np.sqrt(_k.sq_norm(arr)))
    if not np.isfinite(norm):
        raise AggregationError(f"vec has a non-finite norm ({norm!r})")
    out = arr if inplace else arr.copy()
    if norm > max_norm:
        _k.scale_inplace(out, max_norm / norm)
    return out


def _bytes_view(buf: Any, offset: int, nbytes: int, what: str) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError as exc:
        raise AggregationError(f"{what}: the buffer does not expose the buffer protocol") from exc
    if mv.format != "B" or mv.ndim != 1:
        try:
            mv = mv.cast("B")
        except (TypeError, ValueError) as exc:
            raise AggregationError(f"{what}: the buffer is not contiguous") from exc
    if offset < 0 or mv.nbytes - offset != nbytes:
        raise AggregationError(f"{what}: {mv.nbytes - offset} bytes after offset {offset}, expected {nbytes}")
    return mv


def _ref32(ref: Any) -> npt.NDArray[np.float32]:
    if not (isinstance(ref, np.ndarray) and ref.dtype == _F32 and ref.ndim == 1 and ref.flags.c_contiguous
            and ref.shape[0] > 0):
        raise AggregationError("ref must be a non-empty C-contiguous float32 1-D array")
    return ref


def _q8_view(buf: Any, offset: int, block: int, dim: int) -> memoryview:
    if not (isinstance(block, (int, np.integer)) and block >= 1):
        raise AggregationError(f"block = {block!r}: must be an int >= 1")
    return _bytes_view(buf, offset, 4 * -(-dim // block) + dim, "q8 update")


def check_f32_update(buf: Any, offset: int, ref: npt.NDArray[np.float32]) -> tuple[int, float]:
    """One pass over a float32 update stored in a byte buffer and a reference vector.

    Parameters
    ----------
    buf : bytes-like holding ``len(ref)`` little-endian float32 from ``offset`` to its end
        (any alignment; read in place, e.g. a received frame)
    offset : int
    ref : (dim,) float32, C-contiguous (the global model)

    Returns
    -------
    (first, sq) : index of the first NaN/Inf of the update (-1 if none; ``sq`` is then
        meaningless) and ``sum((x - ref)**2)`` of the float32 differences, in float64.
    """
    r = _ref32(ref)
    mv = _bytes_view(buf, offset, 4 * r.shape[0], "f32 update")
    bad, sq = _f.check_f32(mv, offset, r)
    return int(bad), float(sq)


def check_q8_update(buf: Any, offset: int, block: int, ref: npt.NDArray[np.float32]) -> tuple[int, int, float]:
    """One pass over a q8-coded update (scales, then codes) and a reference vector.

    Returns
    -------
    (status, index, sq) : status 0 all values finite; 1 the scale of block ``index`` is
        negative or not finite; 2 value ``index`` dequantises to an infinity. ``sq`` is
        ``sum((x - ref)**2)`` (float64 of float32 differences) when status is 0.
    """
    r = _ref32(ref)
    mv = _q8_view(buf, offset, block, r.shape[0])
    status, index, sq = _f.check_q8(mv, offset, block, r)
    return int(status), int(index), float(sq)
