"""The straight-line checkers of the per-round messages agree with the schema checker,
and the task-header memory returns exactly what a full decode would."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgate.core import protocol
from fedgate.core.protocol import MessageError, MsgType, decode, encode, encode_parts, new_task_id

TID = "0123456789abcdef" * 2
SPEC = {"kind": "mlp", "n_features": 3, "n_outputs": 1, "hidden": [8], "activation": "relu", "loss": "squared"}
HYPER = {"epochs": 1, "batch_size": 32, "lr": 0.01, "lr_schedule": "constant", "l2": 0.0, "prox_mu": 0.0}


def _schema(mt: MsgType, raw: dict, n_payload: int) -> dict | None:
    """What the generic schema checker says: the fields, or None when it refuses."""
    try:
        fields = protocol._fields(raw, protocol._SCHEMA[mt], "")
    except MessageError:
        return None
    if mt is MsgType.RESULT and fields["kind"] == "statistics" and "stats" not in fields:
        return None
    rule = protocol._payload_rule(mt, fields)
    if (rule is True and n_payload == 0) or (rule is False and n_payload):
        return None
    return fields


edge_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**53, 2**53 + 1, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "a", "x" * 257, "gw-01", TID, TID.upper(),
                                                                    "train", "evaluate", "statistics", "accepted",
                                                                    "rejected", "duplicate", "../x"]),
    st.lists(st.integers(0, 2), max_size=2),
)
metric_maps = st.dictionaries(st.one_of(st.sampled_from(["", "loss", "x" * 257]), st.text(max_size=4)),
                              edge_values, max_size=4)
field_values = {
    "agent": st.one_of(edge_values, st.sampled_from(["gw001", "a.b_c-d", "-bad", "x" * 129])),
    "task_id": st.one_of(edge_values, st.just(TID)),
    "round": edge_values,
    "kind": edge_values,
    "n_samples": edge_values,
    "metrics": st.one_of(edge_values, metric_maps),
    "stats": st.one_of(st.none(), st.just({"count": 1, "mean": [0.0], "m2": [1.0]})),
    "status": edge_values,
    "reason": st.one_of(edge_values, st.just("x" * 5000)),
}


@st.composite
def raw_headers(draw: st.DrawFn) -> tuple[MsgType, dict, int]:
    mt = draw(st.sampled_from(sorted(protocol._FAST, key=lambda t: t.value)))
    names = draw(st.sets(st.sampled_from(sorted(field_values))))
    raw = {name: draw(field_values[name]) for name in names}
    if draw(st.booleans()):  # mostly well-formed results, so the fast path is exercised
        raw.update(agent="gw001", task_id=TID, round=draw(st.integers(0, 5)),
                   kind=draw(st.sampled_from(["train", "evaluate"])), n_samples=draw(st.integers(0, 9)),
                   metrics=draw(metric_maps), status=draw(st.sampled_from(["accepted", "duplicate", "x"])))
    return mt, raw, draw(st.sampled_from([0, 0, 10]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_headers())
def test_fast_checkers_agree_with_the_schema(case):
    mt, raw, n_payload = case
    fast = protocol._FAST[mt](raw, n_payload)
    want = _schema(mt, raw, n_payload)
    if fast is not None:
        assert want is not None, "the fast checker accepted what the schema refuses"
        assert fast == want
        assert list(fast) == list(want)
        assert [type(v) for v in fast.values()] == [type(v) for v in want.values()]


def test_fast_result_matches_the_schema_on_a_typical_message():
    raw = {"agent": "gw001", "task_id": TID, "round": 2, "kind": "train", "n_samples": 30,
           "metrics": {"loss": 1, "auc": 0.5}, "extra": [1]}
    fields = protocol._fast_result(raw, 100)
    assert fields == {"agent": "gw001", "task_id": TID, "round": 2, "kind": "train", "n_samples": 30,
                      "metrics": {"loss": 1.0, "auc": 0.5}}
    assert type(fields["metrics"]["loss"]) is float
    assert protocol._fast_result(raw, 0) is None  # a train result needs its payload


@pytest.mark.parametrize("metrics", ['{"loss":1e400}', '{"loss":1%s}' % ("0" * 400), '{"loss":true}', '{"":1.0}'])
def test_bad_metrics_still_get_the_schema_error(metrics):
    raw = {"v": 1, "type": "result", "agent": "gw001", "task_id": TID, "round": 1, "kind": "evaluate",
           "n_samples": 1, "metrics": "METRICS"}
    frames = [json.dumps(raw).replace('"METRICS"', metrics).encode()]
    with pytest.raises(MessageError) as info:
        decode(frames)
    assert "metrics" in str(info.value)


def _task(tid: str, *, lr: float = 0.01, spec: dict | None = None, kind: str = "train", rnd: int = 3,
          committed: int | None = None) -> list:
    fields = {"task_id": tid, "round": rnd, **({} if committed is None else {"committed": committed}), "kind": kind, "deadline_s": 60.0, "spec": spec or SPEC,
              "features": ["a", "b", "c"], "label": "y", "scaler": {"mean": [0.0] * 3, "std": [1.0] * 3},
              "hyper": {**HYPER, "lr": lr}, "codec": "f32", "codec_params": {}}
    return encode(MsgType.TASK, fields, b"payload" if kind != "statistics" else None)


def test_tasks_differing_in_the_nonce_decode_to_their_own_nonce():
    first, second = new_task_id(), new_task_id()
    a, b = decode(_task(first)), decode(_task(second))
    assert a.fields["task_id"] == first and b.fields["task_id"] == second
    assert {k: v for k, v in a.fields.items() if k != "task_id"} == \
        {k: v for k, v in b.fields.items() if k != "task_id"}
    assert bytes(b.payload) == b"payload"


def test_tasks_of_later_rounds_decode_to_their_own_round():
    decode(_task(new_task_id(), rnd=3))
    for rnd in (4, 10, 0, 2**53 - 1, 123456789012345):
        tid = new_task_id()
        got = decode(_task(tid, rnd=rnd)).fields
        assert got["round"] == rnd and got["task_id"] == tid


def test_a_round_out_of_range_or_not_an_integer_is_refused_after_a_remembered_task():
    decode(_task(new_task_id(), rnd=3))
    for bad_round in (b"9007199254740993", b"-1", b"03", b"3.5", b"1e3", b'"3"', b"true"):
        frames = _task(new_task_id(), rnd=7)
        frames[0] = frames[0].replace(b'"round":7,', b'"round":' + bad_round + b",")
        with pytest.raises(MessageError):
            decode(frames)


def test_tasks_carrying_commit_notices_decode_to_their_own_committed_round():
    decode(_task(new_task_id(), rnd=3, committed=1))
    for rnd, committed in ((4, 2), (9, 8), (10, 0), (12, 123456789012345), (13, None), (14, 12)):
        tid = new_task_id()
        got = decode(_task(tid, rnd=rnd, committed=committed)).fields
        assert got["round"] == rnd and got["task_id"] == tid
        assert got.get("committed") == committed


def test_a_bad_committed_round_is_refused_after_a_remembered_task():
    decode(_task(new_task_id(), rnd=3, committed=2))
    for bad in (b"9007199254740993", b"-1", b"02", b"2.5", b'"2"', b"true"):
        frames = _task(new_task_id(), rnd=7, committed=5)
        frames[0] = frames[0].replace(b'"committed":5,', b'"committed":' + bad + b",")
        with pytest.raises(MessageError):
            decode(frames)


def test_a_second_committed_key_disables_the_memory_of_it():
    spec = {**SPEC, "committed": 99}
    decode(_task(new_task_id(), spec=spec, rnd=3, committed=1))
    got = decode(_task(new_task_id(), spec=spec, rnd=5, committed=4)).fields
    assert got["committed"] == 4 and got["spec"]["committed"] == 99


def test_a_second_round_key_disables_the_round_memory():
    spec = {**SPEC, "round": 99}  # a nested key of the same name
    decode(_task(new_task_id(), spec=spec, rnd=3))
    got = decode(_task(new_task_id(), spec=spec, rnd=5)).fields
    assert got["round"] == 5 and got["spec"]["round"] == 99


def test_a_task_differing_elsewhere_is_checked_again():
    decode(_task(new_task_id()))
    assert decode(_task(new_task_id(), lr=0.5)).fields["hyper"]["lr"] == 0.5
    bad = _task(new_task_id())
    bad[0] = bad[0].replace(b'"batch_size":32', b'"batch_size":0')
    with pytest.raises(MessageError, match="batch_size"):
        decode(bad)
    with pytest.raises(MessageError, match="needs a payload"):
        decode(_task(new_task_id())[:1])


def test_a_nonce_that_is_not_lowercase_hex_is_refused_after_a_remembered_task():
    decode(_task(new_task_id()))
    frames = _task(new_task_id())
    at = frames[0].index(b'"task_id":"') + len(b'"task_id":"')
    frames[0] = frames[0][:at] + b"G" * 32 + frames[0][at + 32:]
    with pytest.raises(MessageError, match="task_id"):
        decode(frames)


def test_a_second_task_id_key_disables_the_memory():
    spec = {**SPEC, "task_id": TID}  # a nested key of the same name
    first = decode(_task(new_task_id(), spec=spec))
    tid = new_task_id()
    again = decode(_task(tid, spec=spec))
    assert again.fields["task_id"] == tid and again.fields["spec"]["task_id"] == TID
    assert first.fields["spec"] == again.fields["spec"]


def test_changing_returned_fields_does_not_change_later_decodes():
    msg = decode(_task(new_task_id()))
    msg.fields["label"] = "changed"
    msg.fields["task_id"] = "nope"
    tid = new_task_id()
    again = decode(_task(tid))
    assert again.fields["label"] == "y" and again.fields["task_id"] == tid


def test_statistics_tasks_remember_their_payload_rule():
    decode(_task(new_task_id(), kind="statistics"))
    frames = _task(new_task_id(), kind="statistics") + [b"unexpected"]
    with pytest.raises(MessageError, match="takes no payload"):
        decode(frames)


def test_new_task_ids_are_valid_and_unique():
    ids = protocol.new_task_ids(500)
    assert len(ids) == 500 and len(set(ids)) == 500
    assert all(protocol._TASK_ID_RE.match(t) for t in ids)
    assert protocol.new_task_ids(0) == []


@pytest.mark.parametrize("msg_type, fields, payload", [
    (MsgType.HEARTBEAT, {}, None),
    (MsgType.COMMITTED, {"round": 3}, None),
    (MsgType.RESULT, {"agent": "gw001", "task_id": TID, "round": 2, "kind": "train", "n_samples": 30,
                      "metrics": {"loss": 1, "acc": 0.5}}, b"payload"),
    ("ack", {"task_id": TID, "status": "rejected", "reason": "size \u00e9\"x\""}, None),
])
def test_encode_parts_gives_the_header_and_the_json_of_the_validated_fields(msg_type, fields, payload):
    frames, body = encode_parts(msg_type, fields, payload)
    assert frames == encode(msg_type, fields, payload)
    head = json.loads(frames[0])
    assert list(head)[:2] == ["v", "type"] and head["v"] == 1
    assert {k: v for k, v in head.items() if k not in ("v", "type")} == json.loads(body)
    assert decode(frames).fields == json.loads(body)
