"""What a fedgate message is: its types and codes, and the checkers of every field.

The schema half of :mod:`fedgate.core.protocol` (import the names from there):
:class:`MsgType` and the other str enums, :class:`MessageError`, :class:`Message`,
task nonces and agent names, then one checker per field of every message type
(``_SCHEMA``) and the rule saying which types carry a payload frame. The frames
themselves are built and read in :mod:`fedgate.core._wire`.
"""
from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Mapping
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
