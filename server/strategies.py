"""Aggregation strategies: small classes that call the kernels of ``fedgate.core.aggregate``.

A strategy sees one round at a time::

    s.begin(global_params, expected=n)      # a round starts
    s.add(params, weight)                   # each accepted update (local params, float32 (D,))
    mean = s.combine()                      # the aggregate of the local params, float32 (D,)
    new_global = s.apply(global_params, mean)   # server optimiser step (identity for most)

``state()`` / ``load_state()`` expose the server optimiser's vectors (momentum, Adam
moments) for checkpoints. Streaming strategies (the FedAvg family) hold O(D) memory
whatever the number of agents; the robust rules (median, trimmed mean, Krum, Multi-Krum,
Bulyan) need every update and keep one preallocated ``(expected, D)`` stack.

>>> import numpy as np
>>> from fedgate.server.config import StrategySection
>>> s = make_strategy(StrategySection(), dim=2)
>>> g = np.zeros(2, dtype=np.float32)
>>> s.begin(g, expected=2)
>>> s.add(np.array([1, 2], dtype=np.float32), 1.0); s.add(np.array([3, 2], dtype=np.float32), 3.0)
>>> s.apply(g, s.combine()).tolist()
[2.5, 2.0]
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedgate.core import aggregate as agg
from fedgate.core.errors import AggregationError
from fedgate.server.config import StrategyName, StrategySection

__all__ = [
    "Strategy",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedOpt",
    "Median",
    "TrimmedMean",
    "Krum",
    "MultiKrum",
    "Bulyan",
    "make_strategy",
]


class Strategy:
    """Base: the round protocol; subclasses choose how updates are combined."""

    name: ClassVar[str] = ""
    streaming: ClassVar[bool] = True

    def __init__(self, cfg: StrategySection, dim: int) -> None:
        self.cfg = cfg
        self.dim = dim

    # round protocol ---------------------------------------------------
    def begin(self, global_params: np.ndarray, expected: int) -> None:
        raise NotImplementedError

    def buffer(self) -> np.ndarray:
        """Where the next update should be decoded: a writable float32 (D,) array."""
        raise NotImplementedError

    def add(self, params: np.ndarray, weight: float) -> None:
        """Take one checked update (``params`` may be the array :meth:`buffer` returned)."""
        raise NotImplementedError

    def add_q8(self, buf: memoryview | bytes, offset: int, block: int, weight: float) -> None:
        """Take one checked ``q8``-coded update read in place (streaming strategies only)."""
        raise NotImplementedError

    @property
    def count(self) -> int:
        raise NotImplementedError

    def combine(self) -> np.ndarray:
        raise NotImplementedError

    def apply(self, global_params: np.ndarray, combined: np.ndarray) -> np.ndarray:
        """The new global model from the combined local models (default: take it as is)."""
        return combined

    # checkpointed state -------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name, vec in state.items():
            raise AggregationError(f"strategy {self.name} has no state {name!r}")


class FedAvg(Strategy):
    """Weighted mean of the local models (McMahan et al. 2017), streamed in O(D)."""

    name = StrategyName.FEDAVG.value

    def __init__(self, cfg: StrategySection, dim: int) -> None:
        super().__init__(cfg, dim)
        self._mean = agg.StreamingMean(dim)
        self._buf: np.ndarray | None = None

    def buffer(self) -> np.ndarray:
        if self._buf is None:  # only updates that need decoding (not f32) land here
            self._buf = np.empty(self.dim, dtype=np.float32)
        return self._buf

    def begin(self, global_params: np.ndarray, expected: int) -> None:
        self._mean.reset()

    def add(self, params: np.ndarray, weight: float) -> None:
        self._mean.add(params, weight, check_finite=False)

    def add_q8(self, buf: memoryview | bytes, offset: int, block: int, weight: float) -> None:
        self._mean.add_q8(buf, offset, block, weight)

    @property
    def count(self) -> int:
        return self._mean.count

    def combine(self) -> np.ndarray:
        return self._mean.result(np.float32)


class FedProx(FedAvg):
    """FedAvg on the server; the proximal term ``prox_mu`` travels to the agents in the task."""

    name = StrategyName.FEDPROX.value


class FedAvgM(FedAvg):
    """FedAvg with server momentum: the averaged change is a pseudo-gradient."""

    name = StrategyName.FEDAVGM.value

    def __init__(self, cfg: StrategySection, dim: int) -> None:
        super().__init__(cfg, dim)
        self._momentum = np.zeros(dim, dtype=np.float32)

    def apply(self, global_params: np.ndarray, combined: np.ndarray) -> np.ndarray:
        params = np.array(global_params, dtype=np.float32, copy=True)
        delta = np.subtract(combined, global_params, dtype=np.float32)
        agg.momentum_step(params, delta, self._momentum, lr=self.cfg.server_lr, beta=self.cfg.momentum)
        return params

    def state(self) -> dict[str, np.ndarray]:
        return {"momentum": self._momentum}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        _load(self, state, {"momentum": "_momentum"})


class FedOpt(FedAvg):
    """FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021) around a streamed FedAvg."""

    def __init__(self, cfg: StrategySection, dim: int) -> None:
        super().__init__(cfg, dim)
        self.name = cfg.name.value  # type: ignore[misc]
        self._m = np.zeros(dim, dtype=np.float32)
        self._v = np.full(dim, cfg.tau**2, dtype=np.float32)

    def apply(self, global_params: np.ndarray, combined: np.ndarray) -> np.ndarray:
        params = np.array(global_params, dtype=np.float32, copy=True)
        delta = np.subtract(combined, global_params, dtype=np.float32)
        agg.server_opt_step(self.name, params, delta, self._m, self._v, lr=self.cfg.server_lr,
                            beta1=self.cfg.beta1, beta2=self.cfg.beta2, tau=self.cfg.tau)
        return params

    def state(self) -> dict[str, np.ndarray]:
        return {"m": self._m, "v": self._v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        _load(self, state, {"m": "_m", "v": "_v"})


def _load(obj: Strategy, state: dict[str, np.ndarray], names: dict[str, str]) -> None:
    for key, vec in state.items():
        if key not in names:
            raise AggregationError(f"strategy {obj.name} has no state {key!r}")
        arr = np.asarray(vec)
        if arr.shape != (obj.dim,):
            raise AggregationError(f"state {key!r} has shape {arr.shape}, expected ({obj.dim},)")
        getattr(obj, names[key])[:] = arr


class _Stacked(Strategy):
    """Keeps every update of the round in one preallocated (expected, D) float32 stack."""

    streaming = False

    def __init__(self, cfg: StrategySection, dim: int) -> None:
        super().__init__(cfg, dim)
        self._stack = np.empty((0, dim), dtype=np.float32)
        self._n = 0

    def begin(self, global_params: np.ndarray, expected: int) -> None:
        if self._stack.shape[0] < expected:
            self._stack = np.empty((expected, self.dim), dtype=np.float32)
        self._n = 0

    def buffer(self) -> np.ndarray:
        if self._n == self._stack.shape[0]:  # more answers than expected: grow
            grown = np.empty((max(1, 2 * self._n), self.dim), dtype=np.float32)
            grown[: self._n] = self._stack[: self._n]
            self._stack = grown
        return self._stack[self._n]

    def add(self, params: np.ndarray, weight: float) -> None:
        row = self.buffer()
        if params.ctypes.data != row.ctypes.data:
            row[:] = params
        self._n += 1

    @property
    def count(self) -> int:
        return self._n

    def _rows(self) -> np.ndarray:
        if self._n == 0:
            raise AggregationError(f"{self.name}: no update to aggregate")
        return self._stack[: self._n]


class Median(_Stacked):
    """Coordinate-wise median (Yin et al. 2018)."""

    name = StrategyName.MEDIAN.value

    def combine(self) -> np.ndarray:
        return agg.median(self._rows())


class TrimmedMean(_Stacked):
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018)."""

    name = StrategyName.TRIMMED_MEAN.value

    def combine(self) -> np.ndarray:
        return agg.trimmed_mean(self._rows(), self.cfg.trim_beta)


class Krum(_Stacked):
    """Krum (Blanchard et al. 2017): the update closest to its n - f - 2 neighbours."""

    name = StrategyName.KRUM.value

    def combine(self) -> np.ndarray:
        vec, self.selected = agg.krum(self._rows(), self.cfg.byzantine, 1)
        return vec


class MultiKrum(_Stacked):
    """Multi-Krum: the mean of the ``keep`` best-scored updates (default n - f)."""

    name = StrategyName.MULTIKRUM.value

    def combine(self) -> np.ndarray:
        rows = self._rows()
        m = self.cfg.keep or max(1, rows.shape[0] - self.cfg.byzantine)
        vec, self.selected = agg.krum(rows, self.cfg.byzantine, min(m, rows.shape[0]))
        return vec


class Bulyan(_Stacked):
    """Bulyan (El Mhamdi et al. 2018): Krum selection, then a trimmed mean; n >= 4f + 3."""

    name = StrategyName.BULYAN.value

    def combine(self) -> np.ndarray:
        vec, self.selected = agg.bulyan(self._rows(), self.cfg.byzantine)
        return vec


_CLASSES: dict[StrategyName, type[Strategy]] = {
    StrategyName.FEDAVG: FedAvg,
    StrategyName.FEDAVGM: FedAvgM,
    StrategyName.FEDPROX: FedProx,
    StrategyName.FEDADAM: FedOpt,
    StrategyName.FEDYOGI: FedOpt,
    StrategyName.FEDADAGRAD: FedOpt,
    StrategyName.MEDIAN: Median,
    StrategyName.TRIMMED_MEAN: TrimmedMean,
    StrategyName.KRUM: Krum,
    StrategyName.MULTIKRUM: MultiKrum,
    StrategyName.BULYAN: Bulyan,
}


def make_strategy(cfg: StrategySection, dim: int) -> Strategy:
    """The strategy named by ``cfg.name`` for models of ``dim`` parameters."""
    return _CLASSES[StrategyName(cfg.name)](cfg, dim)
