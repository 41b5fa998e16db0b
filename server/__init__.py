"""fedgate.server: the aggregation daemon (transport, coordinator, strategies, store, metrics).

Public names are loaded lazily (PEP 562)::

    from fedgate.server import Server, load_config
    with Server(load_config("server.toml")) as server:
        server.run()            # until server.request_stop()
"""
from __future__ import annotations

from fedgate.core.lazy import lazy_exports


_LAZY: dict[str, str] = {
    "ServerConfig": "fedgate.server.config",
    "StrategyName": "fedgate.server.config",
    "load_config": "fedgate.server.config",
    "parse_config": "fedgate.server.config",
    "Server": "fedgate.server.service",
    "Coordinator": "fedgate.server.coordinator",
    "Transport": "fedgate.server.transport",
    "generate_keypair": "fedgate.server.transport",
    "Strategy": "fedgate.server.strategies",
    "make_strategy": "fedgate.server.strategies",
    "PrivacyAccountant": "fedgate.server.privacy",
    "Checkpoint": "fedgate.server.store",
    "CheckpointStore": "fedgate.server.store",
    "History": "fedgate.server.store",
    "read_checkpoint": "fedgate.server.store",
    "ServerMetrics": "fedgate.server.metrics",
    "UpdateValidator": "fedgate.server.validate",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
