"""Hostile and broken peers against the real server: every refusal happens and is counted."""
from __future__ import annotations

import gc
import os
import struct
import zlib

import numpy as np
import psutil
import pytest
import zmq

from fedgate.core.protocol import MsgType

from test_server_support import Agent, ServerThread, global_params, make_keys, wait_for, write_config

NAMES = ["gw-a", "gw-b", "gw-c"]
REJ = "fedgate_server_updates_rejected_total"
AUTH = "fedgate_server_auth_failures_total"


@pytest.fixture
def rig(tmp_path):
    keys = make_keys(tmp_path, NAMES)
    cfg = write_config(tmp_path, keys=keys, federation={"statistics": False, "rounds": 5},
                       strategy={"max_update_norm": 10.0},
                       server={"max_message_size": "4MiB", "heartbeat": "10s", "dead_after": "60s"})
    srv = ServerThread(cfg)
    opened: list[Agent] = []

    def agent(name: str, key_name: str | None = None, **kw) -> Agent:
        a = Agent(srv.endpoint, name, keys=keys, key_name=key_name, **kw)
        opened.append(a)
        return a

    yield srv, keys, agent, tmp_path
    for a in opened:
        a.close()
    srv.stop()


def _two_in_round(agent):
    a, b = agent("gw-a"), agent("gw-b")
    assert a.hello().type is MsgType.WELCOME
    assert b.hello().type is MsgType.WELCOME
    return a, b, a.expect(MsgType.TASK), b.expect(MsgType.TASK)


def test_unknown_key_is_refused_logged_and_counted(rig, caplog):
    srv, keys, agent, _ = rig
    caplog.set_level("WARNING", logger="fedgate.server")
    stranger = agent("gw-x")  # a fresh key pair, not in agents_dir
    stranger.send(MsgType.HELLO, {"agent": "gw-x", "software": "s", "features": ["t", "p", "v"], "n_samples": 1})
    wait_for(lambda: srv.metric(AUTH, reason="unknown_key") >= 1, what="auth failure counted")
    assert stranger.silent(0.3)
    pub = stranger.public_key
    line = next(r for r in caplog.records if "refused CURVE key" in r.getMessage())
    assert line.levelname == "WARNING" and pub in line.getMessage() and "127.0.0.1" in line.getMessage()
    assert srv.coordinator.registry.names() == []


def test_plaintext_client_gets_nothing(rig):
    srv, keys, agent, _ = rig
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(srv.endpoint)
    sock.send_multipart([b'{"v":1,"type":"heartbeat"}'])
    try:
        wait_for(lambda: srv.metric(AUTH, reason="handshake") >= 1, what="handshake failure counted")
        assert not sock.poll(300)
    finally:
        sock.close(0)
        ctx.term()


def test_claiming_another_identity_is_refused(rig):
    srv, keys, agent, _ = rig
    a = agent("gw-a")
    a.send(MsgType.HELLO, {"agent": "gw-b", "software": "s", "features": ["t", "p", "v"], "n_samples": 1})
    err = a.expect(MsgType.ERROR)
    assert err.fields["code"] == "unauthorized"
    assert a.hello().type is MsgType.WELCOME
    a.send(MsgType.HEARTBEAT, {"agent": "gw-b"})
    assert a.expect(MsgType.ERROR).fields["code"] == "unauthorized"
    assert srv.metric(REJ, reason="identity") == 2 and srv.metric(AUTH, reason="identity") == 2
    assert srv.coordinator.registry.names() == ["gw-a"]


def test_result_for_another_agents_task_is_refused(rig):
    srv, keys, agent, _ = rig
    a, b, ta, tb = _two_in_round(agent)
    a.train_result(tb, global_params(tb))  # a's connection, b's task nonce
    ack = a.expect(MsgType.ACK)
    assert ack.fields == {"task_id": tb.fields["task_id"], "status": "rejected", "reason": "identity"}
    b.train_result(tb, global_params(tb))  # b's own result is still taken
    assert b.expect(MsgType.ACK).fields["status"] == "accepted"


def test_replays_are_refused(rig):
    srv, keys, agent, _ = rig
    a, b, ta, tb = _two_in_round(agent)
    g = global_params(ta)
    a.train_result(ta, g + 0.5)
    assert a.expect(MsgType.ACK).fields["status"] == "accepted"
    a.train_result(ta, g + 0.5)  # same connection
    assert a.expect(MsgType.ACK).fields["status"] == "duplicate"
    a.close()
    a2 = agent("gw-a")  # reconnect with the same key
    assert a2.hello().type is MsgType.WELCOME
    a2.train_result(ta, g + 0.5)
    assert a2.expect(MsgType.ACK).fields["status"] == "duplicate"
    b.train_result(tb, g - 0.5)
    assert b.expect(MsgType.ACK).fields["status"] == "accepted"
    a2.committed(1)
    a2.expect(MsgType.TASK)
    a2.train_result(ta, g + 0.5)  # a later round
    ack = a2.expect(MsgType.ACK)
    assert ack.fields["status"] == "rejected" and ack.fields["reason"] == "stale_round"
    assert srv.metric(REJ, reason="duplicate") == 2 and srv.metric(REJ, reason="stale_round") == 1
    np.testing.assert_allclose(srv.coordinator.params, g, atol=1e-6)  # a+0.5 and b-0.5 weigh the same


def _f32_buffer(values: np.ndarray) -> bytes:
    """A codec f32 buffer built by hand (the encoder refuses non-finite values)."""
    payload = np.asarray(values, dtype="<f4").tobytes()
    head = struct.pack("<4sBBHIII", b"FGVC", 1, 1, 0, values.size, 0, 0)
    crc = zlib.crc32(payload, zlib.crc32(head)) & 0xFFFFFFFF
    return head + struct.pack("<I", crc) + payload


@pytest.mark.parametrize("case,reason", [("nan", "nonfinite"), ("inf", "nonfinite"), ("size", "size"),
                                         ("norm", "norm"), ("garbage", "decode"), ("q8_scale", "decode")])
def test_bad_updates_are_refused_and_counted(tmp_path, case, reason):
    keys = make_keys(tmp_path, NAMES)
    srv = ServerThread(write_config(tmp_path, keys=keys, federation={"statistics": False, "min_available": 3},
                                    strategy={"max_update_norm": 10.0}))
    a, b, c = (Agent(srv.endpoint, n, keys=keys) for n in NAMES)
    try:
        _bad_update_round(srv, a, b, c, case, reason)
    finally:
        for x in (a, b, c):
            x.close()
        srv.stop()


def _bad_update_round(srv, a, b, c, case, reason):
    for x in (a, b, c):
        assert x.hello().type is MsgType.WELCOME
    ta, tb, tc = a.expect(MsgType.TASK), b.expect(MsgType.TASK), c.expect(MsgType.TASK)
    g = global_params(ta)
    bad = g.copy()
    if case == "nan":
        bad[1] = np.nan
        payload = _f32_buffer(bad)
    elif case == "inf":
        bad[0] = -np.inf
        payload = _f32_buffer(bad)
    elif case == "size":
        payload = _f32_buffer(np.zeros(g.size + 1, np.float32))
    elif case == "norm":
        payload = _f32_buffer(g + 100.0)
    elif case == "garbage":
        payload = b"\x00" * 64
    else:  # a q8 buffer with a negative block scale (read in place: no CRC, the transport guarantees integrity)
        from fedgate.core import codec

        payload = bytearray(codec.encode(g + 0.5, "q8"))
        struct.pack_into("<f", payload, codec.HEADER_SIZE, -1.0)
        payload = bytes(payload)
    a.send(MsgType.RESULT, {"agent": "gw-a", "task_id": ta.fields["task_id"], "round": 1, "kind": "train",
                            "n_samples": 5, "metrics": {}}, payload)
    ack = a.expect(MsgType.ACK)
    assert ack.fields["status"] == "rejected" and ack.fields["reason"] == reason
    assert srv.metric(REJ, reason=reason) == 1
    b.train_result(tb, g + 1.0)
    c.train_result(tc, g + 3.0)
    assert b.expect(MsgType.ACK).fields["status"] == "accepted"
    b.committed(1)
    assert np.isfinite(srv.coordinator.params).all()
    np.testing.assert_allclose(srv.coordinator.params, g + 2.0, atol=1e-6)  # only b's and c's updates count


def test_oversized_frame_disconnects_without_memory_growth(rig):
    srv, keys, agent, _ = rig
    a, b, ta, tb = _two_in_round(agent)
    proc = psutil.Process(os.getpid())
    gc.collect()
    rss_before = proc.memory_info().rss
    big = np.ones(12 * 2**20, dtype=np.float32)  # 48 MiB, the limit is 4 MiB
    mon = a.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    a.sock.send_multipart([b'{"v":1,"type":"heartbeat","agent":"gw-a"}', big], copy=False)
    try:
        assert mon.poll(20_000), "the peer was not disconnected"
    finally:
        a.sock.disable_monitor()
        mon.close(0)
    del big
    wait_for(lambda: srv.metric("fedgate_server_disconnects_total") >= 1, what="disconnect counted")
    gc.collect()
    grown = proc.memory_info().rss - rss_before
    assert grown < 10 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB"
    # the others' round goes on; the offender may reconnect and still deliver
    b.train_result(tb, global_params(tb))
    assert b.expect(MsgType.ACK).fields["status"] == "accepted"
    assert a.hello().type is MsgType.WELCOME
    a.expect(MsgType.TASK)  # its pending task is re-sent after the new hello
    a.train_result(ta, global_params(ta))
    assert a.expect(MsgType.ACK).fields["status"] == "accepted"


@pytest.mark.parametrize("frames,code", [
    ([b'{"v":2,"type":"heartbeat"}'], "version"),
    ([b'{"v":1,"type":"launch"}'], "unknown_type"),
    ([b'{"v":1,"type":"hello"}'], "bad_message"),
    ([b"\xff\xfe\xfd"], "bad_message"),
    ([b'{"v":1,"type":"heartbeat"}', b"x", b"y"], "bad_message"),
])
def test_malformed_messages_get_an_error_reply(rig, frames, code):
    srv, keys, agent, _ = rig
    a = agent("gw-a")
    a.send_raw(frames)
    err = a.expect(MsgType.ERROR)
    assert err.fields["code"] == code
    assert srv.metric(REJ, reason=code) == 1
    assert a.hello().type is MsgType.WELCOME  # the server keeps serving


def test_messages_before_hello_and_server_only_types(rig):
    srv, keys, agent, _ = rig
    a = agent("gw-a")
    a.send(MsgType.HEARTBEAT, {"agent": "gw-a"})
    assert a.expect(MsgType.ERROR).fields["code"] == "not_registered"
    a.hello()
    a.send(MsgType.COMMITTED, {"round": 3})
    assert a.expect(MsgType.ERROR).fields["code"] == "unknown_type"
    a.send(MsgType.HEARTBEAT, {"agent": "gw-a"})
    a.expect(MsgType.HEARTBEAT, skip=())


def test_missing_features_are_named_in_the_refusal(rig):
    srv, keys, agent, _ = rig
    a = agent("gw-a")
    msg = a.hello(features=["t", "v", "extra"])
    assert msg.type is MsgType.REFUSE
    assert msg.fields["missing"] == ["p"] and "p" in msg.fields["message"]
    assert srv.coordinator.registry.names() == []


def test_removed_key_is_refused_after_reload(rig):
    srv, keys, agent, root = rig
    a = agent("gw-a")
    assert a.hello().type is MsgType.WELCOME
    os.unlink(root / "agents" / "gw-a.key")
    srv.server.request_reload()
    wait_for(lambda: "gw-a" not in (srv.server.transport.allowed_names() or ()), what="reload")
    a.send(MsgType.HEARTBEAT, {"agent": "gw-a"})
    assert a.expect(MsgType.ERROR).fields["code"] in ("unauthorized", "not_registered")
    assert srv.metric(AUTH, reason="revoked") >= 1
    again = agent("gw-a")  # a new handshake with the removed key
    again.send(MsgType.HELLO, {"agent": "gw-a", "software": "s", "features": ["t", "p", "v"], "n_samples": 1})
    wait_for(lambda: srv.metric(AUTH, reason="unknown_key") >= 1, what="handshake refused")
    assert again.silent(0.3)
