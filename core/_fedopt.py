"""Server-side optimiser steps applied to the aggregate: FedAdagrad, FedAdam, FedYogi, FedAvgM.

Part of :mod:`fedgate.core.aggregate` (import the public names from there).
"""
from __future__ import annotations

from enum import Enum
from typing import Any

import numpy as np
import numpy.typing as npt

from fedgate.core import _aggregate as _k
from fedgate.core.errors import AggregationError

__all__ = ["ServerOptimizer", "momentum_step", "server_opt_step"]


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
