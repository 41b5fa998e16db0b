"""What the uplink's worker thread does around a task: decode, encode, store.

:class:`ResultEncoder` turns a handler's :class:`TaskOutcome` into the ``result``
header fields and codec-encoded payload, validates them exactly as the wire encoder
will, and writes them to the outbox (fsynced) before the uplink sends anything.

With the ``topk`` codec a train result carries the *update*, not the parameters: the
difference new local parameters - global parameters of the task, plus what earlier
rounds left out (error feedback, :class:`TopkFeedback`), of which the k largest
magnitudes are sent with the codec's DELTA flag; the server adds its global model
back before it validates and aggregates.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np

from fedgate.agent.outbox import Outbox, OutboxEntry
from fedgate.agent.uplink_types import Task, TaskOutcome
from fedgate.core import codec, protocol
from fedgate.core.errors import ProtocolError, TrainingError
from fedgate.core.protocol import MsgType

__all__ = ["ResultEncoder", "TaskModels", "TopkFeedback"]

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


class TopkFeedback:
    """The top-k error-feedback residual of one agent, bound to the round it serves.

    ``state(round, dim)`` returns the :class:`~fedgate.core.codec.ErrorFeedback` to
    encode the update of ``round`` with. It keeps a copy of the residual as it was
    before the newest round, so that a round run again (a restarted server re-issues
    the round whose result it lost) starts from the same residual instead of counting
    the first attempt's unsent part twice. The residual is reset to zero when the
    model size changes or the round goes back further (the server resumed from an
    older checkpoint): dropping residual mass only delays small coordinates, applying
    it twice would move the model.

    Not thread-safe; :class:`ResultEncoder` serialises access.
    """

    def __init__(self) -> None:
        self.round: int | None = None  # the round the residual was last used for
        self.ef: Any = None            # codec.ErrorFeedback: the residual after that round
        self._before: np.ndarray | None = None  # float32 (dim,): the residual before it

    def state(self, round_: int, dim: int) -> Any:
        """The error-feedback state to encode the update of ``round_`` (``dim`` values) with."""
        if self.ef is None or self.ef.dim != dim or self._before is None:
            if self.ef is not None:
                log.info("uplink: top-k residual reset (model size %d -> %d)", self.ef.dim, dim)
            self.ef = codec.ErrorFeedback(dim)
            self._before = np.zeros(dim, dtype=np.float32)
        elif self.round is not None and round_ == self.round:
            np.copyto(self.ef.residual, self._before)  # the round again: undo the earlier attempt
        elif self.round is not None and round_ < self.round:
            log.info("uplink: top-k residual reset (round %d after round %d)", round_, self.round)
            self.ef.reset()
            self._before.fill(0.0)
        else:
            np.copyto(self._before, self.ef.residual)
        self.round = round_
        return self.ef

    def undo(self) -> None:
        """The encoding of the current round failed: restore the residual before it."""
        if self.ef is not None and self._before is not None:
            np.copyto(self.ef.residual, self._before)


_HEADERS_KEPT = 8  # encoded result headers kept for sending (one per task in flight is enough)


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
        self.topk = TopkFeedback()  # kept across rounds
        self._topk_lock = threading.Lock()
        self._headers: dict[str, bytes] = {}  # task id -> its stored result's encoded header (newest few)

    def frames(self, entry: OutboxEntry) -> list[bytes | memoryview]:
        """The ``result`` message of a stored entry, ready for ``send_multipart``.

        The header checked and encoded when the entry was stored is used again; an
        entry from an earlier run of the agent is encoded (and checked) afresh.
        """
        header = self._headers.get(entry.task_id)
        if header is None:
            return protocol.encode(MsgType.RESULT, entry.fields, entry.payload)
        return [header] if entry.payload is None else [header, entry.payload]

    @staticmethod
    def decode(buf: bytes | memoryview, *, check_crc: bool = True) -> np.ndarray:
        """A codec-encoded vector from the server -> float32 array of shape (n,).

        ``check_crc=False`` skips the codec's CRC-32 (lengths and fields are still
        checked): for a CURVE link, whose Poly1305 tag already authenticates every byte.
        An ``f32`` model comes back as a read-only view of ``buf`` (no copy; the array
        keeps the frame alive); the other codecs decode into a fresh array.

        Raises
        ------
        ProtocolError
            The buffer is not a valid encoding.
        """
        return codec.decode(buf, check_crc=check_crc, view=True)

    def encode_params(self, params: np.ndarray, task: Task, global_params: np.ndarray | None = None) -> bytes:
        """The train result payload of ``task``: ``params`` encoded with the task's codec.

        Parameters
        ----------
        params : float32 (n,)
            The new local parameters.
        task : Task
            Its ``codec`` and ``codec_params`` choose the encoding.
        global_params : float32 (n,) or None
            The global parameters the task carried; required by ``topk``, which
            encodes ``params - global_params`` (plus the error-feedback residual) as a
            delta, and when ``codec_params`` has ``delta = true`` (asynchronous
            tasks): then every codec sends ``params - global_params`` with the DELTA
            flag, and the server adds its current global model back.

        Raises
        ------
        TrainingError
            Bad codec parameters, or ``topk`` / ``delta`` without (matching) global parameters.
        """
        vec = np.ascontiguousarray(params, dtype=np.float32).reshape(-1)
        params = task.codec_params
        if task.codec == "topk":
            return self._encode_topk(vec, task, global_params)
        delta = params.get("delta") is True
        if delta:
            vec = np.subtract(vec, self._reference(vec, task, global_params))
        try:
            if task.codec == "q8":
                # a per-task seed: stochastic rounding errors do not repeat from round to round
                seed = int(params.get("seed", int(task.task_id[:8], 16)))
                return codec.encode(vec, "q8", block=int(params.get("block", 256)), seed=seed % 2**32, delta=delta)
            return codec.encode(vec, task.codec, delta=delta)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"task {task.task_id}: cannot encode with {task.codec} {params}: {exc}") from exc

    @staticmethod
    def _reference(vec: np.ndarray, task: Task, global_params: np.ndarray | None) -> np.ndarray:
        """The task's global params (float32 (n,)) a delta is taken from."""
        if global_params is None:
            raise TrainingError(f"task {task.task_id}: {task.codec} delta encodes an update and needs the "
                                "task's global params")
        ref = np.asarray(global_params, dtype=np.float32).reshape(-1)
        if ref.size != vec.size:
            raise TrainingError(f"task {task.task_id}: {vec.size} params, the global model has {ref.size}")
        return ref

    def _encode_topk(self, vec: np.ndarray, task: Task, global_params: np.ndarray | None) -> bytes:
        ref = self._reference(vec, task, global_params)
        try:
            k = float(task.codec_params.get("k", 0.01))
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"task {task.task_id}: topk k = {task.codec_params.get('k')!r}: {exc}") from exc
        update = np.subtract(vec, ref)
        with self._topk_lock:
            state = self.topk.state(task.round, vec.size)
            try:
                return codec.encode(update, "topk", k=k, state=state, delta=True)
            except BaseException as exc:
                self.topk.undo()
                if isinstance(exc, (TypeError, ValueError)):
                    raise TrainingError(f"task {task.task_id}: cannot encode with topk k = {k!r}: {exc}") from exc
                raise

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
            # (no finite check here: the codec refuses a non-finite value in a pass of its own)
            payload = self.encode_params(params, task, global_params)
        try:
            fields = self.fields(task, outcome)
            try:  # the wire's own checks, before storing; the stored fields are the header's JSON
                frames, fields_json = protocol.encode_parts(MsgType.RESULT, fields, payload)
            except ProtocolError as exc:
                raise TrainingError(f"{task.kind} task {task.task_id}: result not sendable: {exc}") from exc
            entry = OutboxEntry(task_id=task.task_id, round=task.round, kind=task.kind, fields=fields,
                                payload=payload)
            self.outbox.put(entry, fields_json)
            self._headers[task.task_id] = frames[0]
            while len(self._headers) > _HEADERS_KEPT:
                self._headers.pop(next(iter(self._headers)))
        except BaseException:
            if payload is not None and task.codec == "topk":  # never sent: its part stays in the residual
                with self._topk_lock:
                    if self.topk.round == task.round:
                        self.topk.undo()
            raise
        return entry
