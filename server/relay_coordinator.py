"""The coordinator of a relay: local rounds driven by the tasks of headquarters.

A relay serves its gateways exactly like a server, but it never starts a round on its
own: each upstream task (:class:`RelayRequest`) becomes one local round of the same
number and kind, sent to the gateways with the upstream task's global parameters,
scaler, hyper-parameters and codec. When the local round closes, the relay's strategy
combines the gateways' results and the request's future receives a
:class:`RelayOutcome` (no server optimizer, no noise: headquarters applies those).

Commits follow headquarters: a closed local round is not checkpointed and its gateways
are not told ``committed`` until headquarters has committed that round; the relay
then checkpoints headquarters' global model and publishes it to its gateways
(:meth:`RelayCoordinator.upstream_model`, :meth:`RelayCoordinator.upstream_committed`).
A relay restarted after ``kill -9`` expires the local tasks it had issued (their
results are refused as stale) and runs the round again when headquarters re-sends
its task; a result already in the relay's outbox is re-sent instead.

This module does not import the agent's uplink; :mod:`fedgate.server.relay` does.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedgate.core import aggregate as agg
from fedgate.core import codec
from fedgate.core.errors import AggregationError, FedgateError, TrainingError
from fedgate.core.protocol import MsgType, TaskKind, encode
from fedgate.server.coordinator import Coordinator, MetricMeans, OpenRound

__all__ = ["RelayCoordinator", "RelayRequest", "RelayOutcome", "local_deadline_s", "DEADLINE_SHARE"]

log = logging.getLogger(__name__)

_NO_TASK_ID = "0" * 32  # the nonce placeholder of a task header template (Coordinator._send_task fills it in)
_TID_MARK = b'"task_id":"' + _NO_TASK_ID.encode("ascii") + b'"'
DEADLINE_SHARE = 0.8  # share of the upstream deadline a local round may use (the rest carries the answer up)


def local_deadline_s(round_timeout_s: float, upstream_deadline_s: float, share: float = DEADLINE_SHARE) -> float:
    """Seconds a local round may last: ``min(round_timeout_s, share * upstream_deadline_s)``.

    >>> local_deadline_s(60.0, 20.0)
    16.0
    >>> local_deadline_s(5.0, 20.0)
    5.0
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share!r}")
    return max(1e-3, min(float(round_timeout_s), share * float(upstream_deadline_s)))


class RelayFailure(FedgateError):
    """An upstream task the relay could not answer; ``reason`` labels the metric."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class RelayOutcome:
    """The relay's answer to one upstream task.

    Attributes
    ----------
    n_samples : int
        Samples of the accepted local results (the relay's weight at headquarters).
    metrics : dict of str to float
        Sample-weighted means of the gateways' metrics.
    params : ndarray of float32, shape (n_params,), or None
        The strategy's combination of the gateways' params (train tasks).
    stats : (count, mean, m2) or None
        The merged feature statistics (statistics tasks); mean and m2 float64 (n_features,).
    """

    n_samples: int
    metrics: dict[str, float]
    params: np.ndarray | None = None
    stats: tuple[int, np.ndarray, np.ndarray] | None = None


@dataclass(kw_only=True)
class RelayRequest:
    """One upstream task handed to the server loop.

    ``deadline`` is on the coordinator's clock (monotonic seconds); ``future`` receives
    a :class:`RelayOutcome` or a :class:`RelayFailure`.
    """

    task_id: str
    round: int
    kind: TaskKind
    local_s: float
    scaler: dict[str, Any] | None
    hyper: dict[str, Any]
    codec: str
    codec_params: dict[str, Any]
    params: np.ndarray | None
    future: Future[RelayOutcome] = field(default_factory=Future)
    deadline: float = 0.0

    def fail(self, reason: str, message: str) -> None:
        if not self.future.done():
            self.future.set_exception(RelayFailure(reason, message))

    def complete(self, outcome: RelayOutcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


@dataclass
class _Evaluation:
    request: RelayRequest
    tasks: dict[str, str]
    means: MetricMeans = field(default_factory=MetricMeans)
    n_samples: int = 0
    answered: set[str] = field(default_factory=set)


class RelayCoordinator(Coordinator):
    """A :class:`~fedgate.server.coordinator.Coordinator` whose rounds come from upstream tasks.

    ``on_failure(reason)`` is called (loop thread) for every upstream task that fails.
    """

    live_keys: tuple[str, ...] = ()  # its rounds and their settings come from upstream: a reload waits for a restart

    def __init__(self, *args: Any, on_failure: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        self.request: RelayRequest | None = None
        self.evaluation: _Evaluation | None = None
        self.upstream: tuple[int, np.ndarray, dict[str, Any] | None] | None = None  # HQ's newest model
        self.on_failure = on_failure
        self.local_rounds = 0
        self._checkpointed_model = -1  # HQ model round in the newest checkpoint
        self._notice = -1              # newest round headquarters said it committed
        self.gateways_committed = -1   # newest round the gateways were told (their outboxes drop through it)
        super().__init__(*args, **kwargs)

    # ================================================================ restore
    def _restore(self) -> None:
        super()._restore()
        if self.have_model:
            ckpt, _ = self.checkpoints.load_latest()
            model_round = self.committed if ckpt is None else int(ckpt.meta.get("model_round", self.committed))
            scaler = None if self.scaler is None else {"mean": self.scaler[0].tolist(),
                                                       "std": self.scaler[1].tolist()}
            self.upstream = (model_round, np.array(self.params, dtype=np.float32), scaler)
            self._checkpointed_model = model_round
            self._model_frames = self._upstream_frames()
        self._notice = self.committed  # (durable too: set by the base class)

    def _reopen(self) -> None:
        """Expire the local tasks of an interrupted run: headquarters re-sends its task."""
        rows = self.history.db.execute("SELECT task_id FROM tasks WHERE status = 'issued'").fetchall()
        if rows:
            self.history.set_task_status((tid, "expired") for (tid,) in rows)
            log.info("relay: %d local tasks of an interrupted run expired; the round runs again "
                     "when headquarters re-sends its task", len(rows))

    def _encode_model(self) -> None:
        """Encode the params local tasks carry (the upstream task's); ``model`` frames stay HQ's."""
        self._payload = codec.encode(self.params, self.fed.download_codec)

    def _upstream_frames(self) -> list[Any]:
        assert self.upstream is not None
        rnd, params, scaler = self.upstream
        payload = codec.encode(params, self.fed.download_codec)
        return [self._model_header(rnd, scaler, payload), payload]

    # ================================================================ requests
    @property
    def idle(self) -> bool:
        """No upstream task is being served."""
        return self.request is None and self.evaluation is None

    def take(self, req: RelayRequest) -> None:
        """Serve one upstream task (loop thread; only when :attr:`idle`)."""
        assert self.idle
        req.deadline = self.clock() + req.local_s
        if req.params is not None:
            if req.params.size != self.model.n_params:
                self._fail(req, "spec", f"upstream {req.kind.value} task of round {req.round} carries "
                                        f"{req.params.size} params, the relay's model has {self.model.n_params}")
                return
            self.params = np.array(req.params, dtype=np.float32)  # a private copy: the uplink's is read-only
            self._encode_model()
        if req.scaler is not None:
            self.scaler = (np.asarray(req.scaler["mean"], dtype=np.float32),
                           np.asarray(req.scaler["std"], dtype=np.float32))
        if req.kind is TaskKind.EVALUATE:
            self._start_evaluation(req)
            return
        self.request = req
        self.tick()

    def _fail(self, req: RelayRequest, reason: str, message: str) -> None:
        log.error("relay: upstream %s task of round %d failed: %s", req.kind.value, req.round, message)
        if self.on_failure is not None:
            self.on_failure(reason)
        req.fail(reason, message)

    def fail_all(self, reason: str, message: str) -> None:
        """Fail the tasks being served (the daemon stops)."""
        if self.request is not None:
            self.request.fail(reason, message)
            self.request = None
        if self.evaluation is not None:
            self.evaluation.request.fail(reason, message)
            self.evaluation = None

    def next_round(self) -> tuple[int, TaskKind | None]:
        req = self.request
        if req is not None:
            return req.round, req.kind
        return max(self.committed, 0) + 1, None

    def _open_round(self, now: float) -> OpenRound | None:
        if self.request is None:
            return None
        op = super()._open_round(now)
        if op is not None:
            op.deadline = self.request.deadline
        return op

    def _task_header(self, rnd: int, kind: TaskKind) -> bytes:
        """A local task header with the upstream task's scaler, hyper-parameters and codec."""
        req = self.request if kind is not TaskKind.EVALUATE else self.evaluation.request  # type: ignore[union-attr]
        assert req is not None
        fields = {
            "task_id": _NO_TASK_ID, "round": rnd, "kind": kind.value,
            "deadline_s": round(max(0.001, req.deadline - self.clock()), 3),  # what is left of the local round
            "spec": self.model.spec, "features": list(self.fed.features), "label": self.fed.label,
            "scaler": req.scaler, "hyper": dict(req.hyper), "codec": req.codec,
            "codec_params": dict(req.codec_params),
        }
        header = encode(MsgType.TASK, fields, None if kind is TaskKind.STATISTICS else self._payload)[0]
        assert isinstance(header, bytes) and header.count(_TID_MARK + b',"round":%d,' % rnd) == 1
        return header

    def tick(self) -> None:
        super().tick()
        now = self.clock()
        req = self.request
        if req is not None and self.open is None and now >= req.deadline:
            self.request = None
            self._fail(req, "quorum", f"{len(self.registry.alive_names())} gateways ready within "
                                      f"{req.local_s:g}s, need {max(self.fed.min_agents, self.fed.min_available)}")
        ev = self.evaluation
        if ev is not None and now >= ev.request.deadline:
            self._finish_evaluation(ev)
        if self._gateway_commit() > self.gateways_committed:  # a held-back notice, once its round is answered
            self._tell_gateways()

    # ================================================================ local rounds
    def _deadline(self, op: OpenRound, now: float) -> None:
        if op.accepted >= self.fed.min_agents:
            super()._deadline(op, now)
            return
        req = self.request
        self.history.set_task_status((t, "expired") for t in op.tasks)
        self.open = None
        self.request = None
        if req is not None:
            self._fail(req, "quorum", f"local {op.kind.value} round {op.round}: {op.accepted} of "
                                      f"{len(op.tasks)} gateways answered within {req.local_s:g}s, "
                                      f"need {self.fed.min_agents}")

    def _close(self, now: float) -> None:
        """Combine the local round and answer the upstream task; no checkpoint, no commit yet."""
        op, req = self.open, self.request
        assert op is not None
        self.open = None
        self.request = None
        if req is None:  # the task was failed meanwhile (stopping)
            self.history.set_task_status((t, "expired") for t in op.tasks)
            return
        try:
            if op.accepted < self.fed.min_agents:
                raise RelayFailure("quorum", f"only {op.accepted} usable results of {len(op.tasks)} "
                                             f"(need {self.fed.min_agents})")
            n_samples = sum(n for _, _, n, _ in op.rows)
            if op.kind is TaskKind.STATISTICS:
                count, mean, m2 = agg.merge_stats(op.stats)
                outcome = RelayOutcome(n_samples=int(count), metrics={},
                                       stats=(int(count), np.asarray(mean, dtype=np.float64),
                                              np.asarray(m2, dtype=np.float64)))
            else:
                combined = np.array(self.strategy.combine(), dtype=np.float32)
                if not agg.is_finite(combined):
                    raise AggregationError("the combined model is not finite")
                outcome = RelayOutcome(n_samples=n_samples, metrics=op.metrics.result(), params=combined)
        except (AggregationError, RelayFailure) as exc:
            self.history.set_task_status((t, "expired") for t in op.tasks)
            reason = exc.reason if isinstance(exc, RelayFailure) else "aggregation"
            self._fail(req, reason, f"local {op.kind.value} round {op.round}: {exc}")
            return
        op.closed = self.clock()
        op.finished = time.time()
        self._record(op, None)
        self.local_rounds += 1
        self.metrics.round_duration.observe(op.closed - op.started)
        log.log(self._round_log_level("committed"), "relay: local %s round %d combined: %d results, "
                "%d samples; answering upstream", op.kind.value, op.round, op.accepted, outcome.n_samples)
        req.complete(outcome)

    # ================================================================ evaluations
    def _start_evaluation(self, req: RelayRequest) -> None:
        alive = self.registry.alive()
        if not alive:
            self._fail(req, "quorum", f"no gateway ready to evaluate the model of round {req.round}")
            return
        self.evaluation = ev = _Evaluation(req, {})  # its request gives the task header's fields
        ev.tasks = self._send_evaluations(req.round, alive)

    def _on_evaluation(self, name: str, f: dict[str, Any]) -> None:
        super()._on_evaluation(name, f)
        ev = self.evaluation
        tid = f["task_id"]
        if ev is None or tid not in ev.tasks or tid in ev.answered:
            return
        ev.answered.add(tid)
        ev.means.add(f["metrics"], f["n_samples"])
        ev.n_samples += int(f["n_samples"])
        if len(ev.answered) == len(ev.tasks):
            self._finish_evaluation(ev)

    def _finish_evaluation(self, ev: _Evaluation) -> None:
        self.evaluation = None
        if not ev.answered:
            self._fail(ev.request, "quorum", f"no gateway evaluated the model of round {ev.request.round} "
                                             f"within {ev.request.local_s:g}s")
            return
        ev.request.complete(RelayOutcome(n_samples=ev.n_samples, metrics=ev.means.result()))

    # ================================================================ upstream commits
    def upstream_model(self, rnd: int, params: np.ndarray, scaler: dict[str, Any] | None) -> None:
        """Headquarters' committed global model of train round ``rnd`` (loop thread)."""
        if self.upstream is not None and rnd <= self.upstream[0]:
            return
        if params.size != self.model.n_params:
            log.error("relay: headquarters' model of round %d has %d params, the relay's model %d; not used",
                      rnd, params.size, self.model.n_params)
            return
        self.upstream = (rnd, np.array(params, dtype=np.float32), scaler)
        self._model_frames = self._upstream_frames()
        self.upstream_committed(rnd)

    def upstream_committed(self, rnd: int) -> None:
        """Headquarters committed every round up to ``rnd``: checkpoint, then tell the gateways.

        The checkpoint (and the gateways' ``committed``) covers the rounds up to that of
        headquarters' newest model, never more: a notice often comes before its round's
        model (the notice of headquarters' last round rides on the evaluate task, or
        comes as a message, before that task's model or the ``model`` message is handed
        over; a notice of round r also comes while the uplink holds a later round's model,
        not yet committed). Such a round is checkpointed when its model arrives
        (:meth:`upstream_model`), so a relay checkpoint of round r holds headquarters'
        model of round r. Before the first model, the statistics round is checkpointed
        (the scaler, and the relay's initial params: those of a task being served are not
        committed).
        """
        self._notice = max(self._notice, rnd)
        model_round = -1 if self.upstream is None else self.upstream[0]
        if model_round >= 1:
            target = model_round  # a model is handed over once its round is committed
        elif self._notice >= 0:
            target = 0
        else:
            return
        if target <= self.committed and model_round <= self._checkpointed_model:
            if target < self._notice:
                log.debug("relay: headquarters committed round %d; the checkpoint waits for its model "
                          "(newest here: round %d)", self._notice, model_round)
            return
        self.committed = max(self.committed, target)
        self._checkpointed_model = model_round
        phase = "train" if model_round >= 1 else "statistics"
        self.have_model = model_round >= 1
        params, scaler = (self.model.initial_params(), None) if self.upstream is None else self.upstream[1:]
        ckpt = self._make_checkpoint(phase, params=params, scaler=None if scaler is None else (
            np.asarray(scaler["mean"], dtype=np.float32), np.asarray(scaler["std"], dtype=np.float32)),
            extra={"relay": True, "model_round": model_round})
        now = self.clock()
        kind = TaskKind.TRAIN if phase == "train" else TaskKind.STATISTICS
        self.writer.submit(ckpt, OpenRound(self.committed, kind, {}, now, now))

    def _gateway_commit(self) -> int:
        """The round the gateways may drop their results through.

        Headquarters' durable commit, but below the round of the upstream task being
        served: an asynchronous headquarters commits rounds after a task's round while
        the relay still collects its gateways' results for that task (its answer is
        still wanted, up to ``max_staleness`` rounds late), so a gateway that reconnects
        meanwhile still holds its result and re-sends it. The rest of the notice goes
        once the local round is answered or failed (:meth:`tick`).
        """
        req = self.request
        if req is not None:
            return min(self.durable, req.round - 1)
        return self.durable

    def _tell_gateways(self) -> None:
        """``committed`` (:meth:`_gateway_commit`) to every live gateway."""
        rnd = self._gateway_commit()
        if rnd < 0:
            return
        self.gateways_committed = max(self.gateways_committed, rnd)
        committed = encode(MsgType.COMMITTED, {"round": rnd})
        for agent in self.registry.alive():
            self._forget_owed(agent.name)
            self.send(agent.routing_id, committed)

    def _broadcast(self, op: OpenRound) -> None:
        """A checkpoint of headquarters' commit is on disk: ``committed`` and the model to every gateway."""
        self.durable = max(self.durable, op.round)
        self._tell_gateways()
        if self.have_model and op.kind is TaskKind.TRAIN and op.round == self.committed:
            for agent in self.registry.alive():
                self.send(agent.routing_id, self._model_frames)
        log.log(self._round_log_level("durable"), "relay: round %d committed at headquarters; "
                "gateways told round %d", self.durable, self._gateway_commit())

    # ================================================================ reports
    def status(self) -> dict[str, Any]:
        out = super().status()
        req = self.request or (self.evaluation.request if self.evaluation is not None else None)
        out["phase"] = "relay"
        out["serving"] = None if req is None else {"round": req.round, "kind": req.kind.value}
        out["local_rounds"] = self.local_rounds
        return out


def check_upstream_task(fed: Any, spec: dict[str, Any], kind: str, rnd: int, task_spec: dict[str, Any],
                        features: list[str], label: str) -> None:
    """Refuse an upstream task whose model does not match the relay's ``[federation]``.

    Raises
    ------
    TrainingError
        Naming what differs (spec, features or label) and the round.
    """
    what = []
    if task_spec != json.loads(json.dumps(spec)):
        what.append(f"model spec {task_spec} (relay: {spec})")
    if list(features) != list(fed.features):
        missing = [x for x in fed.features if x not in features]
        extra = [x for x in features if x not in fed.features]
        what.append(f"features {list(features)} (relay: {list(fed.features)}; missing {missing}, extra {extra})")
    if label != fed.label:
        what.append(f"label {label!r} (relay: {fed.label!r})")
    if what:
        raise TrainingError(f"upstream {kind} task of round {rnd} does not match the relay's [federation]: "
                            + "; ".join(what))
