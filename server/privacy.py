"""DP-FedAvg (McMahan et al. 2018): per-update clipping, Gaussian noise, an RDP accountant.

Each accepted update's change ``local - global`` is clipped to L2 norm ``clip_norm``
(S) before it is averaged with equal weights; the mean change of m updates gets
Gaussian noise of standard deviation ``z * S / m`` (z = ``noise_multiplier``). The
privacy spent is tracked by Google's ``dp_accounting`` RDP accountant as one
Poisson-sampled Gaussian mechanism per round (sampling rate q = sampled agents /
population) and reported as epsilon at the configured delta.

>>> from fedgate.server.config import PrivacySection
>>> acc = PrivacyAccountant(PrivacySection(noise_multiplier=1.1, clip_norm=1.0, delta=1e-5))
>>> acc.spend(0.1); acc.spend(0.1)
>>> 0 < acc.epsilon() < 2
True
"""
from __future__ import annotations

import math

import numpy as np

from fedgate.core import aggregate as agg
from fedgate.server.config import PrivacySection

__all__ = ["PrivacyAccountant", "clip_update", "add_noise"]

# integer Renyi orders: exact for the sampled Gaussian (fractional ones need a series that may not converge)
_ORDERS = [float(a) for a in range(2, 65)] + [80.0, 128.0, 256.0, 512.0]


def clip_update(params: np.ndarray, global_params: np.ndarray, clip_norm: float, scratch: np.ndarray) -> np.ndarray:
    """``global + clip(params - global, clip_norm)`` written into ``params`` (float32, (D,)).

    ``scratch`` is a float32 (D,) work buffer; returns ``params``.
    """
    np.subtract(params, global_params, out=scratch)
    agg.clip_norm(scratch, clip_norm, inplace=True)
    np.add(global_params, scratch, out=params)
    return params


def add_noise(mean_params: np.ndarray, n_updates: int, cfg: PrivacySection, seed: tuple[int, ...]) -> np.ndarray:
    """Gaussian noise of std ``z * S / m`` added in place to the averaged model (float32 (D,)).

    The noise is drawn from ``numpy.random.default_rng(seed)``, so a resumed round adds
    exactly the noise of the interrupted one.
    """
    std = cfg.noise_multiplier * cfg.clip_norm / max(1, n_updates)
    rng = np.random.default_rng(list(seed))
    mean_params += rng.standard_normal(mean_params.size, dtype=np.float32) * np.float32(std)
    return mean_params


class PrivacyAccountant:
    """Epsilon at ``delta`` over the rounds run so far (RDP accountant)."""

    def __init__(self, cfg: PrivacySection, history: list[float] | None = None) -> None:
        self.cfg = cfg
        self.rates: list[float] = list(history or [])

    def spend(self, sampling_rate: float) -> None:
        """Account one round that sampled agents with probability ``sampling_rate``."""
        self.rates.append(min(1.0, max(0.0, float(sampling_rate))))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``cfg.delta`` (0 before any round, inf without noise)."""
        if not self.rates:
            return 0.0
        if self.cfg.noise_multiplier <= 0:
            return math.inf
        import dp_accounting  # noqa: PLC0415 - heavy (scipy); only servers with DP on pay for it

        accountant = dp_accounting.rdp.RdpAccountant(orders=_ORDERS)
        counts: dict[float, int] = {}
        for q in self.rates:
            counts[q] = counts.get(q, 0) + 1
        for q, n in counts.items():
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(self.cfg.noise_multiplier))
            accountant.compose(event, n)
        return float(accountant.get_epsilon(self.cfg.delta))
