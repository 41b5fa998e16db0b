"""Frames to messages and back: encoding, validating decoding, the task-header cache.

The wire half of :mod:`fedgate.core.protocol` (import the names from there). The
messages of every round go through straight-line fast checkers first, anything
else through the schema of :mod:`fedgate.core._messages`; both accept and refuse
the same input.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedgate.core._messages import (
    _AGENT_RE,
    _SCHEMA,
    _TASK_ID_RE,
    MAX_HEADER_BYTES,
    MAX_INT,
    MAX_METRICS,
    MAX_STR,
    MAX_TEXT,
    PROTOCOL_VERSION,
    AckStatus,
    ErrorCode,
    Message,
    MessageError,
    MsgType,
    TaskKind,
    _fields,
    _payload_rule,
)

__all__ = ["encode", "encode_parts", "decode"]


# ---------------------------------------------------------------- fast paths
# The messages of every round (results, acks, heartbeats, commits) are checked by
# straight-line code first. A fast checker returns exactly what the schema checker
# would, or None for anything unusual, which then goes through the schema checker
# (and gets its precise error), so both paths accept and refuse the same input.

_KIND_PAYLOAD = {TaskKind.TRAIN.value: True, TaskKind.EVALUATE.value: False}
_STATUSES = frozenset(s.value for s in AckStatus)
_TYPES = {t.value: t for t in MsgType}


def _fast_metrics(metrics: Any) -> dict[str, float] | None:
    if type(metrics) is not dict or len(metrics) > MAX_METRICS:
        return None
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        if type(key) is not str or not 0 < len(key) <= MAX_STR:
            return None
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                return None
        elif kind is int:
            try:
                value = float(value)
            except OverflowError:
                return None
        else:
            return None
        clean[key] = value
    return clean


def _fast_result(raw: Mapping[str, Any], n_payload: int) -> dict[str, Any] | None:
    """A train or evaluate result (statistics results take the schema path)."""
    get = raw.get
    agent, tid, rnd, kind, n = get("agent"), get("task_id"), get("round"), get("kind"), get("n_samples")
    if (type(agent) is not str or _AGENT_RE.match(agent) is None
            or type(tid) is not str or _TASK_ID_RE.match(tid) is None
            or type(rnd) is not int or not 0 <= rnd <= MAX_INT
            or type(n) is not int or not 0 <= n <= MAX_INT
            or type(kind) is not str or _KIND_PAYLOAD.get(kind) is not (n_payload > 0)
            or get("stats") is not None):
        return None
    metrics = _fast_metrics(get("metrics"))
    if metrics is None:
        return None
    fields = {"agent": agent, "task_id": tid, "round": rnd, "kind": kind, "n_samples": n, "metrics": metrics}
    if "stats" in raw:
        fields["stats"] = None
    return fields


def _fast_heartbeat(raw: Mapping[str, Any], n_payload: int) -> dict[str, Any] | None:
    if n_payload:
        return None
    if "agent" not in raw:
        return {}
    agent = raw["agent"]
    if type(agent) is not str or _AGENT_RE.match(agent) is None:
        return None
    return {"agent": agent}


def _fast_ack(raw: Mapping[str, Any], n_payload: int) -> dict[str, Any] | None:
    tid, status = raw.get("task_id"), raw.get("status")
    if (n_payload or type(tid) is not str or _TASK_ID_RE.match(tid) is None
            or type(status) is not str or status not in _STATUSES):
        return None
    if "reason" not in raw:
        return {"task_id": tid, "status": status}
    reason = raw["reason"]
    if type(reason) is not str or len(reason) > MAX_TEXT:
        return None
    return {"task_id": tid, "status": status, "reason": reason}


def _fast_committed(raw: Mapping[str, Any], n_payload: int) -> dict[str, Any] | None:
    rnd = raw.get("round")
    if n_payload or type(rnd) is not int or not 0 <= rnd <= MAX_INT:
        return None
    return {"round": rnd}


_FAST: dict[MsgType, Callable[[Mapping[str, Any], int], dict[str, Any] | None]] = {
    MsgType.RESULT: _fast_result,
    MsgType.HEARTBEAT: _fast_heartbeat,
    MsgType.ACK: _fast_ack,
    MsgType.COMMITTED: _fast_committed,
}


def _validate(msg_type: MsgType, raw: Mapping[str, Any], n_payload: int) -> dict[str, Any]:
    fast = _FAST.get(msg_type)
    if fast is not None:
        fields = fast(raw, n_payload)
        if fields is not None:
            return fields
    try:
        fields = _fields(raw, _SCHEMA[msg_type], "")
    except MessageError as exc:
        exc.msg_type = msg_type
        raise
    if msg_type is MsgType.RESULT and fields["kind"] == TaskKind.STATISTICS.value and "stats" not in fields:
        raise MessageError("a statistics result needs the field stats", msg_type=msg_type)
    rule = _payload_rule(msg_type, fields)
    if rule is True and n_payload == 0:
        raise MessageError(f"a {msg_type.value} message of this kind needs a payload frame", msg_type=msg_type)
    if rule is False and n_payload:
        raise MessageError(f"a {msg_type.value} message of this kind takes no payload frame", msg_type=msg_type)
    return fields


# ---------------------------------------------------------------- encode / decode

def encode(msg_type: MsgType | str, fields: Mapping[str, Any],
           payload: bytes | memoryview | None = None) -> list[bytes | memoryview]:
    """Build the frames of one message, validating the fields as :func:`decode` would.

    Parameters
    ----------
    msg_type : MsgType or str
    fields : mapping
        The type's fields (``v`` and ``type`` are added here).
    payload : bytes-like, optional
        The codec-encoded vector; passed through without a copy.

    Returns
    -------
    list
        ``[header]`` or ``[header, payload]``, ready for ``send_multipart``.

    Raises
    ------
    MessageError
        The fields do not satisfy the schema of the type.
    """
    return encode_parts(msg_type, fields, payload)[0]


def encode_parts(msg_type: MsgType | str, fields: Mapping[str, Any],
                 payload: bytes | memoryview | None = None) -> tuple[list[bytes | memoryview], str]:
    """As :func:`encode`, and the JSON text of the validated fields alone (without ``v``
    and ``type``): the header is that text with ``v`` and ``type`` put in front, so a
    caller that keeps the fields as JSON (the agent's outbox) encodes them once."""
    mt = msg_type if msg_type.__class__ is MsgType else None
    if mt is None:
        try:
            mt = MsgType(msg_type)
        except ValueError as exc:
            raise MessageError(f"unknown message type {msg_type!r}", ErrorCode.UNKNOWN_TYPE) from exc
    n_payload = 0 if payload is None else len(memoryview(payload))
    if payload is not None and n_payload == 0:
        raise MessageError("an empty payload frame is not allowed", msg_type=mt)
    clean = _validate(mt, fields, n_payload)
    try:
        body = _JSON_OUT.encode(clean)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"fields not JSON-encodable: {exc}", msg_type=mt) from exc
    lead = _HEAD_LEAD[mt]
    header = (lead + "}" if body == "{}" else lead + "," + body[1:]).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise MessageError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}", msg_type=mt)
    return ([header] if payload is None else [header, payload]), body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_JSON_OUT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
# a header starts with the version and the type, then the fields: {"v":1,"type":"task",...}
_HEAD_LEAD = {mt: '{"v":%d,"type":%s' % (PROTOCOL_VERSION, _JSON_OUT.encode(mt.value)) for mt in MsgType}


class _TaskHeaders:
    """Validated fields of recent task headers, keyed by the header with its nonce and round zeroed.

    The tasks of a round differ only in ``task_id`` (the server splices each nonce into
    one header), and one federation's rounds differ only in ``round``, so an agent checks
    the header of a federation's tasks once. A header is remembered only when its one
    literal ``"task_id":"`` is the nonce itself and it holds no backslash (no escaped key
    can repeat the field). When the nonce is directly followed by the one literal
    ``"round":`` and a JSON integer, that integer is blanked too (one literal: no
    duplicate key can hide a different value); likewise a ``"committed":`` integer right
    after that round. A header that matches a remembered one in every byte but a
    lowercase-hex nonce and such round numbers has the same structure and fields, so its
    fields are the remembered ones with the new nonce and numbers (a shallow copy: nested
    objects are shared, read-only).
    """

    MAX = 8
    MARK = b'"task_id":"'
    ROUND = b'","round":'
    COMMITTED = b'"committed":'

    def __init__(self) -> None:
        self._known: dict[tuple[bytes, int], dict[str, Any]] = {}

    def _split(self, data: bytes) -> tuple[bytes, int, int | None, int | None] | None:
        """(key, nonce offset, round or None, committed or None) of a cacheable header, else None."""
        at = data.find(self.MARK)
        if at < 0 or data.find(self.MARK, at + 1) >= 0 or b"\\" in data:
            return None
        start = at + len(self.MARK)
        if _TASK_ID_BYTES_RE.match(data, start) is None:
            return None
        key = data[:start] + b"0" * 32
        rest = start + 32
        m = _ROUND_BYTES_RE.match(data, rest)
        if m is None or data.count(b'"round":') != 1:
            return key + data[rest:], start, None, None
        c = _COMMITTED_BYTES_RE.match(data, m.end())
        if c is None or data.count(b'"committed":') != 1:
            return key + self.ROUND + b"0" + data[m.end(1):], start, int(m.group(1)), None
        return (key + self.ROUND + b"0," + self.COMMITTED + b"0" + data[c.end(1):], start, int(m.group(1)),
                int(c.group(1)))

    def get(self, data: bytes, n_payload: int) -> dict[str, Any] | None:
        if not self._known or len(data) < 200:
            return None
        split = self._split(data)
        if split is None:
            return None
        known = self._known.get((split[0], n_payload > 0))
        if known is None:
            return None
        fields = dict(known)
        fields["task_id"] = data[split[1]: split[1] + 32].decode("ascii")
        if split[2] is not None:
            fields["round"] = split[2]
        if split[3] is not None:
            fields["committed"] = split[3]
        return fields

    def put(self, data: bytes, n_payload: int, fields: dict[str, Any]) -> None:
        split = self._split(data)
        if split is None or fields.get("task_id") != data[split[1]: split[1] + 32].decode("ascii"):
            return
        if split[2] is not None and fields.get("round") != split[2]:
            return
        if split[3] is not None and fields.get("committed") != split[3]:
            return
        if len(self._known) >= self.MAX:
            self._known.clear()
        self._known[(split[0], n_payload > 0)] = dict(fields)


_TASK_ID_BYTES_RE = re.compile(rb"[0-9a-f]{32}\"")
_ROUND_BYTES_RE = re.compile(rb'","round":(0|[1-9][0-9]{0,14}),')  # a JSON integer below MAX_INT
_COMMITTED_BYTES_RE = re.compile(rb'"committed":(0|[1-9][0-9]{0,14}),')
_TASKS = _TaskHeaders()


def decode(frames: Sequence[Any]) -> Message:
    """Parse and validate the application frames of one message.

    Parameters
    ----------
    frames : sequence of bytes-like
        ``[header]`` or ``[header, payload]`` (without the ROUTER's routing-id frame);
        each item must support the buffer protocol (``bytes``, ``memoryview``,
        ``zmq.Frame``).

    Returns
    -------
    Message

    Raises
    ------
    MessageError
        Anything malformed: frame count, header size, JSON, version (code
        ``version``), type (code ``unknown_type``), any field (code ``bad_message``).
    """
    try:
        n = len(frames)
    except TypeError as exc:
        raise MessageError("frames must be a sequence") from exc
    if n not in (1, 2):
        raise MessageError(f"a message has 1 or 2 frames, got {n}")
    try:
        views = [memoryview(f) for f in frames]
    except TypeError as exc:
        raise MessageError("a frame does not expose a buffer") from exc
    header = views[0]
    if header.nbytes > MAX_HEADER_BYTES:
        raise MessageError(f"header of {header.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    if header.nbytes == 0:
        raise MessageError("empty header frame")
    data = header.tobytes()
    cached = _TASKS.get(data, views[1].nbytes if n == 2 else 0)
    if cached is not None:
        return Message(MsgType.TASK, cached, _payload_view(views, MsgType.TASK))
    try:
        raw = _JSON.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"header is not UTF-8 JSON: {exc}") from exc
    if type(raw) is not dict:
        raise MessageError("header must be a JSON object")
    version = raw.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise MessageError(f"field v: expected an integer, got {version!r}"[:200])
    if version != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {version} not supported (this side speaks {PROTOCOL_VERSION})",
                           ErrorCode.VERSION)
    type_name = raw.get("type")
    mt = _TYPES.get(type_name) if type(type_name) is str else None
    if mt is None:
        shown = repr(type_name)[:80]
        raise MessageError(f"unknown message type {shown}", ErrorCode.UNKNOWN_TYPE)
    payload = _payload_view(views, mt)
    n_payload = 0 if payload is None else payload.nbytes
    fields = _validate(mt, raw, n_payload)
    if mt is MsgType.TASK:
        _TASKS.put(data, n_payload, fields)
    return Message(mt, fields, payload)


def _payload_view(views: list[memoryview], mt: MsgType) -> memoryview | None:
    if len(views) == 1:
        return None
    payload = views[1]
    if payload.format != "B" or payload.ndim != 1:
        try:
            payload = payload.cast("B")
        except (TypeError, ValueError) as exc:
            raise MessageError("payload frame is not a contiguous buffer", msg_type=mt) from exc
    if payload.nbytes == 0:
        raise MessageError("empty payload frame", msg_type=mt)
    return payload
