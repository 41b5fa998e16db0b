"""kill -9 of the server mid-round: it resumes the same round, loses and doubles nothing.

The server runs as a real subprocess (``python -m fedgate.server run``); two scripted
agents answer deterministically. The final model of an interrupted run must equal an
uninterrupted run's.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fedgate.core.protocol import MsgType

from test_server_support import Agent, ServerThread, global_params, make_keys, wait_for, write_config

ROUNDS = 4
SKIP = (MsgType.HEARTBEAT, MsgType.MODEL, MsgType.COMMITTED, MsgType.WELCOME)
SKIP_TASKS = SKIP + (MsgType.TASK,)  # repeated hellos re-send the pending task more than once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_update(g: np.ndarray, name: str, rnd: int) -> np.ndarray:
    shift = np.linspace(-1, 1, g.size, dtype=np.float32) * (1.0 if name == "gw-a" else -0.5)
    return (0.9 * g + shift * rnd + 0.1).astype(np.float32)


def _config(root, keys, port: int | None):
    bind = f"tcp://127.0.0.1:{port}" if port else "tcp://127.0.0.1:0"
    return write_config(root, keys=keys, server={"bind": bind, "heartbeat": "10s", "dead_after": "60s"},
                        federation={"statistics": False, "rounds": ROUNDS},
                        strategy={"name": "fedavgm", "momentum": 0.5, "server_lr": 1.0})


def _hello_until_welcome(agent: Agent, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        agent.send(MsgType.HELLO, {"agent": agent.name, "software": "t", "features": ["t", "p", "v"],
                                   "n_samples": 10})
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            if agent.sock.poll(100):
                from fedgate.core.protocol import decode
                msg = decode(agent.sock.recv_multipart())
                if msg.type is MsgType.WELCOME:
                    return
    raise AssertionError(f"{agent.name}: no welcome within {timeout_s}s")


def _task_of_round(agent: Agent, rnd: int):
    """The next task of round ``rnd`` (re-sent copies of earlier tasks are passed over)."""
    while True:
        task = agent.expect(MsgType.TASK, skip=SKIP + (MsgType.ACK,))
        if task.fields["round"] == rnd:
            return task
        assert task.fields["round"] < rnd


def _play_round(a: Agent, b: Agent, rnd: int) -> np.ndarray:
    ta, tb = _task_of_round(a, rnd), _task_of_round(b, rnd)
    g = global_params(ta)
    a.train_result(ta, _local_update(g, "gw-a", rnd))
    b.train_result(tb, _local_update(g, "gw-b", rnd))
    assert a.expect(MsgType.ACK, skip=SKIP_TASKS).fields["status"] == "accepted"
    assert b.expect(MsgType.ACK, skip=SKIP_TASKS).fields["status"] == "accepted"
    a.committed(rnd)
    return global_params(a.expect(MsgType.MODEL, skip=SKIP))


def _reference(tmp_path) -> np.ndarray:
    root = tmp_path / "reference"
    root.mkdir()
    keys = make_keys(root, ["gw-a", "gw-b"])
    srv = ServerThread(_config(root, keys, None))
    a, b = Agent(srv.endpoint, "gw-a", keys=keys), Agent(srv.endpoint, "gw-b", keys=keys)
    try:
        _hello_until_welcome(a)
        _hello_until_welcome(b)
        model = None
        for rnd in range(1, ROUNDS + 1):
            model = _play_round(a, b, rnd)
        return model
    finally:
        a.close()
        b.close()
        srv.stop()


class ServerProcess:
    def __init__(self, config, log_path) -> None:
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "fedgate.server", "run", "--config", str(config)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=20)
        self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["tasks_sent", "one_result_in", "after_commit"])
def test_kill9_mid_round_resumes_and_matches_uninterrupted_run(tmp_path, kill_at):
    expected = _reference(tmp_path)
    root = tmp_path / "crash"
    root.mkdir()
    keys = make_keys(root, ["gw-a", "gw-b"])
    port = _free_port()
    config = _config(root, keys, port)
    endpoint = f"tcp://127.0.0.1:{port}"
    server = ServerProcess(config, root / "server.log")
    a, b = Agent(endpoint, "gw-a", keys=keys), Agent(endpoint, "gw-b", keys=keys)
    try:
        _hello_until_welcome(a)
        _hello_until_welcome(b)
        _play_round(a, b, 1)
        ta, tb = a.expect(MsgType.TASK, skip=SKIP), b.expect(MsgType.TASK, skip=SKIP)
        g = global_params(ta)
        ua = _local_update(g, "gw-a", 2)
        if kill_at in ("one_result_in", "after_commit"):
            a.train_result(ta, ua)
            assert a.expect(MsgType.ACK, skip=SKIP).fields["status"] == "accepted"
        if kill_at == "after_commit":
            b.train_result(tb, _local_update(g, "gw-b", 2))
            assert b.expect(MsgType.ACK, skip=SKIP).fields["status"] == "accepted"
            a.committed(2)
            b.committed(2)
        server.kill9()
        assert server.proc.returncode == -signal.SIGKILL

        server2 = ServerProcess(config, root / "server.log")
        server = server2
        _hello_until_welcome(a)
        _hello_until_welcome(b)
        if kill_at == "after_commit":
            a.train_result(ta, ua)  # outbox re-send of a committed round: refused
            msg = a.expect(MsgType.ACK, skip=SKIP_TASKS)  # round 3's task may come first: kept aside
            assert msg.fields["status"] == "rejected" and msg.fields["reason"] == "stale_round"
            first = 3
        else:
            # round 2 resumes: the same task nonces are re-sent; a re-sends its outbox result once
            ta2, tb2 = a.expect(MsgType.TASK, skip=SKIP), b.expect(MsgType.TASK, skip=SKIP)
            assert ta2.fields["task_id"] == ta.fields["task_id"] and tb2.fields["task_id"] == tb.fields["task_id"]
            np.testing.assert_array_equal(global_params(ta2), g)
            a.train_result(ta, ua)
            assert a.expect(MsgType.ACK, skip=SKIP_TASKS).fields["status"] == "accepted"
            a.train_result(ta, ua)
            assert a.expect(MsgType.ACK, skip=SKIP_TASKS).fields["status"] == "duplicate"
            b.train_result(tb, _local_update(g, "gw-b", 2))
            assert b.expect(MsgType.ACK, skip=SKIP_TASKS).fields["status"] == "accepted"
            a.committed(2)
            first = 3
        model = None
        for rnd in range(first, ROUNDS + 1):
            model = _play_round(a, b, rnd)
        np.testing.assert_allclose(model, expected, rtol=1e-6, atol=1e-6)
    finally:
        a.close()
        b.close()
        assert server.stop() == 0
    log = (root / "server.log").read_text()
    assert "resumed from" in log


def test_crash_before_checkpoint_reopens_the_round_and_expires_the_next(tmp_path):
    """The next round's tasks go out before the checkpoint is written; a crash in between
    (simulated by removing the newest checkpoint) reopens the committed-in-memory round."""
    keys = make_keys(tmp_path, ["gw-a", "gw-b"])
    config = _config(tmp_path, keys, None)
    srv = ServerThread(config)
    a, b = Agent(srv.endpoint, "gw-a", keys=keys), Agent(srv.endpoint, "gw-b", keys=keys)
    try:
        _hello_until_welcome(a)
        _hello_until_welcome(b)
        ta, tb = _task_of_round(a, 1), _task_of_round(b, 1)
        g = global_params(ta)
        a.train_result(ta, _local_update(g, "gw-a", 1))
        b.train_result(tb, _local_update(g, "gw-b", 1))
        first = _task_of_round(a, 2)
        wait_for(lambda: srv.coordinator.checkpoints.files(), what="checkpoint of round 1")
    finally:
        a.close()
        b.close()
        srv.stop()
    for path in srv.coordinator.checkpoints.files():
        path.unlink()  # as if killed before the checkpoint reached the disk
    srv = ServerThread(config)
    a, b = Agent(srv.endpoint, "gw-a", keys=keys), Agent(srv.endpoint, "gw-b", keys=keys)
    try:
        _hello_until_welcome(a)
        _hello_until_welcome(b)
        assert srv.coordinator.open.round == 1 and set(srv.coordinator.open.tasks) == {
            ta.fields["task_id"], tb.fields["task_id"]}
        a.train_result(first, _local_update(g, "gw-a", 2))  # a task of the round that never committed
        ack = a.expect(MsgType.ACK, skip=SKIP_TASKS)
        assert ack.fields["status"] == "rejected" and ack.fields["reason"] == "stale_round"
        a.train_result(ta, _local_update(g, "gw-a", 1))  # the outbox re-sends round 1
        b.train_result(tb, _local_update(g, "gw-b", 1))
        model = None
        for rnd in range(2, ROUNDS + 1):
            model = _play_round(a, b, rnd)
    finally:
        a.close()
        b.close()
        srv.stop()
    np.testing.assert_allclose(model, _reference(tmp_path), rtol=1e-6, atol=1e-6)
