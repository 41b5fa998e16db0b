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
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedgate.core import aggregate as agg
from fedgate.core import codec
from fedgate.core.errors import AggregationError, StoreError
from fedgate.core.protocol import Message, MessageError, MsgType, TaskKind, decode, encode, new_task_ids
from fedgate.server.config import LIVE_FEDERATION_KEYS, FederationSection, ServerConfig, check_rules
from fedgate.server.metrics import ServerMetrics
from fedgate.server.privacy import PrivacyAccountant, add_noise, clip_update
from fedgate.server.registry import Registry
from fedgate.server.schedule import HistoryPruner, RoundSchedule, merge_live
from fedgate.server.spec import FederationModel
from fedgate.server.store import Checkpoint, CheckpointStore, CheckpointWriter, History, TaskRow
from fedgate.server.strategies import make_strategy
from fedgate.server.validate import Rejected, UpdateValidator, check_update

__all__ = ["Coordinator", "OpenRound"]

log = logging.getLogger(__name__)

Send = Callable[[bytes, list[Any]], bool]
_TID_MARK = b'"task_id":"' + b"0" * 32 + b'"'
_ROUND_MARK = b'"round":0,'
_HEARTBEAT = encode(MsgType.HEARTBEAT, {})
_COMMIT_HOLD_S = 1.0  # longest a commit notice waits for the agent's next task (see _broadcast)
# ack headers are built by splicing the (validated, hex) nonce into a fixed template
_ACK_HEAD = b'{"v":1,"type":"ack","task_id":"'
_ACK_TAIL = {status: f'","status":"{status}"}}'.encode() for status in ("accepted", "duplicate")}


class MetricMeans:
    """Sample-weighted means of the metrics agents report, each over the agents that
    reported it (an agent whose data hold one class reports no AUC; it must not count as 0).

    >>> m = MetricMeans(); m.add({"loss": 1.0, "auc": 0.8}, 30); m.add({"loss": 3.0}, 10)
    >>> m.result()
    {'loss': 1.5, 'auc': 0.8}
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict[str, float], n_samples: int) -> None:
        w = float(max(n_samples, 1))
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + value * w
            self._weights[key] = self._weights.get(key, 0.0) + w

    def result(self) -> dict[str, float]:
        return {k: v / self._weights[k] for k, v in self._sums.items()}


@dataclass
class OpenRound:
    """The round in progress (in memory; its tasks are also in the history)."""

    round: int
    kind: TaskKind
    tasks: dict[str, str]                      # task_id -> agent
    started: float
    deadline: float
    done: dict[str, str] = field(default_factory=dict)    # task_id -> "accepted" | "rejected"
    stats: list[tuple[int, np.ndarray, np.ndarray]] = field(default_factory=list)
    metrics: MetricMeans = field(default_factory=lambda: MetricMeans())
    rows: list[tuple[str, str, int, dict[str, float]]] = field(default_factory=list)
    header: bytes = b""
    waiting_logged: float = 0.0
    unsent: dict[str, str] = field(default_factory=dict)  # task_id -> agent: send failed, retried by tick
    n_ready: int = 0                           # agents ready when it was sampled (for the log)
    finished: float = 0.0                      # wall time when it was aggregated
    closed: float = 0.0                        # clock() then
    epsilon: float | None = None               # privacy spent after it (DP)

    @property
    def accepted(self) -> int:
        return sum(1 for s in self.done.values() if s == "accepted")


class Coordinator:
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
        if self.have_model:
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

    # ================================================================ the clock
    def tick(self) -> None:
        """Deadlines, dead agents, starting rounds; call often (every loop turn)."""
        self._finish_commit(block=False)
        now = self.clock()
        if now - self._owed_since > _COMMIT_HOLD_S:  # no task came to carry them
            self._pay_owed(set())
        for name in self.registry.expire(now, self.cfg.server.dead_after_s):
            self.metrics.dead_agents.inc()
            log.warning("agent %s silent for more than %.0fs: marked dead", name, self.cfg.server.dead_after_s)
            self.history.set_agent_state(name, "dead")
        self.metrics.agents_connected.set(self.registry.n_alive())
        if self.eval_rows:
            self._flush_evaluations()
        self.pruner.tick(now, self._prunable_round())
        op = self.open
        if op is not None and op.unsent:
            self._retry_unsent(op)
        if op is None:
            self._maybe_start(now)
        elif now >= op.deadline:
            self._deadline(op, now)

    def _prunable_round(self) -> int:
        """The last round whose history rows no result can still need (evaluations of the
        newest committed round may still come in)."""
        return self.committed - 1

    def _maybe_start(self, now: float) -> None:
        op = self._open_round(now)
        if op is not None:
            self._send_round(op)

    def _open_round(self, now: float) -> OpenRound | None:
        """Sample the next round and write its tasks to the history (sent by :meth:`_send_round`)."""
        rnd, kind = self.next_round()
        if kind is None or (kind is TaskKind.TRAIN and self.schedule.hold(rnd, now)):
            return None
        ready = self.registry.alive_names()
        need = self.fed.min_agents
        if len(ready) < max(need, self.fed.min_available):
            if now - getattr(self, "_last_wait_log", -1e9) > 30:
                self._last_wait_log = now
                log.info("%s round %d waits for agents: %d ready, need %d", kind.value, rnd, len(ready),
                         max(need, self.fed.min_available))
            return None
        k = len(ready) if kind is TaskKind.STATISTICS else \
            min(len(ready), max(need, math.ceil(self.fed.fraction * len(ready))))
        if k == len(ready):  # everyone (a sample of all, sorted, is the sorted list itself)
            chosen = ready
        else:
            rng = np.random.default_rng([self.fed.seed, rnd])
            chosen = sorted(rng.choice(ready, size=k, replace=False).tolist())
        tasks = dict(zip(new_task_ids(len(chosen)), chosen))
        self.history.add_tasks(TaskRow(tid, rnd, kind.value, name, time.time(), "issued")
                               for tid, name in tasks.items())
        op = OpenRound(rnd, kind, tasks, now, now + self.fed.round_timeout_s)
        if kind is TaskKind.TRAIN:
            self.schedule.start(now)
        op.n_ready = len(ready)
        self._prepare_round(op)
        self.open = op
        return op

    def _send_round(self, op: OpenRound) -> None:
        """Send the tasks of a round just opened (their rows are committed to the history)."""
        for tid, name in op.tasks.items():
            agent = self.registry.get(name)
            if agent is not None:
                self._send_task(op, tid, agent.routing_id, name=name)
        log.log(self._round_log_level("started"), "%s round %d started with %d of %d ready agents", op.kind.value,
                op.round, len(op.tasks), op.n_ready)

    def _prepare_round(self, op: OpenRound) -> None:
        if op.kind is TaskKind.TRAIN:
            self.strategy.begin(self.params, expected=len(op.tasks))
        op.header = self._task_header(op.round, op.kind)

    def _task_header(self, rnd: int, kind: TaskKind) -> bytes:
        """The task header of a round with a zero nonce; everything but the round number is
        fixed between statistics rounds, so it is built and validated once per kind and scaler."""
        cached = self._task_templates.get(kind)
        if cached is None or cached[0] is not self.scaler:
            template = self._build_task_header(0, kind)
            cached = (self.scaler, template if template.count(_ROUND_MARK) == 1 else None)
            self._task_templates[kind] = cached
        if cached[1] is None:  # the marker is not unique (e.g. a "round" key in the spec)
            return self._build_task_header(rnd, kind)
        return cached[1].replace(_ROUND_MARK, b'"round":%d,' % rnd, 1)

    def _build_task_header(self, rnd: int, kind: TaskKind) -> bytes:
        fed = self.fed
        fields = {
            "task_id": "0" * 32, "round": rnd, "kind": kind.value, "deadline_s": fed.round_timeout_s,
            "spec": self.model.spec, "features": list(fed.features), "label": fed.label,
            "scaler": self._scaler_dict,
            "hyper": {"epochs": fed.local_epochs, "batch_size": fed.batch_size, "lr": fed.lr,
                      "lr_schedule": fed.lr_schedule, "l2": fed.l2, "prox_mu": fed.prox_mu},
            "codec": fed.codec, "codec_params": self._task_codec_params(),
        }
        payload = self._payload if kind is not TaskKind.STATISTICS else None
        header = encode(MsgType.TASK, fields, payload)[0]
        assert isinstance(header, bytes) and header.count(_TID_MARK + b',"round":%d,' % rnd) == 1
        return header

    def _task_codec_params(self) -> dict[str, Any]:
        """The ``codec_params`` train tasks carry (a subclass may add to them)."""
        return dict(self.fed.codec_params)

    def _send_task(self, op: OpenRound, tid: str, rid: bytes, header: bytes | None = None, *,
                   name: str | None = None) -> None:
        """Send one task; an agent owed a commit notice gets it in the task's ``committed``."""
        nonce = b'"task_id":"' + tid.encode("ascii") + b'"'
        owed = name is not None and name in self._owed
        if owed:
            mark = _TID_MARK + b',"round":%d,' % op.round
            head = (header or op.header).replace(mark, nonce + b',"round":%d,"committed":%d,'
                                                 % (op.round, self.durable), 1)
        else:
            head = (header or op.header).replace(_TID_MARK, nonce, 1)
        frames: list[Any] = [head] if op.kind is TaskKind.STATISTICS else [head, self._payload]
        sent = self.send(rid, frames)
        if sent and owed:
            self._forget_owed(name)  # type: ignore[arg-type]
        agent = op.tasks.get(tid)
        if agent is not None:  # a task of the open round (evaluate tasks are not retried)
            if sent:
                op.unsent.pop(tid, None)
            else:
                op.unsent[tid] = agent

    def _retry_unsent(self, op: OpenRound) -> None:
        """Send again the tasks whose send failed (the agent's queue was full)."""
        for tid, name in list(op.unsent.items()):
            agent = self.registry.get(name)
            if tid in op.done or agent is None:
                op.unsent.pop(tid, None)
                continue
            self._send_task(op, tid, agent.routing_id, name=name)

    def _deadline(self, op: OpenRound, now: float) -> None:
        if op.accepted >= self.fed.min_agents:
            missing = sorted(a for t, a in op.tasks.items() if t not in op.done)
            log.info("%s round %d deadline: closing with %d of %d results (no answer from %s)", op.kind.value,
                     op.round, op.accepted, len(op.tasks), ", ".join(missing))
            self._close(now)
            return
        missing = sorted(a for t, a in op.tasks.items() if t not in op.done)
        log.warning("%s round %d deadline passed with %d of %d results, need %d: waiting another %s s "
                    "(no answer from %s)", op.kind.value, op.round, op.accepted, len(op.tasks),
                    self.fed.min_agents, f"{self.fed.round_timeout_s:g}", ", ".join(missing))
        op.deadline = now + self.fed.round_timeout_s

    # ================================================================ commits
    def _close(self, now: float) -> None:
        """Aggregate the open round, start the next one, then make the commit durable and announce it.

        The next round's tasks go out before the checkpoint is written so agents work
        while the server writes; that is safe because agents keep their results until
        ``committed``, which is only sent once the checkpoint is on disk. A crash in
        between restarts from the previous checkpoint and reopens this round.
        """
        if self.fatal is not None:
            return
        op = self.open
        assert op is not None
        if op.accepted < self.fed.min_agents:
            log.warning("%s round %d: only %d usable results of %d (need %d); re-sampling",
                        op.kind.value, op.round, op.accepted, len(op.tasks), self.fed.min_agents)
            self.history.set_task_status((t, "expired") for t in op.tasks)
            self.open = None
            return
        if self.writer.pending >= self.max_pending_checkpoints:
            self._finish_commit(block=True)
        try:
            if op.kind is TaskKind.STATISTICS:
                phase = self._commit_statistics(op)
            else:
                phase = self._commit_train(op)
        except AggregationError as exc:
            log.error("%s round %d could not be aggregated (%s); re-sampling", op.kind.value, op.round, exc)
            self.history.set_task_status((t, "expired") for t in op.tasks)
            self.open = None
            return
        op.closed = self.clock()
        self.open = None
        self._encode_model()
        checkpoint = self._make_checkpoint(phase)
        # the next round's tasks first (written to the history, then sent): the agents work
        # while this round's rows are written; the checkpoint is queued after them, so a
        # checkpoint on disk always has its round in the history (a crash before it reopens
        # this round, and the history takes the round again)
        with self.history.transaction():
            nxt = self._open_round(self.clock())
        if nxt is not None:
            self._send_round(nxt)
        self._record(op, op.epsilon)
        self.writer.submit(checkpoint, op)
        if self._owed:  # notices no task of the new round carried: they go now
            nxt = self.open
            self._pay_owed(set() if nxt is None else set(nxt.tasks.values()))

    def _finish_commit(self, block: bool) -> None:
        """Announce each committed round whose checkpoint is on disk (``block``: wait for all).

        A round is announced (``committed``, the new model, evaluate tasks) only once its
        checkpoint is durable; a failed write stops the server (``fatal``), and a restart
        resumes from the last checkpoint that made it, reopening the rounds after it.
        """
        if block:
            self.writer.wait()
        for op, error in self.writer.completed():
            if self.fatal is not None:
                continue
            if error is not None:
                log.critical("%s round %d cannot be committed to disk: %s", op.kind.value, op.round, error)
                self.fatal = error
                continue
            self.metrics.last_checkpoint.set(time.time())
            self.metrics.rounds.labels(op.kind.value).inc()
            self.metrics.round_duration.observe(self.clock() - op.started)
            self.metrics.current_round.set(op.round)
            self._broadcast(op)

    @property
    def committing(self) -> bool:
        """A commit waits for its checkpoint (the loop should poll briefly)."""
        return self.writer.pending > 0

    def close(self) -> None:
        """Finish (and announce) checkpoints being written; called when the daemon stops."""
        self._finish_commit(block=True)
        self._pay_owed(set())
        self.writer.close()

    def _record(self, op: OpenRound, epsilon: float | None) -> None:
        with self.history.transaction():  # one commit for the round's rows
            self._record_rows(op, epsilon)

    def _record_rows(self, op: OpenRound, epsilon: float | None) -> None:
        h = self.history
        metrics = op.metrics.result()
        finished = op.finished or time.time()
        h.add_round(op.round, op.kind.value, started=finished - (op.closed - op.started),
                    finished=finished, n_sampled=len(op.tasks), n_accepted=op.accepted,
                    n_rejected=len(op.done) - op.accepted, metrics=metrics, epsilon=epsilon)
        h.add_agent_metrics_many((tid, op.round, op.kind.value, name, n, m) for tid, name, n, m in op.rows)
        h.set_task_status(list(op.done.items()) + [(t, "expired") for t in op.tasks if t not in op.done])

    def _round_log_level(self, what: str) -> int:
        """INFO for a round's start or commit at most once a second (rounds can come
        hundreds a second: the log stays readable and journald's rate limit untouched);
        DEBUG for the others."""
        now = self.clock()
        if now - self._round_logged.get(what, -math.inf) >= 1.0:
            self._round_logged[what] = now
            return logging.INFO
        return logging.DEBUG

    def _commit_statistics(self, op: OpenRound) -> str:
        count, mean, m2 = agg.merge_stats(op.stats)
        self.scaler = agg.stats_to_scaler(count, mean, m2)
        op.finished = time.time()
        self.committed = 0
        log.info("statistics round committed: scaler from %d samples of %d agents", count, len(op.stats))
        return "statistics"

    def _commit_train(self, op: OpenRound) -> str:
        combined = self.strategy.combine()
        epsilon = None
        if self.cfg.privacy.enabled:
            add_noise(combined, self.strategy.count, self.cfg.privacy, (self.fed.seed, op.round, 0xD9))
            self.accountant.spend(len(op.tasks) / max(1, self.population(), len(op.tasks)))
            epsilon = self.accountant.epsilon()
            self.metrics.epsilon.set(epsilon)
        new = self.strategy.apply(self.params, combined)
        if not agg.is_finite(new):
            raise AggregationError("the aggregated model is not finite")
        self.params = np.ascontiguousarray(new, dtype=np.float32)
        op.finished, op.epsilon = time.time(), epsilon
        self.committed = op.round
        self.have_model = True
        log.log(self._round_log_level("committed"), "train round %d committed: %d updates%s", op.round,
                self.strategy.count,
                "" if epsilon is None else f", epsilon {epsilon:.3g} at delta {self.cfg.privacy.delta:g}")
        return "train"

    def _broadcast(self, op: OpenRound) -> None:
        """Announce a durable round: ``committed``, the new model, evaluate tasks.

        An agent that said ``task_commits`` and will get a task soon (it has one in the
        open round, so its next one follows when that round closes; or an evaluate task
        goes out now) is told in that task's ``committed`` field instead of a message of
        its own: one wake-up less per round for each agent. Such a notice waits at most
        ``_COMMIT_HOLD_S``, or until the round closes without a new task for the agent.
        """
        self.durable = max(self.durable, op.round)
        committed = encode(MsgType.COMMITTED, {"round": self.durable})
        alive = self.registry.alive()
        soon: set[str] = set()
        if op.kind is TaskKind.TRAIN and self.fed.evaluate:
            soon = {a.name for a in alive}
        elif self.open is not None:
            soon = set(self.open.tasks.values())
        soon &= self.task_commits
        now = self.clock()
        for agent in alive:
            if agent.name in soon:
                if not self._owed:
                    self._owed_since = now
                self._owed.add(agent.name)
            else:
                self._forget_owed(agent.name)
                self.send(agent.routing_id, committed)
        if op.kind is not TaskKind.TRAIN:
            return
        self._publish_model(op, alive)
        if self.fed.evaluate and alive:
            self._send_evaluations(op.round, alive)
        if self._owed:  # e.g. an agent that was not alive to take its evaluate task
            self._pay_owed(set(self.open.tasks.values()) if self.open is not None else set())

    def _send_evaluations(self, rnd: int, agents: list[Any]) -> dict[str, str]:
        """Issue and send an evaluate task of the model of round ``rnd`` to each of ``agents``
        (written to the history first); returns task id -> agent name."""
        tasks = dict(zip(new_task_ids(len(agents)), agents))
        now = time.time()
        self.history.add_tasks(TaskRow(tid, rnd, TaskKind.EVALUATE.value, a.name, now, "issued")
                               for tid, a in tasks.items())
        header = self._task_header(rnd, TaskKind.EVALUATE)
        ev = OpenRound(rnd, TaskKind.EVALUATE, {}, 0.0, 0.0)  # not retried: no tasks of its own
        for tid, a in tasks.items():
            self._send_task(ev, tid, a.routing_id, header, name=a.name)
        return {tid: a.name for tid, a in tasks.items()}

    def _pay_owed(self, keep: set[str]) -> None:
        """Send the commit notices still owed, as messages of their own, except to ``keep``."""
        if not self._owed:
            return
        committed = encode(MsgType.COMMITTED, {"round": self.durable})
        for name in self._owed - keep:
            self._forget_owed(name)
            agent = self.registry.get(name)
            if agent is not None and agent.alive:
                self.send(agent.routing_id, committed)

    def _forget_owed(self, name: str) -> None:
        self._owed.discard(name)
        if not self._owed:
            self._owed_since = math.inf

    def _publish_model(self, op: OpenRound, alive: list[Any]) -> None:
        """Send ``model`` to the live agents that do not get this round's model with a task.

        A train task of round r + 1 carries the global model of round r (and is sent
        before round r's checkpoint is durable); an evaluate task of round r carries it
        too. Agents that said ``task_models`` in their hello take the model from such a
        task once ``committed`` for its round arrives, so sending them ``model`` as well
        would only double the downlink.
        When a later round is already aggregated in memory, its own broadcast sends
        the newer model once that round is durable; nothing is sent for this one.
        """
        if self.committed != op.round:
            return
        carried: set[str] = set()
        if self.fed.evaluate:
            carried = {a.name for a in alive}  # each gets an evaluate task carrying this model next
        else:
            nxt = self.open
            if nxt is not None and nxt.kind is TaskKind.TRAIN and nxt.round == op.round + 1:
                carried = set(nxt.tasks.values())
        for agent in alive:
            if agent.name not in carried or agent.name not in self.task_models:
                self.send(agent.routing_id, self._model_frames)

    def _flush_evaluations(self) -> None:
        rows, self.eval_rows = self.eval_rows, []
        self.history.add_agent_metrics_many((tid, rnd, TaskKind.EVALUATE.value, name, n, m)
                                            for tid, rnd, name, n, m in rows)
        self.history.set_task_status((r[0], "accepted") for r in rows)
        for rnd in sorted({r[1] for r in rows}):
            done = self.history.db.execute(
                "SELECT n_samples, metrics FROM agent_metrics WHERE round = ? AND kind = 'evaluate'", (rnd,)
            ).fetchall()
            means = MetricMeans()
            for n, text in done:
                means.add(json.loads(text), int(n or 0))
            self.history.add_round(rnd, TaskKind.EVALUATE.value, started=time.time(), finished=time.time(),
                                   n_sampled=len(done), n_accepted=len(done), n_rejected=0,
                                   metrics=means.result(), epsilon=None)

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
