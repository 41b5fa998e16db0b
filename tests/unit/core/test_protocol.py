"""The wire protocol: round trips of every type, field validation, hostile input fuzzed."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgate.core.errors import ProtocolError
from fedgate.core.protocol import (
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    MessageError,
    MsgType,
    decode,
    encode,
    new_task_id,
    valid_agent_name,
)

TID = "0123456789abcdef0123456789abcdef"
SPEC = {"kind": "logistic", "n_features": 3, "n_outputs": 1}
DEEP: dict = {"leaf": 1}
for _ in range(12):
    DEEP = {"n": DEEP}
HYPER = {"epochs": 1, "batch_size": 32, "lr": 0.05, "lr_schedule": "constant", "l2": 0.0, "prox_mu": 0.0}

EXAMPLES: list[tuple[MsgType, dict, bytes | None]] = [
    (MsgType.HELLO, {"agent": "press-07", "software": "fedgate 0.1.0", "features": ["a", "b", "c"],
                     "n_samples": 1200}, None),
    (MsgType.RESULT, {"agent": "press-07", "task_id": TID, "round": 3, "kind": "train", "n_samples": 50,
                      "metrics": {"loss": 0.25, "accuracy": 0.9}}, b"\x01\x02\x03\x04"),
    (MsgType.RESULT, {"agent": "press-07", "task_id": TID, "round": 0, "kind": "statistics", "n_samples": 5,
                      "metrics": {}, "stats": {"count": 5, "mean": [1.0, 2.0], "m2": [0.5, 0.0]}}, None),
    (MsgType.RESULT, {"agent": "p", "task_id": TID, "round": 4, "kind": "evaluate", "n_samples": 9,
                      "metrics": {"loss": 1.5}}, None),
    (MsgType.HEARTBEAT, {"agent": "press-07"}, None),
    (MsgType.HEARTBEAT, {}, None),
    (MsgType.BYE, {"agent": "press-07"}, None),
    (MsgType.WELCOME, {"federation": "line-3", "round": 2, "heartbeat_s": 5.0, "spec": SPEC,
                       "features": ["a", "b", "c"], "label": "fault"}, None),
    (MsgType.REFUSE, {"code": "missing_features", "message": "agent lacks c", "missing": ["c"]}, None),
    (MsgType.TASK, {"task_id": TID, "round": 3, "kind": "train", "deadline_s": 30.0, "spec": SPEC,
                    "features": ["a", "b", "c"], "label": "fault",
                    "scaler": {"mean": [0.0, 1.0, 2.0], "std": [1.0, 1.0, 2.0]},
                    "hyper": HYPER, "codec": "q8", "codec_params": {"block": 256}}, b"payload"),
    (MsgType.TASK, {"task_id": TID, "round": 0, "kind": "statistics", "deadline_s": 30.0, "spec": SPEC,
                    "features": ["a"], "label": "fault", "scaler": None, "hyper": HYPER, "codec": "f32",
                    "codec_params": {}}, None),
    (MsgType.ACK, {"task_id": TID, "status": "rejected", "reason": "nonfinite"}, None),
    (MsgType.COMMITTED, {"round": 7}, None),
    (MsgType.MODEL, {"round": 7, "spec": SPEC, "features": ["a"], "label": "y", "scaler": None}, b"\x00" * 8),
    (MsgType.ERROR, {"code": "version", "message": "speak 1"}, None),
]


@pytest.mark.parametrize("msg_type,fields,payload", EXAMPLES, ids=[e[0].value for e in EXAMPLES])
def test_round_trip_every_type(msg_type, fields, payload):
    frames = encode(msg_type, fields, payload)
    assert len(frames) == (1 if payload is None else 2)
    msg = decode(frames)
    assert msg.type is msg_type
    assert msg.fields == fields
    if payload is None:
        assert msg.payload is None
    else:
        assert bytes(msg.payload) == payload


def test_payload_is_not_copied():
    buf = np.arange(16, dtype=np.float32)
    frames = encode(MsgType.MODEL, {"round": 1, "spec": SPEC, "features": ["a"], "label": "y"}, memoryview(buf))
    msg = decode(frames)
    buf[0] = 42.0
    assert np.frombuffer(msg.payload, dtype=np.float32)[0] == 42.0


def test_header_has_version_and_type():
    head = json.loads(encode(MsgType.COMMITTED, {"round": 1})[0])
    assert head == {"v": PROTOCOL_VERSION, "type": "committed", "round": 1}


def test_unknown_fields_are_dropped_for_additive_growth():
    raw = json.dumps({"v": 1, "type": "committed", "round": 2, "future": [1, 2]}).encode()
    assert decode([raw]).fields == {"round": 2}


def _raw(obj) -> bytes:
    return json.dumps(obj).encode()


def test_version_mismatch_has_version_code():
    with pytest.raises(MessageError) as info:
        decode([_raw({"v": 2, "type": "committed", "round": 1})])
    assert info.value.code is ErrorCode.VERSION


def test_unknown_type_has_unknown_type_code():
    with pytest.raises(MessageError) as info:
        decode([_raw({"v": 1, "type": "launch_missiles"})])
    assert info.value.code is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize("frames,needle", [
    ([], "1 or 2 frames"),
    ([b"{}", b"x", b"y"], "1 or 2 frames"),
    ([b""], "empty header"),
    ([b"\xff\xfe"], "UTF-8 JSON"),
    ([b"[1,2]"], "JSON object"),
    ([b"{" * 50000], "UTF-8 JSON"),
    ([b"[" * 60000], "UTF-8 JSON"),
    ([b" " * (MAX_HEADER_BYTES + 1)], "exceeds"),
    ([_raw({"type": "committed", "round": 1})], "field v"),
    ([_raw({"v": True, "type": "committed", "round": 1})], "field v"),
    ([_raw({"v": 1, "type": "committed"})], "missing field round"),
    ([_raw({"v": 1, "type": "committed", "round": -1})], "round"),
    ([_raw({"v": 1, "type": "committed", "round": 1.5})], "round"),
    ([_raw({"v": 1, "type": "committed", "round": True})], "round"),
    ([_raw({"v": 1, "type": "committed", "round": 2**60})], "round"),
    ([b'{"v":1,"type":"committed","round":1e400}'], "round"),
    ([b'{"v":1,"type":"error","code":"x","message":NaN}'], "UTF-8 JSON"),
    ([_raw({"v": 1, "type": "committed", "round": 1}), b"payload"], "no payload"),
    ([_raw({"v": 1, "type": "model", "round": 1, "spec": {}, "features": [], "label": "y"})], "needs a payload"),
    ([_raw({"v": 1, "type": "hello", "agent": "../etc", "software": "x", "features": [], "n_samples": 1})],
     "agent"),
    ([_raw({"v": 1, "type": "hello", "agent": "a", "software": "x", "features": ["f", "f"], "n_samples": 1})],
     "unique"),
    ([_raw({"v": 1, "type": "ack", "task_id": "XYZ", "status": "accepted"})], "task_id"),
    ([_raw({"v": 1, "type": "ack", "task_id": TID, "status": "maybe"})], "status"),
    ([_raw({"v": 1, "type": "result", "agent": "a", "task_id": TID, "round": 1, "kind": "statistics",
            "n_samples": 1, "metrics": {}})], "stats"),
    ([_raw({"v": 1, "type": "result", "agent": "a", "task_id": TID, "round": 1, "kind": "statistics",
            "n_samples": 1, "metrics": {}, "stats": {"count": 1, "mean": [1.0], "m2": [-1.0]}})], "m2"),
    ([_raw({"v": 1, "type": "result", "agent": "a", "task_id": TID, "round": 1, "kind": "statistics",
            "n_samples": 1, "metrics": {}, "stats": {"count": 1, "mean": [1.0, 2.0], "m2": [1.0]}})], "same length"),
    ([_raw({"v": 1, "type": "result", "agent": "a", "task_id": TID, "round": 1, "kind": "evaluate",
            "n_samples": 1, "metrics": {"loss": "low"}})], "metrics.loss"),
    ([_raw({"v": 1, "type": "welcome", "federation": "f", "round": 1, "heartbeat_s": 0, "spec": {},
            "features": [], "label": "y"})], "heartbeat_s"),
    ([_raw({"v": 1, "type": "model", "round": 1, "spec": DEEP, "features": [], "label": "y"}), b"p"], "nested"),
    ([_raw({"v": 1, "type": "task", "task_id": TID, "round": 1, "kind": "train", "deadline_s": 5,
            "spec": {}, "features": ["a"], "label": "y", "hyper": HYPER, "codec": "zip"}), b"p"], "codec"),
    ([_raw({"v": 1, "type": "task", "task_id": TID, "round": 1, "kind": "train", "deadline_s": 5,
            "spec": {}, "features": ["a"], "label": "y", "hyper": {"epochs": 1}, "codec": "f32"}), b"p"],
     "batch_size"),
    ([_raw({"v": 1, "type": "task", "task_id": TID, "round": 1, "kind": "train", "deadline_s": 5,
            "spec": {}, "features": ["a"], "label": "y", "scaler": {"mean": [1.0], "std": [1.0, 2.0]},
            "hyper": HYPER, "codec": "f32"}), b"p"], "same length"),
    ([_raw({"v": 1, "type": "committed", "round": 1}), b""], "empty payload"),
    ([object()], "buffer"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, needle):
    with pytest.raises(MessageError) as info:
        decode(frames)
    assert needle in str(info.value)
    assert info.value.code is ErrorCode.BAD_MESSAGE


def test_encode_validates_too():
    with pytest.raises(MessageError, match="task_id"):
        encode(MsgType.ACK, {"task_id": "nope", "status": "accepted"})
    with pytest.raises(MessageError) as info:
        encode("nonsense", {})
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    with pytest.raises(MessageError, match="exceeds"):
        encode(MsgType.HELLO, {"agent": "a", "software": "s", "n_samples": 0,
                               "features": [f"f{i:0>200}" for i in range(400)]})


def test_new_task_id_is_a_valid_unique_nonce():
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000
    msg = decode(encode(MsgType.COMMITTED, {"round": 0}))
    assert msg.fields["round"] == 0
    for tid in list(ids)[:5]:
        assert decode(encode(MsgType.ACK, {"task_id": tid, "status": "accepted"})).fields["task_id"] == tid


def test_valid_agent_name():
    assert valid_agent_name("press-07.line_3")
    for bad in ("", "-x", "a/b", "a b", "x" * 129, 7, None, "é"):
        assert not valid_agent_name(bad)


# ------------------------------------------------------------------ fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
field_names = st.sampled_from(
    ["agent", "software", "features", "n_samples", "task_id", "round", "kind", "metrics", "stats", "federation",
     "heartbeat_s", "spec", "label", "code", "message", "missing", "deadline_s", "scaler", "hyper", "codec",
     "codec_params", "status", "reason", "mean", "m2", "count"]
)
headers = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, 2, "1", None]),
     "type": st.sampled_from([t.value for t in MsgType] + ["x", 3, None])},
    optional={},
).flatmap(lambda base: st.dictionaries(field_names, json_values, max_size=8).map(lambda extra: {**extra, **base}))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.one_of(st.none(), st.binary(max_size=16)))
def test_fuzz_structured_headers_raise_only_protocol_error(head, payload):
    frames = [json.dumps(head).encode()] + ([] if payload is None else [payload])
    try:
        msg = decode(frames)
    except ProtocolError:
        return
    # what passes must survive a re-encode unchanged
    again = decode(encode(msg.type, msg.fields, msg.payload))
    assert again.fields == msg.fields


@settings(max_examples=600, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_fuzz_raw_bytes_raise_only_protocol_error(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.binary(min_size=1, max_size=1))
def test_fuzz_mutated_valid_messages(pos, byte):
    header = bytearray(encode(*EXAMPLES[9][:2], EXAMPLES[9][2])[0])
    header[pos % len(header)] = byte[0]
    try:
        decode([bytes(header), b"p"])
    except ProtocolError:
        pass
