"""fedgate.server: the aggregation daemon (transport, coordinator, strategies, store, metrics)."""
from __future__ import annotations

__all__: list[str] = []
