"""fedgate.agent: the gateway daemon (config, sampler, store, trainer, uplink, predictor, service).

Names are loaded lazily (PEP 562), so ``fedgate-agent status`` or ``keygen`` do not
pay for numpy, pymodbus or zmq.
"""
from __future__ import annotations

from fedgate.core.lazy import lazy_exports


# public name -> module that defines it
_LAZY: dict[str, str] = {
    # config
    "AgentConfig": "fedgate.agent.config",
    "Agg": "fedgate.agent.config",
    "FeatureConfig": "fedgate.agent.config",
    "LabelConfig": "fedgate.agent.config",
    "SamplesConfig": "fedgate.agent.config",
    "StoreConfig": "fedgate.agent.config",
    "PredictConfig": "fedgate.agent.config",
    "MetricsConfig": "fedgate.agent.config",
    "load_agent_config": "fedgate.agent.config",
    # sampling, storage, training, prediction
    "Sampler": "fedgate.agent.sampler",
    "Sample": "fedgate.agent.sampler",
    "Window": "fedgate.agent.sampler",
    "window_aggregates": "fedgate.agent.sampler",
    "Store": "fedgate.agent.store",
    "SampleSet": "fedgate.agent.store",
    "StoredModel": "fedgate.agent.store",
    "Trainer": "fedgate.agent.trainer",
    "Predictor": "fedgate.agent.predictor",
    "Alarm": "fedgate.agent.predictor",
    # the daemon
    "AgentService": "fedgate.agent.service",
    "run_agent": "fedgate.agent.service",
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
