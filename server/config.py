"""``server.toml``: one frozen dataclass per section, built by the core config loader.

Sections: ``[server]`` (sockets, keys, storage, limits), ``[federation]`` (the task:
model spec, ordered features, label, rounds, sampling, hyper-parameters, codec),
``[strategy]`` (aggregation rule and its parameters, the update norm bound),
``[privacy]`` (DP-FedAvg; off while ``noise_multiplier = 0``) and, on a relay,
``[relay]`` (built by :mod:`fedgate.server.relay`, which is imported only then).
``deploy/server.toml`` and ``deploy/relay.toml`` are the complete commented examples.
Relative paths are taken from the config file's directory. Every error names the file,
the key and the value.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from fedgate.core.config import build, check_keys, load_toml, option
from fedgate.core.errors import ConfigError
from fedgate.core.protocol import CODECS

__all__ = [
    "StrategyName",
    "FederationMode",
    "ServerSection",
    "FederationSection",
    "StrategySection",
    "PrivacySection",
    "ServerConfig",
    "LIVE_FEDERATION_KEYS",
    "check_rules",
    "load_config",
    "parse_config",
]


class StrategyName(str, Enum):
    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"
    FEDADAGRAD = "fedadagrad"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
    KRUM = "krum"
    MULTIKRUM = "multikrum"
    BULYAN = "bulyan"


class FederationMode(str, Enum):
    SYNC = "sync"     # rounds with a deadline and a quorum
    ASYNC = "async"   # buffered asynchronous aggregation (fedgate.server.async_coordinator)


@dataclass(frozen=True, kw_only=True)
class ServerSection:
    bind: str = option("tcp://0.0.0.0:7443", doc="ZeroMQ endpoint of the ROUTER socket")
    data_dir: str = option(doc="checkpoints and history.db live here")
    secret_key: str = option("", doc="the server's NAME.key_secret (mode 0600)")
    agents_dir: str = option("", doc="allow-list: one NAME.key per agent")
    insecure: bool = option(False, doc="no CURVE, no allow-list (tests and labs only)")
    max_message_size: int = option(64 * 2**20, unit="size", ge=4096)
    metrics: str = option("127.0.0.1:9465", doc="host:port of the Prometheus endpoint; '' disables")
    heartbeat_s: float = option(5.0, toml="heartbeat", unit="duration", gt=0, le=3600)
    dead_after_s: float = option(15.0, toml="dead_after", unit="duration", gt=0, le=86400)
    handshake_timeout_s: float = option(5.0, toml="handshake_timeout", unit="duration", gt=0, le=600)
    queue_depth: int = option(64, ge=1, le=100_000, doc="per-peer send/receive high-water mark (messages)")
    linger_s: float = option(1.0, toml="linger", unit="duration", ge=0, le=60)
    keep_checkpoints: int = option(5, ge=1, le=10_000)
    history_retention_s: float = option(0.0, toml="history_retention", unit="duration", ge=0,
                                        doc="per-task, per-agent and rejection rows of the history older than "
                                            "this are deleted (0: kept for ever); the one row per round stays")
    log_level: str = option("info", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True, kw_only=True)
class FederationSection:
    name: str = option(doc="federation name, sent to agents in welcome")
    model: dict[str, Any] = option(doc="model spec table (ModelSpec.to_dict())")
    features: tuple[str, ...] = option(doc="ordered feature names every agent must provide")
    label: str = option()
    rounds: int = option(ge=0, le=10**9, doc="train rounds to run (0: statistics only)")
    min_agents: int = option(1, ge=1, le=10**6, doc="sample at least, and close a round with at least, this many")
    min_available: int = option(0, ge=0, le=10**6, doc="ready agents needed before a round starts (0: min_agents)")
    fraction: float = option(1.0, gt=0, le=1)
    round_timeout_s: float = option(60.0, toml="round_timeout", unit="duration", gt=0)
    round_interval_s: float = option(0.0, toml="round_interval", unit="duration", ge=0, le=366 * 86400,
                                     doc="least time from one train round's start to the next's (0: back to back)")
    local_epochs: int = option(1, ge=0, le=100_000)
    batch_size: int = option(32, ge=1, le=1 << 24)
    lr: float = option(0.01, ge=0, le=1e6)
    lr_schedule: str = option("constant", choices=("constant", "invscaling"))
    l2: float = option(0.0, ge=0, le=1e6)
    prox_mu: float = option(0.0, ge=0, le=1e6)
    codec: str = option("f32", choices=CODECS)
    codec_params: dict[str, Any] = option(default_factory=dict)
    download_codec: str = option("f32", choices=("f32", "f16", "q8"))
    evaluate: bool = option(True, doc="send evaluate tasks on each new global model")
    statistics: bool = option(True, doc="run the statistics round (global scaler) first")
    seed: int = option(0, ge=0, le=2**63 - 1)
    mode: FederationMode = option(FederationMode.SYNC, choices=tuple(FederationMode),
                                  doc="sync rounds, or buffered asynchronous aggregation")
    buffer_size: int = option(0, ge=0, le=10**6, doc="async: results per aggregation (0: min_agents)")
    max_staleness: int = option(8, ge=0, le=10**6, doc="async: older results (in rounds) are refused as stale")
    staleness_exponent: float = option(0.5, ge=0, le=100, doc="async: weight n_samples * (1 + tau) ** -exponent")
    concurrency: int = option(0, ge=0, le=10**6, doc="async: agents training at a time (0: every ready agent)")


# [federation] keys a running server applies on SIGHUP (from its next round on); the
# others name the model, the data or the round mechanics and need a restart
LIVE_FEDERATION_KEYS = ("rounds", "round_interval_s", "round_timeout_s", "min_agents", "min_available", "fraction",
                        "local_epochs", "batch_size", "lr", "lr_schedule", "l2", "prox_mu", "evaluate")


@dataclass(frozen=True, kw_only=True)
class StrategySection:
    name: StrategyName = option(StrategyName.FEDAVG, choices=tuple(StrategyName))
    max_update_norm: float = option(1e6, gt=0, doc="L2 bound on (local - global); larger updates are rejected")
    server_lr: float = option(1.0, gt=0, le=1e6)
    momentum: float = option(0.9, ge=0, lt=1)
    beta1: float = option(0.9, ge=0, lt=1)
    beta2: float = option(0.99, ge=0, lt=1)
    tau: float = option(1e-3, gt=0)
    trim_beta: float = option(0.2, ge=0, lt=0.5, doc="fraction trimmed per tail (trimmed_mean)")
    byzantine: int = option(0, ge=0, le=10**6, doc="tolerated Byzantine agents f (krum, multikrum, bulyan)")
    keep: int = option(0, ge=0, le=10**6, doc="updates averaged by multikrum (0: n - f)")


@dataclass(frozen=True, kw_only=True)
class PrivacySection:
    noise_multiplier: float = option(0.0, ge=0, le=1e6, doc="z; 0 disables DP")
    clip_norm: float = option(1.0, gt=0)
    delta: float = option(1e-5, gt=0, lt=1)
    population: int = option(0, ge=0, doc="number of agents the sample is drawn from (0: allowed keys)")

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    server: ServerSection
    federation: FederationSection
    strategy: StrategySection = field(default_factory=StrategySection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    relay: Any = None  # fedgate.server.relay.RelaySection when this server is a relay
    path: str = ""


def _resolve(base: str, path: str) -> str:
    if not path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def parse_config(doc: dict[str, Any], *, file: str = "<config>", base_dir: str = ".") -> ServerConfig:
    """Build a :class:`ServerConfig` from a parsed TOML document."""
    check_keys(doc, ("server", "federation", "strategy", "privacy", "relay"), file=file, key="")
    for section in ("server", "federation"):
        if section not in doc:
            raise ConfigError("missing required section", file=file, key=section)
    server = build(ServerSection, doc["server"], file=file, key="server")
    fed_table = doc["federation"]
    if "relay" in doc and isinstance(fed_table, dict):  # a relay runs what headquarters sends
        fed_table = {"rounds": 0, **fed_table}
    fed = build(FederationSection, fed_table, file=file, key="federation")
    strategy = build(StrategySection, doc.get("strategy", {}), file=file, key="strategy")
    privacy = build(PrivacySection, doc.get("privacy", {}), file=file, key="privacy")
    server = replace(
        server,
        data_dir=_resolve(base_dir, server.data_dir),
        secret_key=_resolve(base_dir, server.secret_key),
        agents_dir=_resolve(base_dir, server.agents_dir),
    )
    if not server.insecure and not (server.secret_key and server.agents_dir):
        raise ConfigError("secret_key and agents_dir are required unless insecure = true",
                          file=file, key="server")
    if not server.bind.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError("expected tcp://HOST:PORT or ipc://PATH", file=file, key="server.bind", value=server.bind)
    if server.metrics:
        host, sep, port = server.metrics.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError("expected HOST:PORT or ''", file=file, key="server.metrics", value=server.metrics)
    if server.dead_after_s < server.heartbeat_s:
        raise ConfigError("must be at least server.heartbeat", file=file, key="server.dead_after",
                          value=server.dead_after_s)
    check_rules(fed, strategy, privacy, relay="relay" in doc, file=file)
    relay = None
    if "relay" in doc:
        relay = _relay_section(doc["relay"], strategy, privacy, file=file, base_dir=base_dir)
    return ServerConfig(server=server, federation=fed, strategy=strategy, privacy=privacy, relay=relay,
                        path=file)


def check_rules(fed: FederationSection, strategy: StrategySection, privacy: PrivacySection, *, relay: bool,
                file: str) -> None:
    """The rules between keys (each key's own range is checked when it is read); also run on
    the federation a reload makes of the running one and the new file's live keys."""
    if fed.min_available and fed.min_available < fed.min_agents:
        raise ConfigError("must be 0 or at least min_agents", file=file, key="federation.min_available",
                          value=fed.min_available)
    if not fed.features:
        raise ConfigError("at least one feature is required", file=file, key="federation.features")
    if len(set(fed.features)) != len(fed.features):
        raise ConfigError("feature names must be unique", file=file, key="federation.features",
                          value=list(fed.features))
    if strategy.name in (StrategyName.KRUM, StrategyName.MULTIKRUM, StrategyName.BULYAN):
        need = 4 * strategy.byzantine + 3 if strategy.name is StrategyName.BULYAN else 2 * strategy.byzantine + 3
        if fed.min_agents < need:
            raise ConfigError(f"{strategy.name.value} with byzantine = {strategy.byzantine} needs "
                              f"min_agents >= {need}", file=file, key="federation.min_agents", value=fed.min_agents)
    _check_codec_params(fed, file)
    if strategy.name is StrategyName.TRIMMED_MEAN and fed.min_agents < 3 and strategy.trim_beta > 0:
        raise ConfigError("trimmed_mean needs min_agents >= 3", file=file, key="federation.min_agents",
                          value=fed.min_agents)
    _check_async(fed, privacy, relay, file)


_RELAY_STRATEGIES = (StrategyName.FEDAVG, StrategyName.FEDPROX, StrategyName.MEDIAN, StrategyName.TRIMMED_MEAN,
                     StrategyName.KRUM, StrategyName.MULTIKRUM, StrategyName.BULYAN)


def _relay_section(table: Any, strategy: StrategySection, privacy: PrivacySection, *, file: str,
                   base_dir: str) -> Any:
    """The ``[relay]`` section (built by :mod:`fedgate.server.relay`, loaded only for a relay)."""
    if privacy.enabled:
        raise ConfigError("a relay adds no noise (headquarters does, once); set it to 0 or remove [privacy]",
                          file=file, key="privacy.noise_multiplier", value=privacy.noise_multiplier)
    if strategy.name not in _RELAY_STRATEGIES:
        raise ConfigError(f"a relay combines with {', '.join(s.value for s in _RELAY_STRATEGIES)}; server "
                          "optimizers run at headquarters", file=file, key="strategy.name", value=strategy.name.value)
    from fedgate.server.relay import parse_relay_section  # the uplink is loaded for a relay only

    return parse_relay_section(table, file=file, base_dir=base_dir)


def _check_async(fed: FederationSection, privacy: PrivacySection, relay: bool, file: str) -> None:
    """The buffered asynchronous mode's own rules (see :mod:`fedgate.server.async_coordinator`)."""
    if fed.round_interval_s and (relay or fed.mode is FederationMode.ASYNC):
        raise ConfigError("a relay follows its upstream's rounds" if relay else
                          "async rounds close as results come; round_interval paces sync rounds",
                          file=file, key="federation.round_interval", value=fed.round_interval_s)
    if fed.mode is not FederationMode.ASYNC:
        return
    if relay:
        raise ConfigError("a relay runs the rounds its upstream sends it; set mode = \"sync\" on a relay",
                          file=file, key="federation.mode", value=fed.mode.value)
    if privacy.enabled:
        raise ConfigError("DP is not available in async mode: the accountant assumes agents sampled at a known "
                          "rate each round, while async rounds take whoever answers first; use mode = \"sync\" "
                          "or noise_multiplier = 0", file=file, key="privacy.noise_multiplier",
                          value=privacy.noise_multiplier)
    if fed.buffer_size and fed.buffer_size < fed.min_agents:
        raise ConfigError(f"must be 0 (min_agents) or at least min_agents ({fed.min_agents}): a round closes "
                          "with at least min_agents results", file=file, key="federation.buffer_size",
                          value=fed.buffer_size)


def _check_codec_params(fed: FederationSection, file: str) -> None:
    """``codec_params`` are known and in range: a bad one would fail every agent's train task.

    Parameters of another codec than ``codec`` (``block`` left over after switching from
    q8 to f32) are checked too but harmless: each codec reads only its own.
    """
    from fedgate.core.codec import MAX_Q8_BLOCK, TOPK_MIN_FRACTION

    rules: dict[str, tuple[type, float, float]] = {
        "block": (int, 1, MAX_Q8_BLOCK),          # q8: values per scale
        "seed": (int, 0, 2**32 - 1),              # q8: stochastic rounding seed
        "k": (float, TOPK_MIN_FRACTION, 1.0),     # topk: fraction of values kept
    }
    for name, value in fed.codec_params.items():
        key = f"federation.codec_params.{name}"
        if name == "delta":  # send new - global (async tasks always ask for it)
            if not isinstance(value, bool):
                raise ConfigError("must be true or false", file=file, key=key, value=value)
            continue
        if name not in rules:
            known = ", ".join(sorted([*rules, "delta"]))
            raise ConfigError(f"not a codec parameter (known: {known})", file=file, key=key, value=value)
        kind, lo, hi = rules[name]
        ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
            what = "an integer" if kind is int else "a number"
            raise ConfigError(f"must be {what} in [{lo:g}, {hi:g}]", file=file, key=key, value=value)


def load_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read and validate ``server.toml``; raises :class:`ConfigError` naming file, key, value."""
    path = os.fspath(path)
    doc = load_toml(path)
    return parse_config(doc, file=path, base_dir=os.path.dirname(os.path.abspath(path)))
