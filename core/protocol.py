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

The code sits in two private modules, re-exported here: ``_messages`` (types, codes
and the field checkers of every type) and ``_wire`` (encoding, decoding and the
task-header cache).
"""
from __future__ import annotations

from typing import Any  # noqa: F401 - Message's annotations resolve in this module (typing.get_type_hints)

from fedgate.core._messages import (
    CODECS,
    MAX_DEPTH,
    MAX_HEADER_BYTES,
    MAX_INT,
    MAX_LIST,
    MAX_METRICS,
    MAX_STR,
    MAX_TEXT,
    PROTOCOL_VERSION,
    AckStatus,
    Checker,
    ErrorCode,
    Message,
    MessageError,
    MsgType,
    TaskKind,
    new_task_id,
    new_task_ids,
    valid_agent_name,
)
from fedgate.core._wire import decode, encode, encode_parts
from fedgate.core.errors import ProtocolError  # noqa: F401 - MessageError's base, importable here as before

# internals the unit tests compare against each other (schema path vs fast path)
from fedgate.core._messages import _SCHEMA, _TASK_ID_RE, _fields, _payload_rule  # noqa: F401
from fedgate.core._wire import _FAST, _fast_result  # noqa: F401

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

# the public classes and functions present themselves as members of this module
for _name in __all__:
    if callable(globals()[_name]):
        globals()[_name].__module__ = __name__
del _name
