"""Prometheus metrics of the server, on 127.0.0.1 by default.

Every instance has its own registry, so several servers (tests) can live in one
process. Names follow the Prometheus conventions (``fedgate_server_`` prefix, base
units, ``_total`` counters).
"""
from __future__ import annotations

import functools
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest, start_http_server

from fedgate.core.errors import ConfigError

__all__ = ["ServerMetrics", "REJECT_REASONS", "AUTH_REASONS"]

log = logging.getLogger(__name__)

REJECT_REASONS = ("identity", "unknown_task", "stale_round", "duplicate", "wrong_kind", "decode", "size",
                  "nonfinite", "norm", "empty", "bad_message", "version", "unknown_type", "not_registered")
AUTH_REASONS = ("unknown_key", "handshake", "revoked", "identity")


class ServerMetrics:
    """All server metrics in one registry; :meth:`serve` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("fedgate_server_rounds", "Committed rounds", ["kind"], registry=r)
        self.round_duration = Histogram("fedgate_server_round_duration_seconds", "Wall time of a committed round",
                                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                                                 60, 300, 900), registry=r)
        self.current_round = Gauge("fedgate_server_round", "Last committed train round", registry=r)
        self.agents_connected = Gauge("fedgate_server_connected_agents", "Registered, live agents", registry=r)
        self.accepted = Counter("fedgate_server_updates_accepted", "Results accepted", ["kind"], registry=r)
        self.rejected = Counter("fedgate_server_updates_rejected", "Results or messages refused, by reason",
                                ["reason"], registry=r)
        self.auth_failures = Counter("fedgate_server_auth_failures", "Refused handshakes and identities",
                                     ["reason"], registry=r)
        self.disconnects = Counter("fedgate_server_disconnects", "Peer connections closed", registry=r)
        self.bytes_in = Counter("fedgate_server_received_bytes", "Bytes received", registry=r)
        self.bytes_out = Counter("fedgate_server_sent_bytes", "Bytes sent", registry=r)
        self.dead_agents = Counter("fedgate_server_dead_agents", "Agents declared dead (silent)", registry=r)
        self.checkpoint_fallbacks = Counter("fedgate_server_checkpoint_fallback", "Corrupt checkpoints skipped",
                                            registry=r)
        self.last_checkpoint = Gauge("fedgate_server_last_checkpoint_timestamp_seconds",
                                     "Time of the last checkpoint", registry=r)
        self.next_round_start = Gauge("fedgate_server_next_round_start_timestamp_seconds",
                                      "When the next train round starts, while it waits for round_interval "
                                      "(0: not waiting)", registry=r)
        self.history_deleted = Counter("fedgate_server_history_rows_deleted",
                                       "History rows deleted as older than history_retention", registry=r)
        self.epsilon = Gauge("fedgate_server_privacy_epsilon", "Privacy spent (epsilon at delta)", registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for reason in AUTH_REASONS:
            self.auth_failures.labels(reason)
        for kind in ("statistics", "train", "evaluate"):
            self.accepted.labels(kind)
            self.rounds.labels(kind)
        self._http: Any = None
        self._thread: Any = None

    @functools.cached_property
    def staleness(self) -> Histogram:
        """Staleness (rounds) of accepted results; asynchronous mode only, so it is
        registered when first used (a synchronous server does not export it)."""
        return Histogram("fedgate_server_update_staleness", "Staleness (rounds) of accepted async results",
                         buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=self.registry)

    def serve(self, address: str) -> int:
        """Start the HTTP endpoint on ``HOST:PORT`` (port 0: any free one); returns the port."""
        host, _, port = address.rpartition(":")
        try:
            self._http, self._thread = start_http_server(int(port), addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot listen: {exc.strerror}", key="server.metrics", value=address) from exc
        bound = int(self._http.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._http = self._thread = None

    def text(self) -> str:
        """The exposition text (what a scrape returns)."""
        return generate_latest(self.registry).decode("utf-8")

    def value(self, name: str, **labels: str) -> float:
        """One sample's value (0.0 when absent), e.g. ``value("fedgate_server_updates_rejected_total", reason="norm")``."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else float(v)
