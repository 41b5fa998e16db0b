"""fedgate.core: compiled kernels and what both daemons share.

Models, aggregation kernels, update codecs, the wire protocol, errors, units and
the config loader. Names are loaded lazily (PEP 562), so ``import
fedgate.core.errors`` or ``fedgate.core.units`` loads no compiled module and no
numpy.
"""
from __future__ import annotations

from fedgate.core.lazy import lazy_exports


# public name -> module that defines it
_LAZY: dict[str, str] = {
    # errors
    "FedgateError": "fedgate.core.errors",
    "ConfigError": "fedgate.core.errors",
    "DriverError": "fedgate.core.errors",
    "DeviceTimeout": "fedgate.core.errors",
    "DeviceException": "fedgate.core.errors",
    "ConnectionLost": "fedgate.core.errors",
    "ProtocolError": "fedgate.core.errors",
    "TrainingError": "fedgate.core.errors",
    "AggregationError": "fedgate.core.errors",
    "StoreError": "fedgate.core.errors",
    "SecurityError": "fedgate.core.errors",
    # units and config
    "parse_duration": "fedgate.core.units",
    "parse_size": "fedgate.core.units",
    "format_duration": "fedgate.core.units",
    "format_size": "fedgate.core.units",
    "option": "fedgate.core.config",
    "build": "fedgate.core.config",
    "load_toml": "fedgate.core.config",
    "setup_logging": "fedgate.core.logs",
    # aggregation kernels and update codecs
    "StreamingMean": "fedgate.core.aggregate",
    "weighted_mean": "fedgate.core.aggregate",
    "median": "fedgate.core.aggregate",
    "trimmed_mean": "fedgate.core.aggregate",
    "krum": "fedgate.core.aggregate",
    "bulyan": "fedgate.core.aggregate",
    "clip_norm": "fedgate.core.aggregate",
    "l2_norm": "fedgate.core.aggregate",
    "is_finite": "fedgate.core.aggregate",
    "merge_stats": "fedgate.core.aggregate",
    "stats_to_scaler": "fedgate.core.aggregate",
    "feature_stats": "fedgate.core.aggregate",
    "ServerOptimizer": "fedgate.core.aggregate",
    "server_opt_step": "fedgate.core.aggregate",
    "momentum_step": "fedgate.core.aggregate",
    "Codec": "fedgate.core.codec",
    "ErrorFeedback": "fedgate.core.codec",
    "encode": "fedgate.core.codec",
    "decode": "fedgate.core.codec",
    # models and training
    "ModelKind": "fedgate.core.model",
    "Activation": "fedgate.core.model",
    "Loss": "fedgate.core.model",
    "LrSchedule": "fedgate.core.model",
    "LayerSlice": "fedgate.core.model",
    "ModelSpec": "fedgate.core.model",
    "FitReport": "fedgate.core.model",
    "Model": "fedgate.core.model",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
