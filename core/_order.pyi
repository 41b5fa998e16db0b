"""Type stubs of the compiled order-statistic kernels (private; use fedgate.core.aggregate)."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

_F = npt.NDArray[np.float32] | npt.NDArray[np.float64]

def network_reduce(
    stack: _F, comps: npt.NDArray[np.int32], mode: int, lo: int, hi: int, out: _F
) -> bool: ...
def count_select_reduce(
    stack: _F, sample_comps: npt.NDArray[np.int32], mode: int, lo: int, hi: int, out: _F
) -> bool: ...
