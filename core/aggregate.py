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

The code sits in private modules, re-exported here: ``_updates`` (input validation,
finiteness, norms, clipping, in-place update checks), ``_means`` (streaming and
stacked weighted means), ``_robust`` (median, trimmed mean, Krum, Bulyan),
``_fedopt`` (server optimiser steps) and ``_feature_stats`` (feature statistics).

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

# the compiled kernels of the modules below, with a clear message when they are not built
try:
    from fedgate.core import _aggregate as _k  # noqa: F401
    from fedgate.core import _fused as _f  # noqa: F401
    from fedgate.core import _order as _o  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "fedgate.core._aggregate / _order are not compiled; run "
        "`python setup.py build_ext --inplace` (or `pip install -e .`) in the source tree"
    ) from exc

from fedgate.core._feature_stats import Stats, feature_stats, merge_stats, stats_to_scaler
from fedgate.core._fedopt import ServerOptimizer, momentum_step, server_opt_step
from fedgate.core._means import StreamingMean, weighted_mean
from fedgate.core._robust import bulyan, krum, median, trimmed_mean
from fedgate.core._updates import (
    FloatArray,
    check_f32_update,
    check_q8_update,
    clip_norm,
    first_nonfinite,
    is_finite,
    l2_norm,
)
from fedgate.core.errors import AggregationError  # noqa: F401 - importable here as before

# internals the unit tests check against references (the thresholds of the
# coordinate-wise rules, _NETWORK_MAX_N, are read from fedgate.core._robust)
from fedgate.core._robust import _batcher_pairs, _krum_scores, _pairwise_sq_dists  # noqa: F401

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

# the public classes and functions present themselves as members of this module
for _name in __all__:
    if callable(globals()[_name]):
        globals()[_name].__module__ = __name__
del _name
