"""The round state machine: registry, statistics round, train rounds, commits.

Round 0 is the statistics round (when enabled): every ready agent reports the
count/mean/M2 of the federation's features, merged into the global scaler. Train
rounds 1..R then sample ``fraction`` of the ready agents (at least ``min_agents``,
deterministically from ``seed`` and the round), send each a task with a fresh nonce,
and aggregate when every sampled agent answered, or at the deadline when at least
``min_agents`` did; otherwise the round waits (and says why). A committed round is
checkpointed, written to the history, announced (``committed``), and the new model
is broadcast; agents then evaluate it.

Exactly-once: tasks are persisted before they are sent; results are accepted only for
a task of the open round, from the agent it was sent to, once. Agents keep results
until ``committed`` arrives, so a server killed mid-round resumes the same round
from its checkpoint and task table and takes the re-sent results again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedgate.core import codec
from fedgate.core.errors import StoreError
from fedgate.core.protocol import Message, MessageError, MsgType, TaskKind, decode, encode
from fedgate.server.commits import Commits
from fedgate.server.config import LIVE_FEDERATION_KEYS, FederationSection, ServerConfig, check_rules
from fedgate.server.metrics import ServerMetrics
from fedgate.server.privacy import PrivacyAccountant, clip_update
from fedgate.server.registry import Registry
from fedgate.server.rounds import _ROUND_MARK, MetricMeans, OpenRound, RoundClock
from fedgate.server.schedule import HistoryPruner, RoundSchedule, merge_live
from fedgate.server.spec import FederationModel
from fedgate.server.store import Checkpoint, CheckpointStore, CheckpointWriter, History
from fedgate.server.strategies import make_strategy
from fedgate.server.validate import Rejected, UpdateValidator, check_update

__all__ = ["Coordinator", "OpenRound", "MetricMeans"]

log = logging.getLogger(__name__)

Send = Callable[[bytes, list[Any]], bool]
_HEARTBEAT = encode(MsgType.HEARTBEAT, {})
# ack headers are built by splicing the (validated, hex) nonce into a fixed template
_ACK_HEAD = b'{"v":1,"type":"ack","task_id":"'
_ACK_TAIL = {status: f'","status":"{status}"}}'.encode() for status in ("accepted", "duplicate")}


class Coordinator(RoundClock, Commits):
    """Runs the federation; the service feeds it messages and calls :meth:`tick`."""

    live_keys: tuple[str, ...] = LIVE_FEDERATION_KEYS  # [federation] keys :meth:`reconfigure` applies

    def __init__(self, cfg: ServerConfig, model: FederationModel, send: Send, *, history: History,
                 checkpoints: CheckpointStore, metrics: ServerMetrics,
                 population: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.fed = cfg.federation
        self.model = model
        self.send = send
        self.history = history
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.population = population
        self.clock = clock
        self.registry = Registry()
        self.strategy = make_strategy(cfg.strategy, model.n_params)
        self.validator = UpdateValidator(model.n_params, cfg.strategy.max_update_norm)
        self.accountant = PrivacyAccountant(cfg.privacy)
        self.params = model.initial_params()
        self.scaler: tuple[np.ndarray, np.ndarray] | None = None
        self.committed = -1          # last committed round (-1: nothing, 0: statistics)
        self.have_model = False      # a train round has been committed
        self.open: OpenRound | None = None
        self.eval_seen: set[str] = set()
        self.task_models: set[str] = set()   # agents that take the global model from their tasks (hello)
        self.quiet_acks: set[str] = set()    # agents that want no ack for an accepted result (hello)
        self.task_commits: set[str] = set()  # agents that take commit notices in their tasks (hello)
        self.durable = -1                    # last round whose checkpoint is on disk (announced)
        self._owed: set[str] = set()         # agents owed a notice of the last durable round
        self._owed_since = math.inf          # since when the oldest unpaid notice is owed
        self._round_logged: dict[str, float] = {}  # "started"/"committed" -> last logged at INFO
        self.eval_rows: list[tuple[str, int, str, int, dict[str, float]]] = []
        self.fatal: StoreError | None = None
        self.writer = CheckpointWriter(checkpoints)
        self.max_pending_checkpoints = 8   # commits not yet announced (the writer holds at most two checkpoints)
        self._dp_scratch: np.ndarray | None = None
        self._q8_in_place = self.strategy.streaming and not cfg.privacy.enabled
        self._task_templates: dict[TaskKind, tuple[Any, bytes | None]] = {}
        self._model_template: tuple[Any, bytes | None] | None = None
        self._accepted = {kind: metrics.accepted.labels(kind.value) for kind in TaskKind}
        self.schedule = RoundSchedule(self.fed.round_interval_s, clock, history.last_started(TaskKind.TRAIN.value),
                                      metrics)
        self.pruner = HistoryPruner(history, cfg.server.history_retention_s, metrics)
        self._restore()

    # ================================================================ restore / persist
    def _restore(self) -> None:
        ckpt, path = self.checkpoints.load_latest()
        for _ in range(self.checkpoints.fallbacks):
            self.metrics.checkpoint_fallbacks.inc()
        if ckpt is None:
            log.info("no checkpoint: starting federation %s from scratch", self.fed.name)
        else:
            meta = ckpt.meta
            if meta.get("n_params") != self.model.n_params or meta.get("features") != list(self.fed.features):
                raise StoreError(f"{path}: checkpoint is for a different model or feature list "
                                 f"(n_params {meta.get('n_params')}, features {meta.get('features')}); "
                                 f"move {self.checkpoints.dir} away to start over")
            self.params = np.ascontiguousarray(ckpt.arrays["params"], dtype=np.float32)
            if "scaler_mean" in ckpt.arrays:
                self.scaler = (ckpt.arrays["scaler_mean"].astype(np.float32),
                               ckpt.arrays["scaler_std"].astype(np.float32))
            self.strategy.load_state({k.split(".", 1)[1]: v for k, v in ckpt.arrays.items()
                                      if k.startswith("strategy.")})
            self.accountant = PrivacyAccountant(self.cfg.privacy, meta.get("privacy_rates", []))
            self.committed = ckpt.round if ckpt.phase == "train" else (0 if ckpt.phase == "statistics" else -1)
            self.have_model = ckpt.phase == "train" and ckpt.round >= 1
            log.info("resumed from %s: phase %s, round %d (sha256 of params %s)", path, ckpt.phase, ckpt.round,
                     _digest(self.params))
        self.durable = max(self.durable, self.committed)  # its checkpoint is on disk
        self.metrics.current_round.set(max(self.committed, 0))
        self._encode_model()
        self._reopen()

    def _reopen(self) -> None:
        """Reopen the interrupted round from the task table, if it has tasks."""
        rnd, kind = self.next_round()
        # tasks of a round that was started before its predecessor's checkpoint was written
        self.history.expire_tasks_after(rnd)
        if kind is None:
            return
        rows = [t for t in self.history.tasks_of(rnd, kind.value) if t.status != "expired"]
        if not rows:
            return
        now = self.clock()
        self.open = OpenRound(rnd, kind, {t.task_id: t.agent for t in rows}, now, now + self.fed.round_timeout_s)
        self._prepare_round(self.open)
        self.history.set_task_status((t.task_id, "issued") for t in rows)
        log.info("resuming %s round %d with its %d issued tasks; agents re-send their results",
                 kind.value, rnd, len(rows))

    def next_round(self) -> tuple[int, TaskKind | None]:
        """The round to run next (or running): (number, kind), kind None when finished."""
        if self.committed < 0 and self.fed.statistics:
            return 0, TaskKind.STATISTICS
        rnd = max(self.committed, 0) + 1
        if rnd > self.fed.rounds:
            return rnd, None
        return rnd, TaskKind.TRAIN

    def _make_checkpoint(self, phase: str, *, params: np.ndarray | None = None,
                         scaler: tuple[np.ndarray, np.ndarray] | None = None,
                         extra: dict[str, Any] | None = None) -> Checkpoint:
        """The checkpoint of the committed state (``params``/``scaler``: other than this
        coordinator's own; ``extra``: more header fields)."""
        scaler = self.scaler if scaler is None else scaler
        arrays: dict[str, np.ndarray] = {"params": self.params if params is None else params}
        if scaler is not None:
            arrays["scaler_mean"], arrays["scaler_std"] = scaler
        for name, vec in self.strategy.state().items():
            arrays[f"strategy.{name}"] = vec.copy()  # updated in place by the next round
        meta = {"federation": self.fed.name, "spec": self.model.spec, "features": list(self.fed.features),
                "label": self.fed.label, "n_params": self.model.n_params, "strategy": self.strategy.name,
                "privacy_rates": list(self.accountant.rates), **(extra or {})}
        return Checkpoint(round=max(self.committed, 0), phase=phase, arrays=arrays, meta=meta, created=time.time())

    def _encode_model(self) -> None:
        """Encode the global model once; the same frames go to every agent."""
        self._payload = codec.encode(self.params, self.fed.download_codec)
        if self.fed.download_codec == "f32":  # keep one copy: the global model is a view on its encoding
            self.params = np.frombuffer(self._payload, dtype="<f4", count=self.model.n_params,
                                        offset=codec.HEADER_SIZE)
        scaler = None if self.scaler is None else {"mean": self.scaler[0].tolist(), "std": self.scaler[1].tolist()}
        self._scaler_dict = scaler
        rnd = max(self.committed, 0)
        if self._model_template is None or self._model_template[0] is not self.scaler:  # validated once
            head = self._model_header(0, scaler)
            self._model_template = (self.scaler, head if head.count(_ROUND_MARK) == 1 else None)
        template = self._model_template[1]
        head = self._model_header(rnd, scaler) if template is None else \
            template.replace(_ROUND_MARK, b'"round":%d,' % rnd, 1)
        self._model_frames = [head, self._payload]

    def _model_header(self, rnd: int, scaler: dict[str, Any] | None, payload: bytes | None = None) -> bytes:
        """The ``model`` header for ``payload`` (default: this coordinator's encoded model)."""
        head = encode(MsgType.MODEL, {
            "round": rnd, "spec": self.model.spec, "features": list(self.fed.features),
            "label": self.fed.label, "scaler": scaler}, self._payload if payload is None else payload)[0]
        assert isinstance(head, bytes)
        return head

    # ================================================================ messages
    def handle(self, rid: bytes, user_id: str | None, frames: list[Any]) -> None:
        """One message from the transport (``user_id`` None in insecure mode)."""
        try:
            msg = decode(frames)
        except MessageError as exc:
            self.metrics.rejected.labels(exc.code.value).inc()
            log.warning("malformed message from %s refused (%s): %s", user_id or rid.hex(), exc.code.value, exc)
            self._error(rid, exc.code.value, str(exc))
            return
        now = self.clock()
        if msg.type is MsgType.HELLO:
            self._on_hello(rid, user_id, msg, now)
            return
        agent = self.registry.by_routing_id(rid)
        if agent is None:
            self.metrics.rejected.labels("not_registered").inc()
            self._error(rid, "not_registered", "say hello first")
            return
        claimed = msg.fields.get("agent", agent.name)
        if (user_id is not None and user_id != agent.name) or claimed != agent.name:
            self._refuse_identity(rid, user_id, claimed, agent.name)
            return
        self.registry.touch(agent, now)
        if msg.type is MsgType.HEARTBEAT:
            self.send(rid, _HEARTBEAT)
        elif msg.type is MsgType.RESULT:
            self._on_result(rid, agent.name, msg, now)
        elif msg.type is MsgType.BYE:
            self.registry.drop(agent.name)
            self.history.set_agent_state(agent.name, "left")
            log.info("agent %s said bye", agent.name)
        else:
            self.metrics.rejected.labels("unknown_type").inc()
            self._error(rid, "unknown_type", f"agents do not send {msg.type.value}")

    def _error(self, rid: bytes, code: str, message: str) -> None:
        self.send(rid, encode(MsgType.ERROR, {"code": code, "message": message[:4000]}))

    def _refuse_identity(self, rid: bytes, user_id: str | None, claimed: str, registered: str | None) -> None:
        self.metrics.rejected.labels("identity").inc()
        self.metrics.auth_failures.labels("identity").inc()
        log.warning("identity mismatch: connection authenticated as %r (registered %r) claims %r; refused",
                    user_id, registered, claimed)
        self.history.add_rejection(None, user_id or claimed, None, "identity",
                                   f"authenticated {user_id!r} claimed {claimed!r}")
        self._error(rid, "unauthorized", f"this connection may not speak for {claimed!r}")

    def _on_hello(self, rid: bytes, user_id: str | None, msg: Message, now: float) -> None:
        f = msg.fields
        name = f["agent"]
        if user_id is not None and user_id != name:
            self._refuse_identity(rid, user_id, name, None)
            return
        missing = [x for x in self.fed.features if x not in set(f["features"])]
        if missing:
            log.warning("agent %s refused: it lacks features %s", name, ", ".join(missing))
            self.send(rid, encode(MsgType.REFUSE, {
                "code": "missing_features", "missing": missing,
                "message": f"federation {self.fed.name} needs features the agent cannot produce: "
                           + ", ".join(missing)}))
            return
        self.registry.register(name, rid, software=f["software"], n_samples=f["n_samples"], now=now)
        for flag, members in (("task_models", self.task_models), ("quiet_acks", self.quiet_acks),
                              ("task_commits", self.task_commits)):
            if f.get(flag):
                members.add(name)
            else:
                members.discard(name)
        owed = name in self._owed
        self._forget_owed(name)
        self.history.upsert_agent(name, software=f["software"], n_samples=f["n_samples"], state="ready")
        self.metrics.agents_connected.set(self.registry.n_alive())
        log.info("agent %s registered (%s, %d samples)", name, f["software"], f["n_samples"])
        rnd, _ = self.next_round()
        self.send(rid, encode(MsgType.WELCOME, {
            "federation": self.fed.name, "round": rnd, "heartbeat_s": self.cfg.server.heartbeat_s,
            "spec": self.model.spec, "features": list(self.fed.features), "label": self.fed.label}))
        if self.have_model and self.durable >= self.committed:  # else it comes once its checkpoint is on disk
            self.send(rid, self._model_frames)
        if owed:  # a notice held back for the previous connection
            self.send(rid, encode(MsgType.COMMITTED, {"round": self.durable}))
        op = self.open
        if op is not None:  # re-send its pending task of the open round (same nonce)
            for tid, agent in op.tasks.items():
                if agent == name and tid not in op.done:
                    self._send_task(op, tid, rid, name=name)

    # ---------------------------------------------------------------- results
    def _on_result(self, rid: bytes, name: str, msg: Message, now: float) -> None:
        f = msg.fields
        tid = f["task_id"]
        op = self.open
        try:
            if f["kind"] == TaskKind.EVALUATE:  # a str enum: compares as its value
                self._on_evaluation(name, f)
                if name not in self.quiet_acks:
                    self._ack(rid, tid, "accepted")
                return
            if op is None or tid not in op.tasks:
                row = self.history.task(tid)
                if row is None:
                    raise Rejected("unknown_task", f"task {tid} was never issued")
                raise Rejected("stale_round", f"task {tid} belongs to {row.kind} round {row.round}, "
                                              f"which is closed")
            if op.tasks[tid] != name:
                raise Rejected("identity", f"task {tid} was sent to {op.tasks[tid]}, not {name}")
            if f["round"] != op.round or f["kind"] != op.kind:
                raise Rejected("wrong_kind", f"task {tid} is {op.kind.value} round {op.round}, result says "
                                             f"{f['kind']} round {f['round']}")
            if tid in op.done:
                self.metrics.rejected.labels("duplicate").inc()
                self._ack(rid, tid, "duplicate", "already received")
                return
            if op.kind is TaskKind.STATISTICS:
                self._take_stats(op, f)
            else:
                self._take_update(op, f, msg.payload)
        except Rejected as rej:
            self.metrics.rejected.labels(rej.reason).inc()
            log.warning("result of %s for task %s refused: %s", name, tid, rej)
            self.history.add_rejection(f.get("round"), name, tid, rej.reason, rej.detail)
            if op is not None and tid in op.tasks and op.tasks[tid] == name and tid not in op.done \
                    and rej.reason not in ("identity", "wrong_kind"):
                op.done[tid] = "rejected"
            self._ack(rid, tid, "rejected", rej.reason)
            return
        op.done[tid] = "accepted"
        self._accepted[op.kind].inc()
        n = f["n_samples"]
        op.rows.append((tid, name, n, f["metrics"]))
        op.metrics.add(f["metrics"], n)
        if name not in self.quiet_acks:  # such an agent keeps the result until committed either way
            self._ack(rid, tid, "accepted")
        if len(op.done) == len(op.tasks):
            self._close(now)

    def _take_stats(self, op: OpenRound, f: dict[str, Any]) -> None:
        stats = f.get("stats")
        width = len(self.fed.features)
        if stats is None or len(stats["mean"]) != width:
            raise Rejected("size", f"statistics must cover the {width} features")
        op.stats.append((stats["count"], np.asarray(stats["mean"]), np.asarray(stats["m2"])))

    def _take_update(self, op: OpenRound, f: dict[str, Any], payload: memoryview | None) -> None:
        if f["n_samples"] < 1:
            raise Rejected("empty", "a train result must report n_samples >= 1")
        weight = float(f["n_samples"])
        head = self.validator.header(payload)
        if head.delta or head.codec is codec.Codec.TOPK:  # params, also from deltas
            vec, _ = check_update(self.validator, payload, self.params, self.strategy.buffer)
        elif head.codec is codec.Codec.Q8 and self._q8_in_place:  # checked and summed straight from the frame
            self.validator.check_q8(payload, head, self.params)  # type: ignore[arg-type]
            self.strategy.add_q8(payload, codec.HEADER_SIZE, head.param, weight)  # type: ignore[arg-type]
            return
        else:
            vec, _ = self.validator.check(payload, self.params, self.strategy.buffer, head)
        if self.cfg.privacy.enabled:
            out = self.strategy.buffer()
            if vec.ctypes.data != out.ctypes.data:
                np.copyto(out, vec)
                vec = out
            if self._dp_scratch is None:
                self._dp_scratch = np.empty(self.model.n_params, dtype=np.float32)
            clip_update(vec, self.params, self.cfg.privacy.clip_norm, self._dp_scratch)
            weight = 1.0
        self.strategy.add(vec, weight)

    def _on_evaluation(self, name: str, f: dict[str, Any]) -> None:
        tid = f["task_id"]
        if tid in self.eval_seen:
            raise Rejected("duplicate", f"evaluation {tid} already recorded")
        row = self.history.task(tid)
        if row is None or row.kind != TaskKind.EVALUATE.value:
            raise Rejected("unknown_task", f"evaluation task {tid} was never issued")
        if row.agent != name:
            raise Rejected("identity", f"task {tid} was sent to {row.agent}, not {name}")
        if row.status == "accepted":
            raise Rejected("duplicate", f"evaluation {tid} already recorded")
        self.eval_seen.add(tid)
        self.eval_rows.append((tid, row.round, name, f["n_samples"], f["metrics"]))
        self.metrics.accepted.labels("evaluate").inc()

    def _ack(self, rid: bytes, tid: str, status: str, reason: str | None = None) -> None:
        if reason is None:
            self.send(rid, [_ACK_HEAD + tid.encode("ascii") + _ACK_TAIL[status]])
            return
        fields: dict[str, Any] = {"task_id": tid, "status": status}
        if reason:
            fields["reason"] = reason
        self.send(rid, encode(MsgType.ACK, fields))

    # ================================================================ reload
    def reconfigure(self, fed: FederationSection) -> tuple[list[str], list[str]]:
        """Take the live keys (:attr:`live_keys`) of a reloaded ``[federation]``.

        They apply from the next round on (the open one keeps its tasks and deadline).

        Returns
        -------
        (applied, restart)
            The changed keys applied, and the changed keys that need a restart.

        Raises
        ------
        ConfigError
            The running federation with the new live keys breaks a rule between keys
            (e.g. ``min_agents`` too low for the running Krum); nothing is applied.
        """
        merged, applied, restart = merge_live(self.fed, fed, self.live_keys)
        if applied:
            check_rules(merged, self.cfg.strategy, self.cfg.privacy, relay=self.cfg.relay is not None,
                        file=self.cfg.path or "<config>")
            self.fed = merged
            self.cfg = dataclasses.replace(self.cfg, federation=merged)
            self._task_templates.clear()  # hyper-parameters and deadline ride in the task header
            self.schedule.interval_s = merged.round_interval_s
            self._reconfigured()
        return applied, restart

    def _reconfigured(self) -> None:
        """After :meth:`reconfigure` changed ``self.fed`` (a subclass updates what it derives from it)."""

    # ================================================================ reports
    def status(self) -> dict[str, Any]:
        op = self.open
        rnd, kind = self.next_round()
        return {
            "federation": self.fed.name, "committed_round": self.committed, "next_round": rnd,
            "phase": "done" if kind is None else kind.value,
            "open": None if op is None else {"round": op.round, "kind": op.kind.value, "tasks": len(op.tasks),
                                             "done": len(op.done)},
            "agents_alive": self.registry.n_alive(),
            "epsilon": self.accountant.epsilon() if self.cfg.privacy.enabled else None,
        }

    @property
    def finished(self) -> bool:
        return self.open is None and self.next_round()[1] is None


def _digest(vec: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(vec)).cast("B")).hexdigest()[:16]
