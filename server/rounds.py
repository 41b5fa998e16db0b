"""The round in progress and the coordinator's clock: opening, sending, deadlines.

:class:`OpenRound` is the round in progress (in memory; its tasks are also in the
history). :class:`RoundClock` is the part of
:class:`~fedgate.server.coordinator.Coordinator` that :meth:`~RoundClock.tick` drives:
it opens the next round (after ``round_interval``, once enough agents are ready,
sampling ``fraction`` of them deterministically from ``seed`` and the round, its tasks
written to the history before they are sent), builds each round's task header once
(the nonce spliced in per agent, and a commit notice the agent is owed), retries sends
that met a full queue, and closes a round at its deadline when a quorum answered. The
coordinator holds the state these methods work on (:class:`CoordinatorState`).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedgate.core.protocol import MsgType, TaskKind, encode, new_task_ids
from fedgate.server.store import TaskRow

if TYPE_CHECKING:
    from fedgate.core.errors import StoreError
    from fedgate.server.config import FederationSection, ServerConfig
    from fedgate.server.metrics import ServerMetrics
    from fedgate.server.privacy import PrivacyAccountant
    from fedgate.server.registry import Registry
    from fedgate.server.schedule import HistoryPruner, RoundSchedule
    from fedgate.server.spec import FederationModel
    from fedgate.server.store import CheckpointWriter, History
    from fedgate.server.strategies import Strategy

__all__ = ["MetricMeans", "OpenRound", "CoordinatorState", "RoundClock"]

log = logging.getLogger(__name__)

_TID_MARK = b'"task_id":"' + b"0" * 32 + b'"'
_ROUND_MARK = b'"round":0,'
_COMMIT_HOLD_S = 1.0  # longest a commit notice waits for the agent's next task (see Commits._broadcast)


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


class CoordinatorState:
    """The state :class:`~fedgate.server.coordinator.Coordinator` holds, as its parts
    (:class:`RoundClock`, :class:`~fedgate.server.commits.Commits`) use it; annotations
    only: the coordinator sets every one of them."""

    cfg: ServerConfig
    fed: FederationSection
    model: FederationModel
    send: Callable[[bytes, list[Any]], bool]
    history: History
    metrics: ServerMetrics
    clock: Callable[[], float]
    population: Callable[[], int]
    registry: Registry
    strategy: Strategy
    accountant: PrivacyAccountant
    schedule: RoundSchedule
    pruner: HistoryPruner
    writer: CheckpointWriter
    max_pending_checkpoints: int
    params: np.ndarray
    scaler: tuple[np.ndarray, np.ndarray] | None
    committed: int
    durable: int
    have_model: bool
    open: OpenRound | None
    fatal: StoreError | None
    task_models: set[str]
    task_commits: set[str]
    eval_rows: list[tuple[str, int, str, int, dict[str, float]]]
    _owed: set[str]
    _owed_since: float
    _round_logged: dict[str, float]
    _payload: bytes
    _model_frames: list[Any]
    _scaler_dict: dict[str, Any] | None
    _task_templates: dict[TaskKind, tuple[Any, bytes | None]]


class RoundClock(CoordinatorState):
    """Opening rounds, sending their tasks, deadlines (a part of ``Coordinator``)."""

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
