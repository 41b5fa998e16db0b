"""What the uplink's worker thread does around a task: decode, encode, store.

:class:`ResultEncoder` turns a handler's :class:`TaskOutcome` into the ``result``
header fields and codec-encoded payload, validates them exactly as the wire encoder
will, and writes them to the outbox (fsynced) before the uplink sends anything. It
keeps the top-k codec's error-feedback state of this agent from round to round.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from fedgate.agent.outbox import Outbox, OutboxEntry
from fedgate.agent.uplink_types import Task, TaskOutcome
from fedgate.core import protocol
from fedgate.core.errors import ProtocolError, TrainingError
from fedgate.core.protocol import MsgType

__all__ = ["ResultEncoder", "TaskModels"]

log = logging.getLogger(__name__)


ModelFields = dict[str, Any]


class TaskModels:
    """The global models that tasks carry, for agents that say ``task_models`` in hello.

    A train task of round r carries the global model of round r - 1, an evaluate task
    that of round r; the server then sends such an agent no separate ``model``. The
    model goes to the handler once its round is committed (a train task of round r + 1
    arrives before round r's ``committed``), newest only, each round once.
    """

    def __init__(self) -> None:
        self.delivered: int | None = None                          # newest round handed over
        self.pending: tuple[ModelFields, memoryview] | None = None  # waits for its commit

    def reset(self) -> None:
        """A new session: a restarted server may redo a round a pending model came from."""
        self.delivered = self.pending = None

    def newer(self, round_: int) -> bool:
        return self.delivered is None or round_ > self.delivered

    def from_task(self, task: Task, payload: memoryview,
                  last_committed: int | None) -> tuple[ModelFields, memoryview] | None:
        """The model to hand over now, if the task carries a newer, committed one."""
        model_round = task.round - 1 if task.kind == "train" else task.round
        if model_round < 1 or not self.newer(model_round):
            return None
        fields = {"round": model_round, "spec": task.spec, "features": task.features, "label": task.label,
                  "scaler": task.scaler}
        if last_committed is not None and model_round <= last_committed:
            return fields, payload
        if self.pending is None or model_round >= self.pending[0]["round"]:
            self.pending = (fields, payload)
        return None

    def committed(self, last_committed: int) -> tuple[ModelFields, memoryview] | None:
        """The pending model, once its round is committed."""
        if self.pending is not None and self.pending[0]["round"] <= last_committed:
            got, self.pending = self.pending, None
            return got
        return None

    def model_message(self, round_: int) -> None:
        """A ``model`` message of ``round_`` arrived: an older pending one is moot."""
        if self.pending is not None and self.pending[0]["round"] <= round_:
            self.pending = None


class ResultEncoder:
    """Encodes task outcomes into outbox entries for one agent.

    Parameters
    ----------
    agent_name : str
    outbox : Outbox
        Where finished results are stored before they are sent.
    """

    def __init__(self, agent_name: str, outbox: Outbox) -> None:
        self.agent_name = agent_name
        self.outbox = outbox
        self._topk_state: Any = None  # codec.ErrorFeedback, kept across rounds

    @staticmethod
    def decode(buf: bytes | memoryview, *, check_crc: bool = True) -> np.ndarray:
        """A codec-encoded vector from the server -> float32 array of shape (n,).

        ``check_crc=False`` skips the codec's CRC-32 (lengths and fields are still
        checked): for a CURVE link, whose Poly1305 tag already authenticates every byte.

        Raises
        ------
        ProtocolError
            The buffer is not a valid encoding.
        """
        from fedgate.core import codec

        return np.asarray(codec.decode(buf, check_crc=check_crc), dtype=np.float32)

    def encode_params(self, params: np.ndarray, task: Task) -> bytes:
        """``params`` (float32, shape (n,)) encoded with the task's codec."""
        from fedgate.core import codec

        vec = np.ascontiguousarray(params, dtype=np.float32).reshape(-1)
        params = task.codec_params
        try:
            if task.codec == "q8":
                # a per-task seed: stochastic rounding errors do not repeat from round to round
                seed = int(params.get("seed", int(task.task_id[:8], 16)))
                return codec.encode(vec, "q8", block=int(params.get("block", 256)), seed=seed % 2**32)
            if task.codec == "topk":
                if self._topk_state is None or self._topk_state.dim != vec.size:
                    self._topk_state = codec.ErrorFeedback(vec.size)
                return codec.encode(vec, "topk", k=float(params.get("k", 0.01)), state=self._topk_state)
            return codec.encode(vec, task.codec)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"task {task.task_id}: cannot encode with {task.codec} {params}: {exc}") from exc

    def fields(self, task: Task, outcome: TaskOutcome) -> dict[str, Any]:
        """The ``result`` header fields for ``outcome``."""
        metrics = {}
        for k, v in outcome.metrics.items():
            f = float(v)
            if math.isfinite(f):
                metrics[str(k)] = f
            else:
                log.warning("uplink: metric %s of task %s is %s; not reported", k, task.task_id, f)
        fields: dict[str, Any] = {
            "agent": self.agent_name, "task_id": task.task_id, "round": task.round, "kind": task.kind,
            "n_samples": int(outcome.n_samples), "metrics": metrics,
        }
        if task.kind == "statistics":
            if outcome.stats is None:
                raise TrainingError(f"statistics task {task.task_id}: the handler returned no stats")
            count, mean, m2 = outcome.stats
            fields["stats"] = {"count": int(count),
                               "mean": [float(x) for x in np.asarray(mean, dtype=np.float64).reshape(-1)],
                               "m2": [float(x) for x in np.asarray(m2, dtype=np.float64).reshape(-1)]}
        return fields

    def store(self, task: Task, outcome: TaskOutcome, global_params: np.ndarray | None) -> OutboxEntry:
        """Build, validate and durably store the result of ``task``.

        Raises
        ------
        TrainingError
            The outcome does not fit the task (no params for a train task, wrong size,
            non-finite values, stats missing).
        """
        payload: bytes | None = None
        if task.kind == "train":
            if outcome.params is None:
                raise TrainingError(f"train task {task.task_id}: the handler returned no params")
            params = np.asarray(outcome.params, dtype=np.float32).reshape(-1)
            if global_params is not None and params.size != global_params.size:
                raise TrainingError(f"train task {task.task_id}: {params.size} params returned, "
                                    f"the global model has {global_params.size}")
            if not np.isfinite(params).all():
                raise TrainingError(f"train task {task.task_id}: the new params are not finite")
            payload = self.encode_params(params, task)
        fields = self.fields(task, outcome)
        try:
            protocol.encode(MsgType.RESULT, fields, payload)  # the wire's own checks, before storing
        except ProtocolError as exc:
            raise TrainingError(f"{task.kind} task {task.task_id}: result not sendable: {exc}") from exc
        entry = OutboxEntry(task_id=task.task_id, round=task.round, kind=task.kind, fields=fields,
                            payload=payload)
        self.outbox.put(entry)
        return entry
