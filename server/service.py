"""The server daemon: one single-threaded poll loop around transport and coordinator.

``Server(cfg).run()`` serves until :meth:`Server.request_stop` (SIGTERM); it tells
systemd when it is ready, pings the watchdog from the loop itself (a wedged loop gets
restarted), reloads the key allow-list, the log level and the live ``[federation]``
keys on :meth:`Server.request_reload` (SIGHUP) and
stops within about a second: sockets close with a bounded linger, and everything
committed is already on disk.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Any

from fedgate.core import systemd
from fedgate.core.config import changed_fields, toml_key
from fedgate.core.errors import ConfigError, FedgateError
from fedgate.core.keys import public_keys_in
from fedgate.server.config import FederationMode, ServerConfig, load_config
from fedgate.server.coordinator import Coordinator
from fedgate.server.metrics import ServerMetrics
from fedgate.server.spec import load_model_spec
from fedgate.server.store import CheckpointStore, History
from fedgate.server.transport import Transport, TransportLimits

__all__ = ["Server"]

log = logging.getLogger(__name__)

_EVENT_METRIC = {"auth_failed": "unknown_key", "handshake_failed": "handshake", "revoked": "revoked"}


class Server:
    """Everything the daemon owns, wired together.

    Parameters
    ----------
    cfg : ServerConfig
    serve_metrics : bool
        Start the Prometheus HTTP endpoint (``cfg.server.metrics``) when non-empty.
    """

    def __init__(self, cfg: ServerConfig, *, serve_metrics: bool = True) -> None:
        self.cfg = cfg
        s = cfg.server
        if s.insecure:
            log.warning("INSECURE mode: no encryption, no authentication; any peer may join as any agent "
                        "(set server.insecure = false for production)")
        os.makedirs(s.data_dir, exist_ok=True)
        self.metrics = ServerMetrics()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.transport: Transport | None = None
        self.relay: Any = None  # fedgate.server.relay.Relay when cfg.relay is set
        self.history = History(os.path.join(s.data_dir, "history.db"))
        try:
            model = load_model_spec(cfg.federation.model, seed=cfg.federation.seed, file=cfg.path)
            checkpoints = CheckpointStore(os.path.join(s.data_dir, "checkpoints"), keep=s.keep_checkpoints)
            self.transport = Transport(
                s.bind, secret_key_path=s.secret_key, agents_dir=s.agents_dir, insecure=s.insecure,
                limits=TransportLimits(max_message_size=s.max_message_size, queue_depth=s.queue_depth,
                                       handshake_timeout_s=s.handshake_timeout_s, heartbeat_s=s.heartbeat_s,
                                       dead_after_s=s.dead_after_s, linger_s=s.linger_s),
                on_event=self._on_transport_event)
            coordinator_cls: type[Coordinator] = Coordinator
            if cfg.relay is not None:  # lazily: a plain server never loads the relay (nor agent code)
                from fedgate.server.relay_coordinator import RelayCoordinator as coordinator_cls
            elif cfg.federation.mode is FederationMode.ASYNC:  # buffered asynchronous rounds
                from fedgate.server.async_coordinator import AsyncCoordinator as coordinator_cls
            self.coordinator = coordinator_cls(cfg, model, self.transport.send, history=self.history,
                                               checkpoints=checkpoints, metrics=self.metrics,
                                               population=self._population)
            if cfg.relay is not None:
                from fedgate.server.relay import Relay

                self.relay = Relay(cfg, self.coordinator, self.metrics, self.transport.poller)
            self.metrics_port: int | None = None
            if serve_metrics and s.metrics:
                self.metrics_port = self.metrics.serve(s.metrics)
        except BaseException:
            self.close()
            raise
        self._bytes = (0, 0)

    @property
    def endpoint(self) -> str:
        """The bound endpoint (with the real port when ``bind`` asked for port 0)."""
        assert self.transport is not None
        return self.transport.endpoint

    def _population(self) -> int:
        if self.cfg.privacy.population:
            return self.cfg.privacy.population
        names = self.transport.allowed_names() if self.transport is not None else None
        return len(names) if names is not None else len(self.coordinator.registry.names())

    def _on_transport_event(self, kind: str, detail: str) -> None:
        if kind in _EVENT_METRIC:
            self.metrics.auth_failures.labels(_EVENT_METRIC[kind]).inc()
        elif kind == "disconnected":
            self.metrics.disconnects.inc()

    # ------------------------------------------------------------------ control
    def request_stop(self) -> None:
        """Ask the loop to stop (signal-safe: only sets a flag)."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask the loop to reload the config and the key allow-list (signal-safe)."""
        self._reload.set()

    def _do_reload(self) -> None:
        """SIGHUP: re-read the config and the key allow-list. The log level and the live
        ``[federation]`` keys (:data:`~fedgate.server.config.LIVE_FEDERATION_KEYS`) apply at
        once, from the next round on; other changes need a restart and are named. A broken
        config keeps the running one."""
        systemd.reloading()
        if self.cfg.path:
            try:
                new = load_config(self.cfg.path)
                applied, _ = self.coordinator.reconfigure(new.federation)
            except ConfigError as exc:
                log.error("reload: config not reloaded, keeping the running one: %s", exc)
            else:
                logging.getLogger().setLevel(new.server.log_level.upper())
                self.cfg = dataclasses.replace(self.cfg, federation=self.coordinator.fed,
                                               server=dataclasses.replace(self.cfg.server,
                                                                          log_level=new.server.log_level))
                if applied:
                    log.info("reload: [federation] %s applied from the next round on",
                             ", ".join(_toml_keys(self.cfg.federation, applied)))
                sections = ("server", "federation", "strategy", "privacy") + (("relay",) if new.relay else ())
                for section in sections:
                    old_s = getattr(self.cfg, section)
                    changed = changed_fields(old_s, getattr(new, section))
                    if changed:
                        log.warning("reload: [%s] %s changed; takes effect after a restart", section,
                                    ", ".join(_toml_keys(old_s, changed)))
        assert self.transport is not None
        n = self.transport.reload_keys()
        if n is not None:
            names = self.transport.allowed_names() or frozenset()
            for name in self.coordinator.registry.names():
                if name not in names:
                    log.warning("agent %s is no longer in the allow-list: its messages are refused", name)
                    self.coordinator.registry.drop(name)
        systemd.ready()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Serve until :meth:`request_stop`."""
        assert self.transport is not None
        watchdog_s = systemd.watchdog_interval_s()
        next_ping = 0.0
        next_tick = 0.0
        systemd.ready(f"serving {self.cfg.federation.name} on {self.endpoint}")
        log.info("federation %s ready on %s", self.cfg.federation.name, self.endpoint)
        relay = self.relay
        if relay is not None:
            log.info("relay %s: upstream %s", self.cfg.relay.name, self.cfg.relay.uplink.server)
            relay.start()
        try:
            while not self._stop.is_set():
                op = self.coordinator.open
                wait = 0.002 if self.coordinator.committing else 0.1
                if op is not None:
                    wait = min(wait, max(0.0, op.deadline - self.coordinator.clock()))
                for m in self.transport.poll(wait):
                    try:
                        self.coordinator.handle(m.routing_id, m.user_id, m.frames)
                    except FedgateError as exc:
                        log.error("message from %s not handled: %s", m.user_id or m.routing_id.hex(), exc)
                    del m  # release the frames before the next message is received
                if relay is not None:
                    relay.pump()
                now = time.monotonic()
                if now >= next_tick or self.coordinator.open is None or self.coordinator.committing:
                    try:
                        self.coordinator.tick()
                    except FedgateError as exc:
                        log.error("round bookkeeping failed: %s", exc)
                    next_tick = now + 0.05
                if self.coordinator.fatal is not None:
                    raise self.coordinator.fatal
                if self._reload.is_set():
                    self._reload.clear()
                    self._do_reload()
                self._count_bytes()
                if watchdog_s is not None and now >= next_ping:
                    systemd.watchdog_ping()
                    next_ping = now + watchdog_s
        finally:
            systemd.stopping()
            if relay is not None:
                relay.stop()
            self.coordinator.close()
            log.info("stopping (last committed round %d)", self.coordinator.committed)

    def _count_bytes(self) -> None:
        assert self.transport is not None
        bin_, bout = self.transport.bytes_in, self.transport.bytes_out
        if bin_ != self._bytes[0]:
            self.metrics.bytes_in.inc(bin_ - self._bytes[0])
        if bout != self._bytes[1]:
            self.metrics.bytes_out.inc(bout - self._bytes[1])
        self._bytes = (bin_, bout)

    def close(self) -> None:
        """Release sockets, threads and files (idempotent)."""
        if hasattr(self, "coordinator"):
            self.coordinator.close()
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.metrics.close()
        self.history.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _toml_keys(section: Any, names: list[str]) -> list[str]:
    """The keys as the file spells them (``round_timeout``, not the field ``round_timeout_s``)."""
    keys = {f.name: toml_key(f) for f in dataclasses.fields(section)}
    return [keys.get(n, n) for n in names]


def allowed_agents(cfg: ServerConfig) -> list[str]:
    """Names of the agents whose keys are in ``agents_dir`` (empty in insecure mode)."""
    if cfg.server.insecure or not cfg.server.agents_dir:
        return []
    return sorted(public_keys_in(cfg.server.agents_dir))
