"""Type stubs of the fused update kernels (private; use fedgate.core.aggregate)."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from collections.abc import Buffer

def check_f32(buf: Buffer, offset: int, ref: npt.NDArray[np.float32]) -> tuple[int, float]: ...
def check_q8(buf: Buffer, offset: int, block: int, ref: npt.NDArray[np.float32]) -> tuple[int, int, float]: ...
def accumulate_q8(acc: npt.NDArray[np.float64], buf: Buffer, offset: int, block: int, weight: float) -> None: ...
