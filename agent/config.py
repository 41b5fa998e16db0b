"""The agent's configuration: one ``agent.toml`` read into frozen dataclasses.

Sections: ``[agent]``, ``[uplink]`` (:class:`fedgate.agent.uplink.UplinkConfig`), the
drivers' ``[[transports]]`` / ``[[devices]]`` (:func:`fedgate.drivers.load_config`),
``[samples]`` with ``[samples.label]``, ``[store]``, ``[predict]`` and ``[metrics]``.
Every mistake is a :class:`~fedgate.core.errors.ConfigError` naming file, key and value.

>>> cfg = build(SamplesConfig, {"grid": "1s", "window": "10s", "hop": "5s",
...     "features": [{"name": "temp_mean", "tag": "m1.temp", "agg": "mean"}]}, key="samples")
>>> cfg.window_s, cfg.features[0].agg
(10.0, <Agg.MEAN: 'mean'>)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fedgate.core.config import build, check_keys, load_toml, option
from fedgate.core.errors import ConfigError

__all__ = [
    "Agg",
    "AgentSection",
    "FeatureConfig",
    "LabelConfig",
    "SamplesConfig",
    "StoreConfig",
    "PredictConfig",
    "MetricsConfig",
    "AgentConfig",
    "load_agent_config",
    "parse_agent_config",
    "driver_tags",
]

_TOP_LEVEL = ("schema_version", "agent", "uplink", "transports", "devices", "samples", "store", "predict", "metrics")


class Agg(str, Enum):
    """Window aggregates a feature or a label can take."""

    LAST = "last"
    MEAN = "mean"
    MIN = "min"
    MAX = "max"
    STD = "std"
    RMS = "rms"
    DELTA = "delta"
    SLOPE = "slope"


class LogLevel(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, kw_only=True)
class AgentSection:
    """``[agent]``: who this gateway is and where it keeps its state."""

    name: str
    data_dir: str = option("/var/lib/fedgate-agent")
    log_level: LogLevel = option(LogLevel.INFO)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError("letters, digits, '-', '_' and '.' only", key="agent.name", value=self.name)

    @property
    def db_path(self) -> Path:
        """The SQLite file shared by the sample store and the uplink's outbox."""
        return Path(self.data_dir) / "agent.db"

    @property
    def state_path(self) -> Path:
        """The JSON state file ``fedgate-agent status`` reads."""
        return Path(self.data_dir) / "agent.state.json"


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """One ``features`` entry: a named aggregate of one tag over a window."""

    name: str
    tag: str
    agg: Agg = option(Agg.MEAN)


@dataclass(frozen=True, kw_only=True)
class LabelConfig:
    """``[samples.label]``: the target, aggregated over ``(t, t + horizon]``."""

    name: str
    tag: str
    agg: Agg = option(Agg.MAX)
    horizon_s: float = option(0.0, toml="horizon", unit="duration", ge=0)


@dataclass(frozen=True, kw_only=True)
class SamplesConfig:
    """``[samples]``: the grid, the windows and the features built from them."""

    grid_s: float = option(1.0, toml="grid", unit="duration", gt=0)
    window_s: float = option(60.0, toml="window", unit="duration", gt=0)
    hop_s: float = option(10.0, toml="hop", unit="duration", gt=0)
    min_coverage: float = option(0.8, gt=0, le=1)
    max_gap_s: float = option(5.0, toml="max_gap", unit="duration", ge=0)
    delay_s: float | None = option(None, toml="delay", unit="duration", ge=0,
                                   doc="how long a grid point waits for late values; default one grid period")
    features: tuple[FeatureConfig, ...] = ()
    label: LabelConfig | None = None

    def __post_init__(self) -> None:
        for key, value in (("window", self.window_s), ("hop", self.hop_s)):
            ratio = value / self.grid_s
            if ratio < 1 - 1e-9 or abs(ratio - round(ratio)) > 1e-6:
                raise ConfigError(f"must be a whole multiple of grid ({self.grid_s:g}s)",
                                  key=f"samples.{key}", value=value)
        if self.label is not None and self.label.horizon_s > 0:
            ratio = self.label.horizon_s / self.grid_s
            if abs(ratio - round(ratio)) > 1e-6:
                raise ConfigError(f"must be a whole multiple of grid ({self.grid_s:g}s)",
                                  key="samples.label.horizon", value=self.label.horizon_s)
        if not self.features:
            raise ConfigError("at least one feature is needed", key="samples.features", value=[])
        seen: set[str] = set()
        for i, feat in enumerate(self.features):
            if feat.name in seen:
                raise ConfigError("duplicate feature name", key=f"samples.features[{i}].name", value=feat.name)
            seen.add(feat.name)

    @property
    def window_points(self) -> int:
        return int(round(self.window_s / self.grid_s))

    @property
    def hop_points(self) -> int:
        return int(round(self.hop_s / self.grid_s))

    @property
    def horizon_points(self) -> int:
        return 0 if self.label is None else int(round(self.label.horizon_s / self.grid_s))

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """``[store]``: how much local history the gateway keeps."""

    max_rows: int = option(200_000, gt=0)
    max_age_s: float | None = option(None, toml="max_age", unit="duration", gt=0)


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """``[predict]``: what happens with each live score."""

    enabled: bool = True
    write_tag: str | None = None
    alarm_threshold: float | None = None
    alarm_tag: str | None = None
    hysteresis: float = option(0.05, ge=0)

    def __post_init__(self) -> None:
        if self.alarm_tag is not None and self.alarm_threshold is None:
            raise ConfigError("alarm_tag needs alarm_threshold", key="predict.alarm_tag", value=self.alarm_tag)
        if self.alarm_threshold is not None and not math.isfinite(self.alarm_threshold):
            raise ConfigError("must be finite", key="predict.alarm_threshold", value=self.alarm_threshold)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint (loopback by default; "" disables it)."""

    address: str = "127.0.0.1:9731"

    def host_port(self) -> tuple[str, int] | None:
        if not self.address:
            return None
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit() or int(port) > 65535:
            raise ConfigError("expected HOST:PORT", key="metrics.address", value=self.address)
        return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """The whole ``agent.toml``."""

    file: str
    agent: AgentSection
    samples: SamplesConfig
    store: StoreConfig = field(default_factory=StoreConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    uplink: Any = None  # fedgate.agent.uplink.UplinkConfig | None (offline agent without it)
    drivers: Any = None  # fedgate.drivers.DriversConfig

    @property
    def tags(self) -> list[str]:
        """Every tag the sampler reads: feature tags, then the label tag, no duplicates."""
        names = [f.tag for f in self.samples.features]
        if self.samples.label is not None:
            names.append(self.samples.label.tag)
        return list(dict.fromkeys(names))


def _section(cls: type, doc: dict[str, Any], name: str, file: str) -> Any:
    return build(cls, doc.get(name, {}), file=file, key=name)


def _with_file(exc: ConfigError, file: str) -> ConfigError:
    if exc.file:
        return exc
    kwargs: dict[str, Any] = {"file": file, "key": exc.key}
    if exc.has_value:
        kwargs["value"] = exc.value
    return ConfigError(exc.reason, **kwargs)


def parse_agent_config(doc: dict[str, Any], *, file: str, with_drivers: bool = True) -> AgentConfig:
    """Build an :class:`AgentConfig` from a parsed TOML document.

    ``with_drivers=False`` skips the ``[[transports]]``/``[[devices]]`` sections (for
    tests of the agent's own sections and for tools that only read the state).
    """
    check_keys(doc, _TOP_LEVEL, file=file, key="")
    try:
        if "agent" not in doc:
            raise ConfigError("missing required section [agent]", file=file, key="agent")
        if "samples" not in doc:
            raise ConfigError("missing required section [samples]", file=file, key="samples")
        agent = _section(AgentSection, doc, "agent", file)
        samples = _section(SamplesConfig, doc, "samples", file)
        store = _section(StoreConfig, doc, "store", file)
        predict = _section(PredictConfig, doc, "predict", file)
        metrics = _section(MetricsConfig, doc, "metrics", file)
        metrics.host_port()
    except ConfigError as exc:
        raise _with_file(exc, file) from None
    uplink = None
    if "uplink" in doc:
        from fedgate.agent.uplink_types import UplinkConfig

        try:
            uplink = build(UplinkConfig, doc["uplink"], file=file, key="uplink")
        except ConfigError as exc:
            raise _with_file(exc, file) from None
    drivers = None
    if with_drivers:
        from fedgate.drivers import load_config

        drivers = load_config(doc, file=file)
    cfg = AgentConfig(file=file, agent=agent, samples=samples, store=store, predict=predict,
                      metrics=metrics, uplink=uplink, drivers=drivers)
    if drivers is not None:
        _check_tags(cfg, file)
    return cfg


def load_agent_config(path: str | os.PathLike[str], *, with_drivers: bool = True) -> AgentConfig:
    """Read and validate ``agent.toml``; errors name file, key and value."""
    file = str(path)
    return parse_agent_config(load_toml(file), file=file, with_drivers=with_drivers)


def driver_tags(drivers: Any) -> dict[str, bool]:
    """``{"device.tag": writable}`` for every tag of a drivers config."""
    out: dict[str, bool] = {}
    for dev in getattr(drivers, "devices", ()):
        for tag in getattr(dev, "tags", ()):
            out[f"{dev.name}.{tag.name}"] = bool(getattr(tag, "writable", False))
    return out


def _check_tags(cfg: AgentConfig, file: str) -> None:
    known = driver_tags(cfg.drivers)
    for i, feat in enumerate(cfg.samples.features):
        if feat.tag not in known:
            raise ConfigError("no such tag in [[devices]] (expected DEVICE.TAG)", file=file,
                              key=f"samples.features[{i}].tag", value=feat.tag)
    label = cfg.samples.label
    if label is not None and label.tag not in known:
        raise ConfigError("no such tag in [[devices]] (expected DEVICE.TAG)", file=file,
                          key="samples.label.tag", value=label.tag)
    for key in ("write_tag", "alarm_tag"):
        tag = getattr(cfg.predict, key)
        if tag is None:
            continue
        if tag not in known:
            raise ConfigError("no such tag in [[devices]]", file=file, key=f"predict.{key}", value=tag)
        if not known[tag]:
            raise ConfigError("the tag is not writable (set writable = true)", file=file,
                              key=f"predict.{key}", value=tag)
