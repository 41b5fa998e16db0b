"""Type stubs of the compiled aggregation kernels (private; use fedgate.core.aggregate)."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]

def accumulate(acc: npt.NDArray[np.float64], x: _F, weight: float) -> None: ...
def accumulate_stack(
    acc: npt.NDArray[np.float64], stack: _F, weights: npt.NDArray[np.float64], check_finite: bool = False
) -> bool: ...
def scale_into(out: _F, acc: npt.NDArray[np.float64], factor: float) -> None: ...
def sq_norm(x: _F) -> float: ...
def scale_inplace(x: _F, factor: float) -> None: ...
def first_nonfinite(x: _F) -> int: ...
def fedopt_step(
    params: npt.NDArray[np.float32],
    delta: npt.NDArray[np.float32],
    m: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    rule: int,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> None: ...
def momentum_step(
    params: npt.NDArray[np.float32],
    delta: npt.NDArray[np.float32],
    mom: npt.NDArray[np.float32],
    lr: float,
    beta: float,
) -> None: ...
