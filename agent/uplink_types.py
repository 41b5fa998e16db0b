"""The uplink's public types: its config section and the task-handler contract.

``UplinkConfig`` is the ``[uplink]`` table of ``agent.toml``; the agent's trainer
implements :class:`TaskHandler` and receives :class:`Task` objects, answering with a
:class:`TaskOutcome`; every global model the server publishes reaches it as a
:class:`GlobalModel`.

>>> from fedgate.core.config import build
>>> cfg = build(UplinkConfig, {"server": "tcp://127.0.0.1:7443", "insecure": True,
...                            "heartbeat": "2s"}, file="agent.toml", key="uplink")
>>> cfg.heartbeat_s, cfg.dead_after_s
(2.0, 6.0)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedgate.core.config import option
from fedgate.core.errors import ConfigError

__all__ = ["UplinkConfig", "HelloInfo", "Task", "TaskOutcome", "GlobalModel", "TaskHandler"]

_ENDPOINT = re.compile(r"^(tcp://[^\s:]+:\d{1,5}|ipc://\S+)$")

@dataclass(frozen=True, kw_only=True)
class UplinkConfig:
    """The ``[uplink]`` section of ``agent.toml``.

    Attributes
    ----------
    server : str
        The server's endpoint, ``"tcp://host:port"``.
    server_key : str or None
        Path of the server's public key file (``NAME.key``); required unless insecure.
    secret_key : str or None
        Path of this agent's secret key file (``NAME.key_secret``, mode 0600);
        required unless insecure.
    insecure : bool
        Plain-text transport without keys; logged as a warning at every start.
    heartbeat_s : float
        Interval of application heartbeats (ZMTP heartbeats use it too).
    dead_after_s : float or None
        Silence after which the server is taken for dead and the socket recreated;
        default three heartbeats.
    hello_timeout_s : float
        How long to wait for ``welcome`` after ``hello`` before trying again.
    reconnect_delay_s, reconnect_delay_max_s : float
        Back-off between reconnects: doubles from the first to the second, with jitter.
    max_message_size : int
        Largest frame accepted from the server (bytes); bigger ones drop the link.
    """

    server: str = option(toml="server")
    server_key: str | None = option(None, toml="server_key")
    secret_key: str | None = option(None, toml="secret_key")
    insecure: bool = option(False)
    heartbeat_s: float = option(5.0, toml="heartbeat", unit="duration", gt=0)
    dead_after_s: float | None = option(None, toml="dead_after", unit="duration", gt=0)
    hello_timeout_s: float = option(10.0, toml="hello_timeout", unit="duration", gt=0)
    reconnect_delay_s: float = option(1.0, toml="reconnect_delay", unit="duration", gt=0)
    reconnect_delay_max_s: float = option(60.0, toml="reconnect_delay_max", unit="duration", gt=0)
    max_message_size: int = option(64 << 20, unit="size", ge=1024)

    def __post_init__(self) -> None:
        if not _ENDPOINT.match(self.server):
            raise ConfigError("expected 'tcp://host:port'", key="uplink.server", value=self.server)
        if not self.insecure:
            for name in ("server_key", "secret_key"):
                if not getattr(self, name):
                    raise ConfigError("required unless insecure = true", key=f"uplink.{name}")
        if self.reconnect_delay_max_s < self.reconnect_delay_s:
            raise ConfigError(f"must be >= reconnect_delay ({self.reconnect_delay_s:g}s)",
                              key="uplink.reconnect_delay_max", value=self.reconnect_delay_max_s)
        if self.dead_after_s is None:
            object.__setattr__(self, "dead_after_s", 3.0 * self.heartbeat_s)


@dataclass(frozen=True)
class HelloInfo:
    """What the agent announces in ``hello``: the features it can produce and its sample count."""

    features: list[str]
    n_samples: int


@dataclass(frozen=True, kw_only=True)
class Task:
    """A decoded ``task`` message.

    Attributes
    ----------
    task_id : str
        The server's nonce (32 hex characters); the result must carry it back.
    round : int
    kind : str
        ``"statistics"``, ``"train"`` or ``"evaluate"``.
    deadline_s : float
        Seconds the server waits for the result.
    spec : dict
        ``ModelSpec.to_dict()`` of the federation's model.
    features : list of str
        Ordered feature names; ``stats`` and ``X`` columns follow this order.
    label : str
    scaler : dict or None
        ``{"mean": [...], "std": [...]}`` per feature, or None before statistics.
    hyper : dict
        ``epochs, batch_size, lr, lr_schedule, l2, prox_mu``.
    codec : str
        How the train result is encoded (``f32``, ``f16``, ``q8``, ``topk``).
    codec_params : dict
    """

    task_id: str
    round: int
    kind: str
    deadline_s: float
    spec: dict[str, Any]
    features: list[str]
    label: str
    scaler: dict[str, Any] | None
    hyper: dict[str, Any]
    codec: str = "f32"
    codec_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> Task:
        """Build from a validated ``task`` header (keys as in the protocol)."""
        return cls(task_id=str(f["task_id"]), round=int(f["round"]), kind=str(f["kind"]),
                   deadline_s=float(f["deadline_s"]), spec=dict(f["spec"]),
                   features=list(f["features"]), label=str(f["label"]),
                   scaler=None if f.get("scaler") is None else dict(f["scaler"]),
                   hyper=dict(f.get("hyper") or {}), codec=str(f.get("codec") or "f32"),
                   codec_params=dict(f.get("codec_params") or {}))


@dataclass(frozen=True, kw_only=True)
class TaskOutcome:
    """What the handler returns for a task.

    Attributes
    ----------
    n_samples : int
        Samples the result is based on (the aggregation weight).
    metrics : dict of str to float
    params : ndarray of float32, shape (n_params,), or None
        The new local parameters (train tasks).
    stats : (count, mean, m2) or None
        Statistics tasks: ``count`` int, ``mean`` and ``m2`` float arrays of shape
        (n_features,), in the task's feature order.
    """

    n_samples: int
    metrics: dict[str, float]
    params: np.ndarray | None = None
    stats: tuple[int, np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True, kw_only=True)
class GlobalModel:
    """The federation's current model, from a ``model`` message.

    ``params`` is float32 of shape (n_params,); ``scaler`` as in :class:`Task`.
    """

    round: int
    spec: dict[str, Any]
    features: list[str]
    label: str
    scaler: dict[str, Any] | None
    params: np.ndarray


@runtime_checkable
class TaskHandler(Protocol):
    """Implemented by the agent's trainer.

    ``run_task`` blocks (the uplink calls it in a worker thread, so heartbeats go on);
    its ``global_params`` are read-only (the same array may later reach ``on_model``).
    ``on_model`` is called on the uplink's thread and must return quickly; its
    ``model.params`` are read-only too.
    """

    def hello_info(self) -> HelloInfo: ...

    def run_task(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome: ...

    def on_model(self, model: GlobalModel) -> None: ...
