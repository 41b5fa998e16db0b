"""Aggregation of model updates: means, robust rules, clipping, feature statistics.

Every function here validates its input and raises :class:`AggregationError`
naming the offending value, then hands the arithmetic to the compiled kernels in
``fedgate.core._aggregate`` (``nogil`` loops). Updates are flat parameter vectors
(1-D, float32 or float64); a *stack* is a C-contiguous ``(n_updates, dim)`` array.
Aggregates keep the dtype of their input.

How the coordinate-wise rules compute (all exact, no sorting of whole columns):

* up to a few hundred updates, a Batcher sorting network pruned to the outputs
  the rule needs runs on column tiles, every comparator a vectorised min/max
  over the tile's columns;
* beyond, counting passes over column tiles: per coordinate an interval known
  to hold the wanted order statistic shrinks with each pass (pivots from a
  sorted sample, then interpolation, then exact neighbouring data values), so
  the cost is a handful of vectorised passes whatever the values are.

Krum's distances use the Gram form in float64 over column chunks, centred per
chunk so nearly equal updates far from zero keep their distances.

>>> import numpy as np
>>> acc = StreamingMean(3)
>>> acc.add(np.array([1.0, 2.0, 3.0], dtype=np.float32), weight=1.0)
>>> acc.add(np.array([3.0, 2.0, 1.0], dtype=np.float32), weight=3.0)
>>> acc.result().tolist()
[2.5, 2.0, 1.5]
>>> median(np.array([[0, 1], [5, 2], [1, 100]], dtype=np.float32)).tolist()
[1.0, 2.0]
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgate.core.errors import AggregationError

try:
    from fedgate.core import _aggregate as _k
    from fedgate.core import _fused as _f
    from fedgate.core import _order as _o
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "fedgate.core._aggregate / _order are not compiled; run "
        "`python setup.py build_ext --inplace` (or `pip install -e .`) in the source tree"
    ) from exc

__all__ = [
    "ServerOptimizer",
    "StreamingMean",
    "bulyan",
    "check_f32_update",
    "check_q8_update",
    "clip_norm",
    "feature_stats",
    "first_nonfinite",
    "is_finite",
    "krum",
    "l2_norm",
    "median",
    "merge_stats",
    "momentum_step",
    "server_opt_step",
    "stats_to_scaler",
    "trimmed_mean",
    "weighted_mean",
]

FloatArray = npt.NDArray[np.floating[Any]]
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)
_FLOATS = (_F32, _F64)
# Above this many updates, coordinate-wise rules switch from a sorting network (cost
# ~ n log^2 n per coordinate, fully vectorised) to counting passes (~ n per pass).
_NETWORK_MAX_N = {0: 256, 1: 512}  # by mode: 0 median, 1 trimmed mean (measured crossovers)


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


# ---------------------------------------------------------------- server optimisers


class ServerOptimizer(str, Enum):
    """Adaptive server rules of Reddi et al. (2021)."""

    ADAGRAD = "fedadagrad"
    ADAM = "fedadam"
    YOGI = "fedyogi"


_OPT_RULE = {ServerOptimizer.ADAGRAD: 0, ServerOptimizer.ADAM: 1, ServerOptimizer.YOGI: 2}


def _state_vectors(params: Any, *others: tuple[str, Any]) -> None:
    p = params
    if not (isinstance(p, np.ndarray) and p.dtype == np.float32 and p.ndim == 1 and p.flags.c_contiguous
            and p.flags.writeable):
        raise AggregationError("params must be a writable C-contiguous float32 1-D array")
    for name, v in others:
        if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == p.shape
                and v.flags.c_contiguous):
            raise AggregationError(f"{name} must be a C-contiguous float32 array of shape {p.shape}")


def server_opt_step(
    rule: ServerOptimizer | str,
    params: npt.NDArray[np.float32],
    delta: npt.NDArray[np.float32],
    m: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> None:
    """One FedAdagrad / FedAdam / FedYogi server step, updating params, m, v in place.

    ``delta`` is the pseudo-gradient ``mean(client params) - params``;
    m = b1 m + (1 - b1) delta; Adagrad v += delta^2; Adam v = b2 v + (1 - b2) delta^2;
    Yogi v -= (1 - b2) delta^2 sign(v - delta^2); params += lr m / (sqrt(v) + tau).
    All arrays: (dim,) float32, C-contiguous; params, m, v writable. Start m at 0 and
    v at tau^2 (the paper's initialisation).
    """
    try:
        r = _OPT_RULE[ServerOptimizer(rule)]
    except ValueError as exc:
        raise AggregationError(f"rule = {rule!r}: one of {[o.value for o in ServerOptimizer]}") from exc
    _state_vectors(params, ("delta", delta), ("m", m), ("v", v))
    for name, value in (("lr", lr), ("beta1", beta1), ("beta2", beta2), ("tau", tau)):
        if not np.isfinite(value) or value < 0:
            raise AggregationError(f"{name} = {value!r}: must be finite and >= 0")
    if not (beta1 < 1 and beta2 < 1):
        raise AggregationError(f"beta1 = {beta1!r}, beta2 = {beta2!r}: must be < 1")
    _k.fedopt_step(params, delta, m, v, r, float(lr), float(beta1), float(beta2), float(tau))


def momentum_step(
    params: npt.NDArray[np.float32],
    delta: npt.NDArray[np.float32],
    momentum: npt.NDArray[np.float32],
    *,
    lr: float = 1.0,
    beta: float = 0.9,
) -> None:
    """FedAvgM server step in place: momentum = beta momentum + delta; params += lr momentum."""
    _state_vectors(params, ("delta", delta), ("momentum", momentum))
    if not (np.isfinite(lr) and lr >= 0 and np.isfinite(beta) and 0 <= beta < 1):
        raise AggregationError(f"lr = {lr!r}, beta = {beta!r}: need lr >= 0 and 0 <= beta < 1")
    _k.momentum_step(params, delta, momentum, float(lr), float(beta))


# ------------------------------------------------------------ feature statistics


Stats = tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64]]


def feature_stats(x: FloatArray) -> Stats:
    """Per-feature (count, mean, M2) of a local ``(n_samples, n_features)`` array (float64)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise AggregationError(f"x must be 2-D (n_samples, n_features), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise AggregationError("x has non-finite values")
    n = arr.shape[0]
    if n == 0:
        return 0, np.zeros(arr.shape[1]), np.zeros(arr.shape[1])
    mean = arr.mean(axis=0)
    m2 = ((arr - mean) ** 2).sum(axis=0)
    return n, mean, m2


def merge_stats(parts: Sequence[tuple[int, Any, Any]]) -> Stats:
    """Chan et al.'s parallel merge of per-site (count, mean, M2) feature statistics.

    Parameters
    ----------
    parts : sequence of (count, mean, m2); count int >= 0, mean and m2 (n_features,)
        finite, m2 >= 0 (the sum of squared deviations from the site mean).

    Returns
    -------
    (count, mean, m2) of the pooled data, mean and m2 float64 (n_features,).
    """
    if not parts:
        raise AggregationError("no statistics to merge")
    total = 0
    mean: npt.NDArray[np.float64] | None = None
    m2: npt.NDArray[np.float64] | None = None
    width = None
    for i, part in enumerate(parts):
        try:
            count, pmean, pm2 = part
        except (TypeError, ValueError) as exc:
            raise AggregationError(f"parts[{i}] is not (count, mean, m2)") from exc
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
            raise AggregationError(f"parts[{i}] count = {count!r}: must be an int >= 0")
        a = np.asarray(pmean, dtype=np.float64)
        b = np.asarray(pm2, dtype=np.float64)
        if a.ndim != 1 or b.shape != a.shape:
            raise AggregationError(f"parts[{i}]: mean {a.shape} and m2 {b.shape} must be equal 1-D shapes")
        if width is None:
            width = a.shape[0]
        elif a.shape[0] != width:
            raise AggregationError(f"parts[{i}] has {a.shape[0]} features, expected {width}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise AggregationError(f"parts[{i}] has non-finite mean or m2")
        if (b < 0).any():
            raise AggregationError(f"parts[{i}] has a negative m2 ({float(b.min())!r})")
        if count == 0:
            continue
        if mean is None or m2 is None or total == 0:
            total, mean, m2 = int(count), a.copy(), b.copy()
            continue
        n = total + int(count)
        delta = a - mean
        mean = mean + delta * (count / n)
        m2 = m2 + b + delta * delta * (total * int(count) / n)
        total = n
    assert width is not None
    if mean is None or m2 is None:
        return 0, np.zeros(width), np.zeros(width)
    return total, mean, m2


def stats_to_scaler(
    count: int, mean: Any, m2: Any, *, ddof: int = 0, std_floor: float = 1e-8
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Turn merged (count, mean, M2) into a standard scaler ``(mean, std)``, float32.

    ``std = sqrt(m2 / (count - ddof))``; features whose std is below ``std_floor``
    (constant features) get std 1.0, so scaling maps them to 0 instead of dividing by 0.
    """
    if not isinstance(count, (int, np.integer)) or count - ddof <= 0:
        raise AggregationError(f"count = {count!r}: need more than ddof = {ddof} samples")
    mu = np.asarray(mean, dtype=np.float64)
    var = np.asarray(m2, dtype=np.float64) / float(count - ddof)
    if mu.ndim != 1 or var.shape != mu.shape:
        raise AggregationError(f"mean {mu.shape} and m2 {var.shape} must be equal 1-D shapes")
    if not (np.isfinite(mu).all() and np.isfinite(var).all()) or (var < 0).any():
        raise AggregationError("mean/m2 must be finite and m2 >= 0")
    std = np.sqrt(var)
    std[std < std_floor] = 1.0
    return mu.astype(np.float32), std.astype(np.float32)
