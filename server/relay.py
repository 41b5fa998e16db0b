"""The relay tier: a server that aggregates its gateways and is one agent of headquarters.

A relay is ``fedgate-server run`` with a ``[relay]`` section. It serves its gateways
like any server (same socket, keys and protocol) and talks to headquarters through the
agent's own :class:`~fedgate.agent.uplink.Uplink` (reconnects, CURVE client, durable
outbox in ``data_dir/relay.db``). This is the one module of ``fedgate.server`` that
imports the agent package, and only its uplink (which pulls no drivers); the service
imports it lazily, so a plain server never loads agent code.

Threads: the uplink runs on a thread of its own and calls :class:`RelayHandler` in its
worker thread. ``run_task`` puts a :class:`~fedgate.server.relay_coordinator.RelayRequest`
on a thread-safe queue, wakes the server loop (a pipe registered in the transport's
poller) and waits for the request's future; the loop (:meth:`Relay.pump`) hands it to
the :class:`~fedgate.server.relay_coordinator.RelayCoordinator`, which runs the local
round and completes the future. Headquarters' models and commit notices travel the same
way, so every piece of coordinator state is touched by the loop thread only.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import zmq

from fedgate.agent.uplink import Uplink
from fedgate.agent.uplink_types import GlobalModel, HelloInfo, Task, TaskOutcome, UplinkConfig
from fedgate.core.config import build, option, toml_key
from fedgate.core.errors import ConfigError, FedgateError, TrainingError
from fedgate.core.protocol import TaskKind, valid_agent_name
from fedgate.server.config import ServerConfig
from fedgate.server.metrics import ServerMetrics
from fedgate.server.relay_coordinator import (
    RelayCoordinator,
    RelayFailure,
    RelayRequest,
    check_upstream_task,
    local_deadline_s,
)

__all__ = ["RelaySection", "parse_relay_section", "RelayHandler", "Relay", "STATE_FILE", "read_state"]

log = logging.getLogger(__name__)

SOFTWARE = "fedgate-relay/0.1.0"
STATE_FILE = "relay_state.json"  # upstream state for ``fedgate-server status`` (rewritten about once a second)
_WAIT_MARGIN_S = 60.0            # a handler waits this much past the upstream deadline before giving up
_KINDS = frozenset(k.value for k in TaskKind)
_FAILURE_REASONS = ("spec", "quorum", "aggregation", "stopping", "timeout")


@dataclass(frozen=True, kw_only=True)
class _RelayKeys:
    name: str = option(doc="the relay's agent name at headquarters (its key file stem)")


@dataclass(frozen=True, kw_only=True)
class RelaySection:
    """The ``[relay]`` section: the relay's name at headquarters and its uplink's settings.

    ``uplink`` holds every other key of the section, exactly those of the agent's
    ``[uplink]`` (``server``, ``server_key``, ``secret_key``, ``insecure``, ``heartbeat``,
    ``dead_after``, ``hello_timeout``, ``reconnect_delay``, ``reconnect_delay_max``,
    ``max_message_size``).
    """

    name: str
    uplink: UplinkConfig


def parse_relay_section(table: Any, *, file: str, base_dir: str) -> RelaySection:
    """Build :class:`RelaySection` from the ``[relay]`` table; errors name file, key and value."""
    if not isinstance(table, dict):
        raise ConfigError("expected a table", file=file, key="relay", value=table)
    uplink_keys = {toml_key(f) for f in fields(UplinkConfig)}
    rest = {k: v for k, v in table.items() if k != "name"}
    unknown = [k for k in rest if k not in uplink_keys]
    if unknown:
        raise ConfigError(f"unknown key (allowed: {', '.join(sorted(uplink_keys | {'name'}))})", file=file,
                          key=f"relay.{unknown[0]}", value=rest[unknown[0]])
    keys = build(_RelayKeys, {"name": table["name"]} if "name" in table else {}, file=file, key="relay")
    if not valid_agent_name(keys.name):
        raise ConfigError("not a valid agent name (letters, digits, '.', '_', '-')", file=file,
                          key="relay.name", value=keys.name)
    try:
        uplink = build(UplinkConfig, rest, file=file, key="relay")
    except ConfigError as exc:
        if exc.file:
            raise
        key = (exc.key or "").replace("uplink.", "relay.", 1) or "relay"
        if exc.has_value:
            raise ConfigError(exc.reason, file=file, key=key, value=exc.value) from exc
        raise ConfigError(exc.reason, file=file, key=key) from exc
    for attr in ("server_key", "secret_key"):
        path = getattr(uplink, attr)
        if path:
            path = os.path.expanduser(path)
            uplink = replace(uplink, **{attr: path if os.path.isabs(path) else
                                        os.path.normpath(os.path.join(base_dir, path))})
    return RelaySection(name=keys.name, uplink=uplink)


class RelayHandler:
    """The relay's :class:`~fedgate.agent.uplink_types.TaskHandler`: tasks go to the server loop.

    Parameters
    ----------
    relay : Relay
        Owns the queue the requests go to and the loop that serves them.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def hello_info(self) -> HelloInfo:
        cfg = self.relay.cfg
        return HelloInfo(features=list(cfg.federation.features), n_samples=self.relay.n_samples)

    def run_task(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
        """Uplink worker thread: hand the task to the loop, wait for the local round's outcome."""
        relay = self.relay
        relay.count_task(task.kind)
        try:
            check_upstream_task(relay.cfg.federation, relay.spec, task.kind, task.round, task.spec,
                                task.features, task.label)
            kind = TaskKind(task.kind)
        except (TrainingError, ValueError) as exc:
            relay.count_failure("spec")
            raise TrainingError(str(exc)) from exc
        if kind is TaskKind.TRAIN and global_params is None:
            relay.count_failure("spec")
            raise TrainingError(f"upstream train task of round {task.round} carries no global params")
        req = RelayRequest(task_id=task.task_id, round=task.round, kind=kind,
                           local_s=local_deadline_s(relay.cfg.federation.round_timeout_s, task.deadline_s),
                           scaler=task.scaler, hyper=dict(task.hyper), codec=task.codec,
                           codec_params=dict(task.codec_params), params=global_params)
        relay.submit(req)
        try:
            outcome = req.future.result(timeout=task.deadline_s + _WAIT_MARGIN_S)
        except FutureTimeout as exc:
            relay.count_failure("timeout")
            raise TrainingError(f"upstream {task.kind} task of round {task.round}: no local outcome") from exc
        except RelayFailure as exc:
            raise TrainingError(str(exc)) from exc
        return TaskOutcome(n_samples=outcome.n_samples, metrics=dict(outcome.metrics), params=outcome.params,
                           stats=outcome.stats)

    def on_model(self, model: GlobalModel) -> None:
        """Uplink thread: headquarters' committed model; the loop checkpoints and publishes it."""
        self.relay.post(("model", model))


class Relay:
    """The relay's upstream side, owned by the server daemon.

    Parameters
    ----------
    cfg : ServerConfig
        With ``cfg.relay`` set.
    coordinator : RelayCoordinator
    metrics : ServerMetrics
        Relay metrics are added to its registry.
    poller : zmq.Poller
        The transport's poller: the relay's wake pipe is registered there so a request
        wakes the server loop at once.
    """

    def __init__(self, cfg: ServerConfig, coordinator: RelayCoordinator, metrics: ServerMetrics,
                 poller: zmq.Poller) -> None:
        from prometheus_client import Counter, Gauge

        assert cfg.relay is not None
        self.cfg = cfg
        self.coordinator = coordinator
        self.spec = coordinator.model.spec
        self.n_samples = 0
        self._requests: queue.SimpleQueue[RelayRequest] = queue.SimpleQueue()
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._join_by: float | None = None  # monotonic time by which the uplink starts (see start)
        self._rejoin = False  # a task failed for want of gateways: say hello again when they are back
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller: zmq.Poller | None = poller
        poller.register(self._wake_r, zmq.POLLIN)
        self._state_at = 0.0
        self._state: dict[str, Any] = {}
        r = metrics.registry
        self.m_connected = Gauge("fedgate_server_relay_upstream_connected",
                                 "1 while the relay is registered at headquarters", registry=r)
        self.m_committed = Gauge("fedgate_server_relay_upstream_committed_round",
                                 "Last round headquarters committed (as the relay knows it)", registry=r)
        self.m_outbox = Gauge("fedgate_server_relay_upstream_outbox",
                              "Results kept for headquarters until committed", registry=r)
        self.m_tasks = Counter("fedgate_server_relay_upstream_tasks", "Tasks received from headquarters",
                               ["kind"], registry=r)
        self.m_failures = Counter("fedgate_server_relay_upstream_failures",
                                  "Upstream tasks the relay could not answer, by reason", ["reason"], registry=r)
        for kind in TaskKind:
            self.m_tasks.labels(kind.value)
        for reason in _FAILURE_REASONS:
            self.m_failures.labels(reason)
        coordinator.on_failure = self.count_failure
        try:
            # a relay's task waits for a whole local round with almost no CPU: never on the link
            # thread; every commit notice of headquarters goes on to the loop
            self.uplink = Uplink(cfg.relay.uplink, agent_name=cfg.relay.name,
                                 db_path=os.path.join(cfg.server.data_dir, "relay.db"),
                                 handler=RelayHandler(self), software=SOFTWARE, inline_tasks=False,
                                 on_committed=lambda round_: self.post(("committed", round_)))
        except BaseException:
            self._close_pipe()
            raise

    # ------------------------------------------------------------------ any thread
    def count_task(self, kind: str) -> None:
        if kind in _KINDS:
            self.m_tasks.labels(kind).inc()

    def count_failure(self, reason: str) -> None:
        self.m_failures.labels(reason if reason in _FAILURE_REASONS else "aggregation").inc()
        if reason == "quorum":  # once the gateways are back, ask headquarters for the task again
            self._rejoin = True

    def submit(self, req: RelayRequest) -> None:
        """Uplink worker thread: queue an upstream task for the loop and wake it."""
        if self._stopping:
            self.count_failure("stopping")
            req.fail("stopping", "the relay is stopping")
            return
        self._requests.put(req)
        self._wake()

    def post(self, event: tuple[str, Any]) -> None:
        """Uplink thread: queue a model or commit notice for the loop and wake it."""
        self._events.put(event)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # a full pipe: the loop is awake anyway; closed: stopping
            pass

    # ------------------------------------------------------------------ loop thread
    def start(self) -> None:
        """Join headquarters once the local quorum is ready (:meth:`pump` starts the uplink).

        A relay that said hello before its gateways came back would be sampled, fail
        its task for want of gateways, and leave headquarters' round waiting for an
        answer; so the uplink starts when ``max(min_agents, min_available)`` gateways
        are ready, or after ``round_timeout`` at the latest.
        """
        self._join_by = time.monotonic() + self.cfg.federation.round_timeout_s

    def _start_uplink(self) -> None:
        self.n_samples = sum(a.n_samples for a in self.coordinator.registry.alive())
        log.info("relay: %d gateways ready; joining headquarters at %s", self.coordinator.registry.n_alive(),
                 self.cfg.relay.uplink.server)
        self._thread = threading.Thread(target=self.uplink.serve, name="relay-uplink", daemon=True)
        self._thread.start()

    def pump(self) -> None:
        """Loop thread, every turn: take upstream events and the next request; refresh the state."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        co = self.coordinator
        if self._thread is None and self._join_by is not None and not self._stopping:
            if self._quorum() or time.monotonic() >= self._join_by:
                self._join_by = None
                self._start_uplink()
        elif self._rejoin and co.idle and self._thread is not None and self._quorum():
            self._rejoin = False
            log.info("relay: %d gateways ready again; saying hello to headquarters so it re-sends its task",
                     co.registry.n_alive())
            self.uplink.rejoin()
        while True:
            try:
                what, value = self._events.get_nowait()
            except queue.Empty:
                break
            if what == "model":
                co.upstream_model(value.round, value.params, value.scaler)
            else:
                co.upstream_committed(int(value))
        if co.idle and not self._stopping:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                pass
            else:
                log.debug("relay: upstream %s task of round %d", req.kind.value, req.round)
                co.take(req)
        now = time.monotonic()
        if now - self._state_at >= 1.0:
            self._state_at = now
            if self._thread is not None and not self._thread.is_alive() and not self._stopping:
                raise FedgateError("the relay's uplink to headquarters stopped unexpectedly (see the log)")
            self.n_samples = sum(a.n_samples for a in co.registry.alive())
            self._write_state()

    def _quorum(self) -> bool:
        fed = self.cfg.federation
        return self.coordinator.registry.n_alive() >= max(fed.min_agents, fed.min_available)

    def stop(self) -> None:
        """Fail what is being served, stop the uplink and wait for its thread (loop thread)."""
        self._stopping = True
        self.coordinator.fail_all("stopping", "the relay is stopping")
        while True:
            try:
                self._requests.get_nowait().fail("stopping", "the relay is stopping")
            except queue.Empty:
                break
        self.uplink.stop()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self._write_state()

    def close(self) -> None:
        """Release the uplink's state file and the wake pipe (after :meth:`stop`)."""
        if self._thread is not None:
            self.stop()
        self.uplink.close()
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._poller is not None:
            try:
                self._poller.unregister(self._wake_r)
            except KeyError:
                pass
            self._poller = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    # ------------------------------------------------------------------ reports
    def status(self) -> dict[str, Any]:
        """The upstream side: headquarters' endpoint, link state, commits, outbox, counters."""
        up = self.uplink.status()
        co = self.coordinator
        serving = co.request or (co.evaluation.request if co.evaluation is not None else None)
        return {
            "relay": True, "name": self.cfg.relay.name, "upstream": up["server"], "connected": up["connected"],
            "joined": self._thread is not None, "stopped": self._stopping,
            "federation": up["federation"], "upstream_round": up["last_round"],
            "upstream_committed_round": up["last_committed_round"], "last_contact_ts": up["last_contact_ts"],
            "outbox": up["outbox"], "refused": up["refused"], "local_rounds": co.local_rounds,
            "gateways_committed_round": co.gateways_committed,
            "serving": None if serving is None else {"round": serving.round, "kind": serving.kind.value},
            "gateways_alive": co.registry.n_alive(), "written": time.time(),
            "counters": {k: v for k, v in up["counters"].items()
                         if k.startswith(("tasks_", "results_", "reconnects", "models", "rejoins"))},
        }

    def _write_state(self) -> None:
        try:
            state = self.status()
        except FedgateError as exc:
            log.debug("relay: state not refreshed: %s", exc)
            return
        self.m_connected.set(1 if state["connected"] else 0)
        if state["upstream_committed_round"] is not None:
            self.m_committed.set(state["upstream_committed_round"])
        self.m_outbox.set(state["outbox"])
        self._state = state
        path = os.path.join(self.cfg.server.data_dir, STATE_FILE)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(state, fh, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("relay: cannot write %s: %s", path, exc)


def read_state(data_dir: str) -> dict[str, Any] | None:
    """The relay state the daemon last wrote (None when there is none)."""
    try:
        with open(os.path.join(data_dir, STATE_FILE)) as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None
