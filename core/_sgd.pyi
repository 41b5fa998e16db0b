"""Type stub for the compiled SGD kernels (see ``core/_sgd.pyx``)."""
from __future__ import annotations

import numpy as np

OK: int
BAD_X: int
BAD_Y: int
DIVERGED: int
NO_MEMORY: int

class Settings:
    def __init__(
        self, epochs: int, batch_size: int, lr: float, power_t: float, l2: float, prox_mu: float, shuffle: bool
    ) -> None: ...
    @property
    def prox_mu(self) -> float: ...
    @property
    def lr(self) -> float: ...

class Kernel:
    def __init__(self, sizes: tuple[int, ...], activation: str, output: str, loss: str) -> None: ...
    @property
    def n_params(self) -> int: ...
    def train(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        ty: int,
        sw: np.ndarray,
        params: np.ndarray,
        ref: np.ndarray,
        settings: Settings,
        step0: int,
        rng: int,
    ) -> tuple[int, int, int, float, int, int, int]: ...
    def infer(self, X: np.ndarray, w: np.ndarray, out: np.ndarray) -> tuple[int, int]: ...
    def sample_losses(
        self, X: np.ndarray, w: np.ndarray, Y: np.ndarray, ty: int, losses: np.ndarray
    ) -> tuple[int, int]: ...
