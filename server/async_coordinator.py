"""Buffered asynchronous federation (``[federation] mode = "async"``), FedBuff-style.

The statistics round (round 0) runs as in synchronous mode. Train rounds then work so:

- Every ready agent without an outstanding task gets one at once (at most
  ``concurrency`` agents training when that is set), carrying the current global
  model and ``codec_params.delta = true``: the agent sends ``new - carried`` with the
  codec header's DELTA flag, whatever the codec.
- Round r (async) is the r-th aggregation. It closes as soon as ``buffer_size``
  results are accepted (0: ``min_agents``), or at ``round_timeout`` if at least
  ``min_agents`` are in; a close is checkpointed, recorded and announced exactly as a
  synchronous round. An agent whose result is accepted gets a new task for the open
  round right away.
- A result of a task issued while round v was open, arriving while round r is open,
  has staleness tau = r - v. Above ``max_staleness`` it is refused (``stale``); else
  the server adds its *current* global model to the delta (rebasing) and the strategy
  takes it with weight ``n_samples * (1 + tau) ** -staleness_exponent``.
- Commit capping: an agent drops the results of rounds <= the ``committed`` it is told.
  Each agent is told ``min(durable round, v_oldest - 1)``, where v_oldest is the round
  of its oldest task whose result is not yet in a durable aggregation, and only when
  that value grows; so a result is never dropped before it is safely aggregated.
- After a restart the round after the last checkpoint reopens; tasks still issued
  (or accepted into a round that never became durable) within ``max_staleness`` are
  outstanding again, and their re-sent results are taken once.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedgate.core.protocol import Message, MsgType, TaskKind, encode, new_task_ids
from fedgate.server.config import ServerConfig
from fedgate.server.coordinator import Coordinator, OpenRound
from fedgate.server.metrics import ServerMetrics
from fedgate.server.spec import FederationModel
from fedgate.server.store import CheckpointStore, History, TaskRow
from fedgate.server.validate import Rejected, check_update

__all__ = ["AsyncCoordinator", "Issued", "staleness_weight"]

log = logging.getLogger(__name__)

_DISPATCH_EVERY_S = 0.25  # tick looks for idle agents this often (results and hellos dispatch at once)


def staleness_weight(n_samples: int, tau: int, exponent: float) -> float:
    """The aggregation weight of a result: ``n_samples * (1 + tau) ** -exponent``.

    >>> staleness_weight(100, 0, 0.5), staleness_weight(100, 3, 0.5)
    (100.0, 50.0)
    """
    return float(n_samples) * (1.0 + tau) ** -exponent


@dataclass
class Issued:
    """A train task whose result is not yet in a durable aggregation."""

    agent: str
    round: int                     # the round open when it was issued (v)
    aggregated: int | None = None  # the round its accepted result went into (None: not in yet)


class AsyncCoordinator(Coordinator):
    """:class:`~fedgate.server.coordinator.Coordinator` with buffered asynchronous train rounds."""

    def __init__(self, cfg: ServerConfig, model: FederationModel, send: Callable[[bytes, list[Any]], bool], *,
                 history: History, checkpoints: CheckpointStore, metrics: ServerMetrics,
                 population: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        fed = cfg.federation
        self.buffer_size = fed.buffer_size or fed.min_agents
        self.issued: dict[str, Issued] = {}        # task_id -> task not yet in a durable round
        self.by_agent: dict[str, set[str]] = {}    # agent -> its task ids in ``issued``
        self.told: dict[str, int] = {}             # agent -> the last ``committed`` sent to it
        self._last_issue: dict[str, float] = {}    # agent -> when it last got a task (fair order)
        self._dispatched = -math.inf               # clock() of the last periodic dispatch
        self.training: set[str] = set()            # agents with a task whose result is not in yet
        self._idle: set[str] = set()               # agents that may have become idle since the last dispatch
        self._staleness = metrics.staleness
        metrics.rejected.labels("stale")
        super().__init__(cfg, model, send, history=history, checkpoints=checkpoints, metrics=metrics,
                         population=population, clock=clock)

    # ================================================================ bookkeeping
    def _issue(self, tid: str, name: str, rnd: int) -> None:
        self.issued[tid] = Issued(name, rnd)
        self.by_agent.setdefault(name, set()).add(tid)
        self.training.add(name)

    def _forget(self, tid: str) -> None:
        task = self.issued.pop(tid, None)
        if task is not None:
            tids = self.by_agent.get(task.agent)
            if tids is not None:
                tids.discard(tid)
                if not tids:
                    del self.by_agent[task.agent]
            self._refresh(task.agent)

    def _refresh(self, name: str) -> None:
        """Keep ``training`` right for ``name`` after one of its tasks changed."""
        if any(self.issued[t].aggregated is None for t in self.by_agent.get(name, ())):
            self.training.add(name)
        else:
            self.training.discard(name)
            self._idle.add(name)

    def commit_cap(self, name: str) -> int:
        """The highest round ``name`` may be told committed: min(durable, oldest open task's round - 1)."""
        oldest = min((self.issued[t].round for t in self.by_agent.get(name, ())), default=math.inf)
        return int(min(self.durable, oldest - 1))

    def _task_codec_params(self) -> dict[str, Any]:
        return {**self.fed.codec_params, "delta": True}

    def _prunable_round(self) -> int:
        return self.committed - 1 - self.fed.max_staleness  # a restart reopens the tasks of that window

    def _reconfigured(self) -> None:
        self.buffer_size = self.fed.buffer_size or self.fed.min_agents  # (buffer_size 0 follows min_agents)

    # ================================================================ restore
    def _reopen(self) -> None:
        """Reopen the round after the last checkpoint with every task whose result is not durable."""
        rnd, kind = self.next_round()
        if kind is not TaskKind.TRAIN:
            super()._reopen()
            return
        self.history.expire_tasks_after(rnd)
        db = self.history.db
        with self.history.transaction():  # rows of rounds aggregated in memory only: they are taken again
            db.execute("DELETE FROM agent_metrics WHERE kind = 'train' AND round > ?", (self.committed,))
            db.execute("DELETE FROM rounds WHERE kind = 'train' AND round > ?", (self.committed,))
        oldest = rnd - self.fed.max_staleness
        durable = {t for (t,) in db.execute(
            "SELECT task_id FROM agent_metrics WHERE kind = 'train' AND round <= ? AND round >= ?",
            (self.committed, oldest))}
        rows = db.execute("SELECT task_id, round, agent, status FROM tasks WHERE kind = 'train' AND round >= ? "
                          "AND status IN ('issued', 'accepted')", (oldest,)).fetchall()
        now = self.clock()
        op = OpenRound(rnd, kind, {}, now, now + self.fed.round_timeout_s)
        self.strategy.begin(self.params, expected=self.buffer_size)
        op.header = self._task_header(rnd, kind)
        self.open = op
        again = []
        for tid, v, agent, status in rows:
            if status == "accepted" and tid in durable:
                continue
            self._issue(tid, agent, int(v))
            again.append(tid)
            if v == rnd:
                op.tasks[tid] = agent
        self.history.set_task_status((t, "issued") for t in again)
        log.info("resuming async train round %d with %d outstanding tasks; agents re-send their results",
                 rnd, len(again))

    # ================================================================ agents
    def _on_hello(self, rid: bytes, user_id: str | None, msg: Message, now: float) -> None:
        super()._on_hello(rid, user_id, msg, now)
        name = msg.fields["agent"]
        agent = self.registry.get(name)
        if agent is None or agent.routing_id != rid:  # refused
            return
        self.task_commits.discard(name)  # commit notices are capped per agent: always messages of their own
        self.told.pop(name, None)
        op = self.open
        if op is None or op.kind is not TaskKind.TRAIN:
            if self.finished and self.durable >= 0:
                self._notify([agent])
            return
        for tid in sorted(self.by_agent.get(name, ())):
            task = self.issued[tid]
            if task.aggregated is not None or tid in op.tasks:  # in a round already, or re-sent by the base
                continue
            if op.round - task.round > self.fed.max_staleness:
                log.info("agent %s is back; its task %s of round %d is too stale for round %d: expired",
                         name, tid, task.round, op.round)
                self._forget(tid)
                self.history.set_task_status([(tid, "expired")])
            else:  # same nonce and round, today's model: a delta from it rebases the same way
                self._send_task(op, tid, rid, self._task_header(task.round, TaskKind.TRAIN), name=name)
        self._idle.add(name)
        self._dispatch(now)

    def tick(self) -> None:
        super().tick()
        now = self.clock()
        if now - self._dispatched >= _DISPATCH_EVERY_S:  # agents alive again without a hello
            self._dispatched = now
            self._expire_stale()
            self._dispatch(now, scan=True)

    def _expire_stale(self) -> None:
        """Expire tasks out for more than ``max_staleness`` rounds: their results would be refused
        anyway, and an agent whose task was lost (a dropped message) becomes idle and gets a new one."""
        op = self.open
        if op is None or op.kind is not TaskKind.TRAIN:
            return
        oldest = op.round - self.fed.max_staleness
        out = [t for t, i in self.issued.items() if i.aggregated is None and i.round < oldest]
        for tid in out:
            log.info("task %s of %s (round %d) is more than %d rounds old: expired", tid, self.issued[tid].agent,
                     self.issued[tid].round, self.fed.max_staleness)
            self._forget(tid)
        if out:
            self.history.set_task_status((t, "expired") for t in out)

    def _open_round(self, now: float) -> OpenRound | None:
        rnd, kind = self.next_round()
        if kind is not TaskKind.TRAIN:
            return super()._open_round(now)
        # results accepted into a round that was never aggregated (an aggregation error) are gone
        for tid in [t for t, i in self.issued.items() if i.aggregated is not None and i.aggregated > self.committed]:
            self._forget(tid)
        op = OpenRound(rnd, kind, {}, now, now + self.fed.round_timeout_s)
        op.n_ready = self.registry.n_alive()
        self.strategy.begin(self.params, expected=self.buffer_size)
        op.header = self._task_header(rnd, kind)
        self.open = op
        self._pick(op, scan=True)
        return op

    def _pick(self, op: OpenRound, *, scan: bool = False) -> dict[str, str]:
        """Give idle ready agents tasks of ``op`` (written to the history; sent by the caller).

        ``scan``: look at every live agent; else only at those that became idle since
        the last call (a result, a refusal, a hello), so a result costs O(1), not O(agents).
        """
        if scan or self.fed.concurrency:  # with a cap, the agent idle longest takes a free slot
            self._idle.clear()
            idle = sorted(a.name for a in self.registry.alive() if a.name not in self.training)
        else:
            candidates, self._idle = self._idle, set()
            idle = []
            for name in sorted(candidates):
                agent = self.registry.get(name)
                if agent is not None and agent.alive and name not in self.training:
                    idle.append(name)
        if not idle:
            return {}
        if self.fed.concurrency:
            busy = sum(1 for n in self.training if (a := self.registry.get(n)) is not None and a.alive)
            free = max(0, self.fed.concurrency - busy)
            if free < len(idle):
                idle.sort(key=lambda n: (self._last_issue.get(n, -math.inf), n))  # the longest idle first
                # the others wait for a free slot: the next scan (tick) finds them
                idle = idle[:free]
        if not idle:
            return {}
        tasks = dict(zip(new_task_ids(len(idle)), idle))
        wall = time.time()
        self.history.add_tasks(TaskRow(tid, op.round, TaskKind.TRAIN.value, name, wall, "issued")
                               for tid, name in tasks.items())
        now = self.clock()
        for tid, name in tasks.items():
            op.tasks[tid] = name
            self._issue(tid, name, op.round)
            self._last_issue[name] = now
        return tasks

    def _dispatch(self, now: float, *, scan: bool = False) -> None:
        """Send tasks of the open round to the agents that are idle."""
        op = self.open
        if op is None or op.kind is not TaskKind.TRAIN:
            return
        for tid, name in self._pick(op, scan=scan).items():
            agent = self.registry.get(name)
            if agent is not None:
                self._send_task(op, tid, agent.routing_id, name=name)

    # ================================================================ results
    def _on_result(self, rid: bytes, name: str, msg: Message, now: float) -> None:
        f = msg.fields
        op = self.open
        if f["kind"] != TaskKind.TRAIN or op is None or op.kind is not TaskKind.TRAIN:
            super()._on_result(rid, name, msg, now)
            return
        tid = f["task_id"]
        task = self.issued.get(tid)
        try:
            if task is None:
                row = self.history.task(tid)
                if row is None:
                    raise Rejected("unknown_task", f"task {tid} was never issued")
                if row.agent != name:
                    raise Rejected("identity", f"task {tid} was sent to {row.agent}, not {name}")
                if row.status == "accepted":
                    self.metrics.rejected.labels("duplicate").inc()
                    self._ack(rid, tid, "duplicate", "already received")
                    return
                if row.kind == TaskKind.TRAIN.value and op.round - row.round > self.fed.max_staleness:
                    raise Rejected("stale", f"task {tid} of round {row.round} is {op.round - row.round} rounds "
                                            f"old, max_staleness is {self.fed.max_staleness}")
                raise Rejected("stale_round", f"task {tid} of {row.kind} round {row.round} is no longer open")
            if task.agent != name:
                raise Rejected("identity", f"task {tid} was sent to {task.agent}, not {name}")
            if task.aggregated is not None:
                self.metrics.rejected.labels("duplicate").inc()
                self._ack(rid, tid, "duplicate", "already received")
                return
            if f["round"] != task.round:
                raise Rejected("wrong_kind", f"task {tid} is train round {task.round}, result says round {f['round']}")
            tau = max(0, op.round - task.round)
            if tau > self.fed.max_staleness:
                raise Rejected("stale", f"task {tid} of round {task.round} is {tau} rounds old, max_staleness "
                                        f"is {self.fed.max_staleness}")
            self._take_delta(f, msg.payload, tau)
        except Rejected as rej:
            self.metrics.rejected.labels(rej.reason).inc()
            log.warning("result of %s for task %s refused: %s", name, tid, rej)
            self.history.add_rejection(f.get("round"), name, tid, rej.reason, rej.detail)
            if task is not None and task.agent == name and rej.reason not in ("identity", "wrong_kind"):
                self._forget(tid)  # the agent drops it on the refusal and is idle again
                op.done[tid] = "rejected"
            self._ack(rid, tid, "rejected", rej.reason)
            self._idle.add(name)
            self._dispatch(now)
            return
        task.aggregated = op.round
        self._refresh(name)
        op.done[tid] = "accepted"
        self._accepted[TaskKind.TRAIN].inc()
        self._staleness.observe(tau)
        n = f["n_samples"]
        op.rows.append((tid, name, n, {**f["metrics"], "staleness": float(tau)}))
        op.metrics.add(f["metrics"], n)
        if name not in self.quiet_acks:
            self._ack(rid, tid, "accepted")
        if op.accepted >= self.buffer_size:
            self._close(now)  # the next round's tasks go to the idle agents
        else:
            self._dispatch(now)

    def _take_delta(self, f: dict[str, Any], payload: memoryview | None, tau: int) -> None:
        """Rebase a delta on the current global model, check it, and add it with its staleness weight."""
        if f["n_samples"] < 1:
            raise Rejected("empty", "a train result must report n_samples >= 1")
        head = self.validator.header(payload)
        if not head.delta:
            raise Rejected("decode", "an async train result must be a delta (codec header DELTA flag): "
                                     "parameters trained from an older model cannot be rebased")
        vec, _ = check_update(self.validator, payload, self.params, self.strategy.buffer)
        self.strategy.add(vec, staleness_weight(f["n_samples"], tau, self.fed.staleness_exponent))

    # ================================================================ rounds
    def _deadline(self, op: OpenRound, now: float) -> None:
        if op.kind is not TaskKind.TRAIN:
            super()._deadline(op, now)
            return
        if op.accepted >= self.fed.min_agents:
            log.info("async round %d deadline: closing with %d results (buffer_size %d)", op.round, op.accepted,
                     self.buffer_size)
            self._close(now)
            return
        log.log(self._round_log_level("waiting"), "async round %d deadline passed with %d results, need %d: "
                "waiting another %s s", op.round, op.accepted, self.fed.min_agents, f"{self.fed.round_timeout_s:g}")
        op.deadline = now + self.fed.round_timeout_s

    def _close(self, now: float) -> None:
        op = self.open
        super()._close(now)
        if (op is not None and op.kind is TaskKind.TRAIN and self.open is None and self.fatal is None
                and self.committed < op.round):  # not aggregated: its tasks still run, the round starts over
            self.history.set_task_status((t, "issued") for t, i in self.issued.items() if i.aggregated is None)
            self._maybe_start(self.clock())

    def _record_rows(self, op: OpenRound, epsilon: float | None) -> None:
        if op.kind is not TaskKind.TRAIN:
            super()._record_rows(op, epsilon)
            return
        h = self.history
        metrics = op.metrics.result()
        if op.rows:
            metrics["staleness"] = sum(m["staleness"] for *_, m in op.rows) / len(op.rows)
        finished = op.finished or time.time()
        h.add_round(op.round, op.kind.value, started=finished - (op.closed - op.started), finished=finished,
                    n_sampled=len(op.done), n_accepted=op.accepted, n_rejected=len(op.done) - op.accepted,
                    metrics=metrics, epsilon=epsilon)
        h.add_agent_metrics_many((tid, op.round, op.kind.value, name, n, m) for tid, name, n, m in op.rows)
        h.set_task_status(list(op.done.items()))

    # ================================================================ commits
    def _broadcast(self, op: OpenRound) -> None:
        """Announce a durable round: capped ``committed`` per agent, the new model, evaluate tasks."""
        if op.kind is not TaskKind.TRAIN:
            super()._broadcast(op)
            for agent in self.registry.alive():
                self.told[agent.name] = self.durable
            return
        self.durable = max(self.durable, op.round)
        for tid in [t for t, i in self.issued.items() if i.aggregated is not None and i.aggregated <= self.durable]:
            self._forget(tid)
        if self.finished:  # no round will take the results still out: agents may drop them
            out = [t for t, i in self.issued.items() if i.aggregated is None]
            for tid in out:
                self._forget(tid)
            self.history.set_task_status((t, "expired") for t in out)
        alive = self.registry.alive()
        self._notify(alive)
        if self.committed == op.round:  # else a later round's broadcast sends the newer model
            for agent in alive:
                if not self._carried(agent.name, op.round):
                    self.send(agent.routing_id, self._model_frames)
        if self.fed.evaluate and alive:
            self._send_evaluations(op.round, alive)

    def _carried(self, name: str, rnd: int) -> bool:
        """``name`` takes the model of round ``rnd`` from a task (``task_models``), so no ``model`` message:
        it was told ``committed`` >= ``rnd`` and holds a train task of round ``rnd`` + 1 (which
        carries that model), or an evaluate task of ``rnd`` follows."""
        if name not in self.task_models or self.told.get(name, -1) < rnd:
            return False
        return self.fed.evaluate or any(self.issued[t].round == rnd + 1 for t in self.by_agent.get(name, ()))

    def _notify(self, agents: list[Any]) -> None:
        """Send each agent its commit cap when it grew."""
        for agent in agents:
            cap = self.commit_cap(agent.name)
            if cap > self.told.get(agent.name, -1):
                self.told[agent.name] = cap
                self.send(agent.routing_id, encode(MsgType.COMMITTED, {"round": cap}))

    def close(self) -> None:
        super().close()
        self._notify(self.registry.alive())

    # ================================================================ reports
    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(mode="async", buffer_size=self.buffer_size, max_staleness=self.fed.max_staleness,
                   outstanding=sum(1 for i in self.issued.values() if i.aggregated is None))
        return out
