"""fedgate.agent: the gateway daemon (config, sampler, store, trainer, uplink, predictor, service)."""
from __future__ import annotations

__all__: list[str] = []
