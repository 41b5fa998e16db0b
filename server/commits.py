"""The coordinator's commits: aggregate a round, make it durable, announce it.

:class:`Commits` is the part of :class:`~fedgate.server.coordinator.Coordinator` that
closes a round: the strategy combines the accepted updates (DP noise added when
configured), the next round's tasks go out while the checkpoint is written and
fsynced on a worker thread, the round's rows go to the history, and only once the
checkpoint is on disk are ``committed``, the new model and the evaluate tasks sent. A
commit notice rides in the agent's next task when one follows soon (``task_commits``),
and a model is not sent to an agent that takes it from a task (``task_models``). The
coordinator holds the state these methods work on
(:class:`~fedgate.server.rounds.CoordinatorState`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np

from fedgate.core import aggregate as agg
from fedgate.core.errors import AggregationError
from fedgate.core.protocol import MsgType, TaskKind, encode, new_task_ids
from fedgate.server.privacy import add_noise
from fedgate.server.rounds import CoordinatorState, MetricMeans, OpenRound
from fedgate.server.store import TaskRow

__all__ = ["Commits"]

log = logging.getLogger(__name__)


class Commits(CoordinatorState):
    """Closing, committing and announcing rounds (a part of ``Coordinator``)."""

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
            self._resample(op)
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
            self._resample(op)
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

    def _resample(self, op: OpenRound) -> None:
        """``op`` closed without a model: its round is sampled again at once (not after
        another ``round_interval``)."""
        if op.kind is TaskKind.TRAIN:
            self.schedule.retry()

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
