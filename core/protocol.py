"""The fedgate wire protocol: message types, encoding and validating decoding.

A message is one or two ZeroMQ frames: a small UTF-8 JSON header (at most
:data:`MAX_HEADER_BYTES`) that always holds ``{"v": PROTOCOL_VERSION, "type": ...}``
plus the type's fields, and, for models and updates, one binary payload frame holding
a codec-encoded flat float32 vector (see :mod:`fedgate.core.codec`). The payload is
passed through untouched as a ``memoryview``, so it is never copied here.

:func:`decode` validates every field of every type (types, ranges, lengths) and raises
:class:`MessageError` (a :class:`~fedgate.core.errors.ProtocolError`) and nothing else on
malformed or hostile input; the error's ``code`` says which ``error`` reply fits
(``"version"``, ``"unknown_type"`` or ``"bad_message"``). Unknown extra header fields
are ignored (dropped), so the protocol can grow additively. The full description of
every type, field and error code is ``docs/protocol.md``.

>>> frames = encode(MsgType.HEARTBEAT, {"agent": "press-07"})
>>> msg = decode(frames)
>>> msg.type, msg.fields, msg.payload
(<MsgType.HEARTBEAT: 'heartbeat'>, {'agent': 'press-07'}, None)

This module imports only the standard library (no zmq): frames are anything that
exposes the buffer protocol (``bytes``, ``memoryview``, ``zmq.Frame``).
"""
from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from fedgate.core.errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_HEADER_BYTES",
    "MsgType",
    "TaskKind",
    "AckStatus",
    "ErrorCode",
    "CODECS",
    "Message",
    "MessageError",
    "encode",
    "encode_parts",
    "decode",
    "new_task_id",
    "new_task_ids",
    "valid_agent_name",
]

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_LIST = 4096          # features, scaler/stat vectors
MAX_METRICS = 256
MAX_STR = 256            # names, codes, software strings
MAX_TEXT = 4096          # human messages
MAX_INT = 2**53          # JSON-safe integers
MAX_DEPTH = 8            # nesting of free-form tables (spec, codec_params)

CODECS = ("f32", "f16", "q8", "topk")
_AGENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_TASK_ID_RE = re.compile(r"[0-9a-f]{32}\Z")


class MsgType(str, Enum):
    """Every message type; the first five come from agents, the rest from the server."""

    HELLO = "hello"
    RESULT = "result"
    HEARTBEAT = "heartbeat"
    BYE = "bye"
    WELCOME = "welcome"
    REFUSE = "refuse"
    TASK = "task"
    ACK = "ack"
    COMMITTED = "committed"
    MODEL = "model"
    ERROR = "error"


class TaskKind(str, Enum):
    STATISTICS = "statistics"
    TRAIN = "train"
    EVALUATE = "evaluate"


class AckStatus(str, Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"


class ErrorCode(str, Enum):
    """Codes of ``error`` messages (and of :class:`MessageError`)."""

    VERSION = "version"
    UNKNOWN_TYPE = "unknown_type"
    BAD_MESSAGE = "bad_message"
    UNAUTHORIZED = "unauthorized"
    STALE_TASK = "stale_task"
    NOT_REGISTERED = "not_registered"


class MessageError(ProtocolError):
    """A malformed message; ``code`` is the :class:`ErrorCode` a reply should carry.

    ``msg_type`` is the message's type when it could be read, else ``None``.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_MESSAGE,
                 msg_type: MsgType | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.msg_type = msg_type


@dataclass(frozen=True)
class Message:
    """A decoded message.

    Attributes
    ----------
    type : MsgType
    fields : dict
        The validated header fields of the type (without ``v`` and ``type``).
    payload : memoryview or None
        The binary frame, uncopied (a codec-encoded float32 vector), when present.
    """

    type: MsgType
    fields: dict[str, Any]
    payload: memoryview | None = None


def new_task_id() -> str:
    """A fresh random task nonce: 32 lowercase hex characters (128 bits)."""
    return secrets.token_hex(16)


def new_task_ids(n: int) -> list[str]:
    """``n`` fresh random task nonces (as :func:`new_task_id`, from one system call)."""
    text = secrets.token_hex(16 * n)
    return [text[i: i + 32] for i in range(0, 32 * n, 32)]


def valid_agent_name(name: object) -> bool:
    """True if ``name`` is a legal agent name (a key file stem: ``[A-Za-z0-9][A-Za-z0-9._-]*``)."""
    return isinstance(name, str) and _AGENT_RE.match(name) is not None


# ---------------------------------------------------------------- field checkers
# Each checker takes (value, path) and returns the normalised value or raises.

Checker = Callable[[Any, str], Any]


def _fail(path: str, what: str, value: Any) -> MessageError:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return MessageError(f"field {path}: {what}, got {text}")


def _int(lo: int = 0, hi: int = MAX_INT) -> Checker:
    def check(v: Any, path: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _fail(path, "expected an integer", v)
        if not lo <= v <= hi:
            raise _fail(path, f"must be in [{lo}, {hi}]", v)
        return v
    return check


def _float(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> Checker:
    def check(v: Any, path: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(path, "expected a number", v)
        try:
            f = float(v)
        except OverflowError:
            raise _fail(path, "must be finite", v) from None
        if not math.isfinite(f):
            raise _fail(path, "must be finite", v)
        if f < lo or f > hi or (lo_open and f == lo):
            raise _fail(path, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]", v)
        return f
    return check


def _str(max_len: int = MAX_STR, *, min_len: int = 0, pattern: re.Pattern[str] | None = None) -> Checker:
    def check(v: Any, path: str) -> str:
        if not isinstance(v, str):
            raise _fail(path, "expected a string", v)
        if not min_len <= len(v) <= max_len:
            raise _fail(path, f"length must be in [{min_len}, {max_len}]", v)
        if pattern is not None and pattern.match(v) is None:
            raise _fail(path, f"must match {pattern.pattern}", v)
        return v
    return check


def _choice(enum: type[Enum]) -> Checker:
    values = {e.value: e for e in enum}

    def check(v: Any, path: str) -> str:
        if not isinstance(v, str) or v not in values:
            raise _fail(path, f"must be one of {sorted(values)}", v)
        return v
    return check


def _list(item: Checker, max_len: int = MAX_LIST, *, unique: bool = False) -> Checker:
    def check(v: Any, path: str) -> list[Any]:
        if not isinstance(v, list):
            raise _fail(path, "expected an array", v)
        if len(v) > max_len:
            raise _fail(path, f"at most {max_len} items", len(v))
        out = [item(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if unique and len(set(out)) != len(out):
            raise _fail(path, "items must be unique", v)
        return out
    return check


def _float_list(*, ge: float = -math.inf) -> Checker:
    def check(v: Any, path: str) -> list[float]:
        if not isinstance(v, list):
            raise _fail(path, "expected an array", v)
        if len(v) > MAX_LIST:
            raise _fail(path, f"at most {MAX_LIST} items", len(v))
        out = []
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise _fail(path, "expected numbers", x)
            try:
                f = float(x)
            except OverflowError:
                raise _fail(path, "numbers must be finite", x) from None
            if not math.isfinite(f) or f < ge:
                raise _fail(path, f"numbers must be finite and >= {ge:g}", x)
            out.append(f)
        return out
    return check


def _table(v: Any, path: str, depth: int = 0) -> dict[str, Any]:
    """A free-form JSON object (e.g. a model spec): string keys, bounded nesting."""
    if not isinstance(v, dict):
        raise _fail(path, "expected an object", v)
    _check_free(v, path, depth)
    return v


def _check_free(v: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _fail(path, f"nested deeper than {MAX_DEPTH}", "...")
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise _fail(path, "keys must be strings", k)
            _check_free(x, f"{path}.{k}", depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_free(x, f"{path}[{i}]", depth + 1)
    elif isinstance(v, float) and not math.isfinite(v):
        raise _fail(path, "numbers must be finite", v)
    elif v is not None and not isinstance(v, (str, int, float, bool)):
        raise _fail(path, "not a JSON value", type(v).__name__)


def _record(spec: Mapping[str, tuple[Checker, bool]]) -> Checker:
    """A JSON object with known fields ``{name: (checker, required)}``; others dropped."""
    def check(v: Any, path: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise _fail(path, "expected an object", v)
        return _fields(v, spec, path)
    return check


def _fields(v: Mapping[str, Any], spec: Mapping[str, tuple[Checker, bool]], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (checker, required) in spec.items():
        if name in v and v[name] is not None:
            out[name] = checker(v[name], f"{path}{name}" if not path else f"{path}.{name}")
        elif name in v and v[name] is None and not required:
            out[name] = None
        elif required:
            raise MessageError(f"missing field {path + '.' if path else ''}{name}")
    return out


def _metrics(v: Any, path: str) -> dict[str, float]:
    if not isinstance(v, dict):
        raise _fail(path, "expected an object", v)
    if len(v) > MAX_METRICS:
        raise _fail(path, f"at most {MAX_METRICS} entries", len(v))
    key = _str(MAX_STR, min_len=1)
    num = _float()
    return {key(k, f"{path} key"): num(x, f"{path}.{k}") for k, x in v.items()}


def _stats(v: Any, path: str) -> dict[str, Any]:
    out = _record({
        "count": (_int(), True),
        "mean": (_float_list(), True),
        "m2": (_float_list(ge=0.0), True),
    })(v, path)
    if len(out["mean"]) != len(out["m2"]):
        raise _fail(path, "mean and m2 must have the same length", (len(out["mean"]), len(out["m2"])))
    return out


def _scaler(v: Any, path: str) -> dict[str, Any]:
    out = _record({
        "mean": (_float_list(), True),
        "std": (_float_list(ge=0.0), True),
    })(v, path)
    if len(out["mean"]) != len(out["std"]):
        raise _fail(path, "mean and std must have the same length", (len(out["mean"]), len(out["std"])))
    return out


_AGENT = _str(128, min_len=1, pattern=_AGENT_RE)
_TASK_ID = _str(32, min_len=32, pattern=_TASK_ID_RE)
_NAME = _str(MAX_STR, min_len=1)
_FEATURES = _list(_NAME, unique=True)
_ROUND = _int()
_HYPER = _record({
    "epochs": (_int(0, 100_000), True),
    "batch_size": (_int(1, 1 << 24), True),
    "lr": (_float(0.0, 1e6), True),
    "lr_schedule": (_str(64), False),
    "l2": (_float(0.0, 1e6), False),
    "prox_mu": (_float(0.0, 1e6), False),
})

# type -> (field spec, payload rule): payload rule is "never", "always" or a callable
_SCHEMA: dict[MsgType, dict[str, tuple[Checker, bool]]] = {
    MsgType.HELLO: {
        "agent": (_AGENT, True),
        "software": (_str(MAX_STR), True),
        "features": (_FEATURES, True),
        "n_samples": (_int(), True),
        "last_round": (_int(), False),
        "task_models": (_int(0, 1), False),
        "quiet_acks": (_int(0, 1), False),
        "task_commits": (_int(0, 1), False),
    },
    MsgType.RESULT: {
        "agent": (_AGENT, True),
        "task_id": (_TASK_ID, True),
        "round": (_ROUND, True),
        "kind": (_choice(TaskKind), True),
        "n_samples": (_int(), True),
        "metrics": (_metrics, True),
        "stats": (_stats, False),
    },
    MsgType.HEARTBEAT: {
        "agent": (_AGENT, False),
    },
    MsgType.BYE: {
        "agent": (_AGENT, True),
    },
    MsgType.WELCOME: {
        "federation": (_NAME, True),
        "round": (_ROUND, True),
        "heartbeat_s": (_float(0.0, 86400.0, lo_open=True), True),
        "spec": (_table, True),
        "features": (_FEATURES, True),
        "label": (_NAME, True),
    },
    MsgType.REFUSE: {
        "code": (_NAME, True),
        "message": (_str(MAX_TEXT), True),
        "missing": (_list(_NAME), False),
    },
    MsgType.TASK: {
        "task_id": (_TASK_ID, True),
        "round": (_ROUND, True),
        "committed": (_ROUND, False),
        "kind": (_choice(TaskKind), True),
        "deadline_s": (_float(0.0, 7 * 86400.0, lo_open=True), True),
        "spec": (_table, True),
        "features": (_FEATURES, True),
        "label": (_NAME, True),
        "scaler": (_scaler, False),
        "hyper": (_HYPER, True),
        "codec": (_str(16, pattern=re.compile("(" + "|".join(CODECS) + r")\Z")), True),
        "codec_params": (_table, False),
    },
    MsgType.ACK: {
        "task_id": (_TASK_ID, True),
        "status": (_choice(AckStatus), True),
        "reason": (_str(MAX_TEXT), False),
    },
    MsgType.COMMITTED: {
        "round": (_ROUND, True),
    },
    MsgType.MODEL: {
        "round": (_ROUND, True),
        "spec": (_table, True),
        "features": (_FEATURES, True),
        "label": (_NAME, True),
        "scaler": (_scaler, False),
    },
    MsgType.ERROR: {
        "code": (_NAME, True),
        "message": (_str(MAX_TEXT), True),
    },
}


def _payload_rule(msg_type: MsgType, fields: Mapping[str, Any]) -> bool | None:
    """True: a payload is required; False: forbidden; None: optional."""
    if msg_type is MsgType.MODEL:
        return True
    if msg_type is MsgType.TASK:
        return fields["kind"] in (TaskKind.TRAIN.value, TaskKind.EVALUATE.value)
    if msg_type is MsgType.RESULT:
        return fields["kind"] == TaskKind.TRAIN.value
    return False


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
