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

__all__ = ["ResultEncoder"]

log = logging.getLogger(__name__)


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
