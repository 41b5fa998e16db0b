"""Per-feature (count, mean, M2) statistics: computed per site, merged, turned into a scaler.

Part of :mod:`fedgate.core.aggregate` (import the public names from there).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgate.core._updates import FloatArray
from fedgate.core.errors import AggregationError

__all__ = ["feature_stats", "merge_stats", "stats_to_scaler"]


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
