"""Uplink against a scripted server: a real ROUTER socket on 127.0.0.1, CURVE keys in tmp_path.

The test plays the server with the real wire protocol, so each scenario (welcome,
refusal, a restarted server, a silent server, committed rounds) is exact.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.asyncio

from fedgate.agent.uplink import GlobalModel, HelloInfo, Task, TaskOutcome, Uplink, UplinkConfig
from fedgate.core import protocol
from fedgate.core.config import build
from fedgate.core.errors import ConfigError, SecurityError
from fedgate.core.keys import write_keypair
from fedgate.core.protocol import MsgType

FEATURES = ["temp", "pressure"]
SPEC = {"kind": "linear", "n_features": 2}


class Handler:
    """A handler on fixed data: statistics of two columns; evaluate reports a loss."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.tasks: list[Task] = []
        self.models: list[GlobalModel] = []
        self.x = np.arange(20, dtype=np.float64).reshape(10, 2)

    def hello_info(self) -> HelloInfo:
        return HelloInfo(features=list(FEATURES), n_samples=10)

    def run_task(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
        self.tasks.append(task)
        if self.delay_s:
            time.sleep(self.delay_s)
        if task.kind == "statistics":
            mean = self.x.mean(axis=0)
            m2 = ((self.x - mean) ** 2).sum(axis=0)
            return TaskOutcome(n_samples=10, metrics={}, stats=(10, mean, m2))
        return TaskOutcome(n_samples=10, metrics={"loss": 0.25})

    def on_model(self, model: GlobalModel) -> None:
        self.models.append(model)


class ScriptedServer:
    """A ROUTER the test drives message by message."""

    def __init__(self, ctx: zmq.asyncio.Context, secret: bytes | None, port: int | None = None) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.answer_heartbeats = True
        if secret is not None:
            self.sock.curve_secretkey = secret
            self.sock.curve_server = True
        if port is None:
            self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            self.sock.bind(f"tcp://127.0.0.1:{port}")
            self.port = port

    async def recv(self, timeout_s: float = 20.0, skip_heartbeats: bool = True) -> tuple[bytes, protocol.Message]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "no message from the agent in time"
            frames = await asyncio.wait_for(self.sock.recv_multipart(), left)
            msg = protocol.decode(frames[1:])
            if msg.type is MsgType.HEARTBEAT and self.answer_heartbeats:
                await self.send(frames[0], MsgType.HEARTBEAT, {})
            if skip_heartbeats and msg.type is MsgType.HEARTBEAT:
                continue
            return frames[0], msg

    async def send(self, rid: bytes, msg_type: MsgType, fields: dict[str, Any], payload: bytes | None = None) -> None:
        await self.sock.send_multipart([rid, *protocol.encode(msg_type, fields, payload)])

    async def welcome(self, rid: bytes, round_: int = 1) -> None:
        await self.send(rid, MsgType.WELCOME, {"federation": "plant", "round": round_, "heartbeat_s": 0.3,
                                               "spec": SPEC, "features": FEATURES, "label": "y"})

    def close(self) -> None:
        self.sock.close(linger=0)


def task_fields(round_: int, kind: str = "statistics", task_id: str | None = None) -> dict[str, Any]:
    return {"task_id": task_id or protocol.new_task_id(), "round": round_, "kind": kind, "deadline_s": 10.0,
            "spec": SPEC, "features": FEATURES, "label": "y", "scaler": None,
            "hyper": {"epochs": 1, "batch_size": 8, "lr": 0.1}, "codec": "f32"}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    kdir = tmp_path / "keys"
    spub, ssec = zmq.curve_keypair()
    apub, asec = zmq.curve_keypair()
    write_keypair(kdir, "server", spub.decode(), ssec.decode())
    write_keypair(kdir, "press-07", apub.decode(), asec.decode())
    return {"dir": kdir, "server_secret": ssec, "agent_public": apub}


def make_cfg(port: int, keys: dict[str, Any] | None, **extra: Any) -> UplinkConfig:
    table: dict[str, Any] = {"server": f"tcp://127.0.0.1:{port}", "heartbeat": "300ms", "dead_after": "1500ms",
                             "hello_timeout": "1s", "reconnect_delay": "50ms", "reconnect_delay_max": "200ms"}
    if keys is None:
        table["insecure"] = True
    else:
        table["server_key"] = str(keys["dir"] / "server.key")
        table["secret_key"] = str(keys["dir"] / "press-07.key_secret")
    table.update(extra)
    return build(UplinkConfig, table, file="agent.toml", key="uplink")


async def _until(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def run_scenario(keys: dict[str, Any] | None, db: Path, scenario, handler: Handler | None = None,
                 **cfg_extra: Any) -> Uplink:
    """Run ``scenario(server, uplink)`` beside a running uplink; stop and clean up after."""
    handler = handler or Handler()

    async def main() -> Uplink:
        ctx = zmq.asyncio.Context()
        server = ScriptedServer(ctx, None if keys is None else keys["server_secret"])
        uplink = Uplink(make_cfg(server.port, keys, **cfg_extra), agent_name="press-07", db_path=db,
                        handler=handler)
        runner = asyncio.create_task(uplink.run())
        try:
            await scenario(server, uplink)
        finally:
            uplink.stop()
            await asyncio.wait_for(runner, 20)
            uplink.close()
            server.close()
            ctx.term()
        return uplink

    return asyncio.run(main())


# ------------------------------------------------------------------ config

def test_config_requires_keys_unless_insecure():
    with pytest.raises(ConfigError, match="uplink.secret_key"):
        build(UplinkConfig, {"server": "tcp://hq:7443", "server_key": "/k/server.key"}, key="uplink")
    with pytest.raises(ConfigError, match="uplink.server"):
        build(UplinkConfig, {"server": "http://hq", "insecure": True}, key="uplink")
    with pytest.raises(ConfigError, match="reconnect_delay_max"):
        build(UplinkConfig, {"server": "tcp://hq:1", "insecure": True, "reconnect_delay": "5s",
                             "reconnect_delay_max": "1s"}, key="uplink")
    with pytest.raises(ConfigError, match="uplink.heartbeat"):
        build(UplinkConfig, {"server": "tcp://hq:1", "insecure": True, "heartbeat": "0s"}, key="uplink")
    cfg = build(UplinkConfig, {"server": "tcp://hq:1", "insecure": True, "heartbeat": "2s"})
    assert cfg.dead_after_s == 6.0


def test_secret_key_readable_by_others_is_refused(keys, tmp_path):
    os.chmod(keys["dir"] / "press-07.key_secret", 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        Uplink(make_cfg(1, keys), agent_name="press-07", db_path=tmp_path / "s.db", handler=Handler())


def test_insecure_mode_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedgate.agent.uplink"):
        up = Uplink(make_cfg(1, None), agent_name="press-07", db_path=tmp_path / "s.db", handler=Handler())
        up.close()
    assert "INSECURE" in caplog.text


# ------------------------------------------------------------------ scenarios

def test_hello_task_result_commit_over_curve(keys, tmp_path):
    db = tmp_path / "state.db"
    seen: dict[str, Any] = {}

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, hello = await server.recv()
        assert hello.type is MsgType.HELLO
        assert hello.fields["agent"] == "press-07" and hello.fields["features"] == FEATURES
        await server.welcome(rid, round_=0)
        tf = task_fields(0)
        await server.send(rid, MsgType.TASK, tf)
        _, result = await server.recv()
        assert result.type is MsgType.RESULT and result.fields["task_id"] == tf["task_id"]
        # stored (and committed to disk) before it was sent: a second connection sees it
        raw = sqlite3.connect(db)
        seen["stored"] = raw.execute("SELECT task_id FROM uplink_outbox").fetchall()
        raw.close()
        seen["stats"] = result.fields["stats"]
        await server.send(rid, MsgType.ACK, {"task_id": tf["task_id"], "status": "accepted"})
        await server.send(rid, MsgType.COMMITTED, {"round": 0})
        await _until(lambda: uplink.status()["outbox"] == 0)
        seen["status"] = uplink.status()

    run_scenario(keys, db, scenario)
    assert seen["stored"] != []
    assert seen["stats"]["count"] == 10
    np.testing.assert_allclose(seen["stats"]["mean"], [9.0, 10.0])
    st = seen["status"]
    assert st["connected"] and st["last_committed_round"] == 0 and st["secure"]
    assert st["counters"]["ack_accepted"] == 1 and st["counters"]["tasks_done"] == 1


def test_refusal_is_logged_with_missing_features(tmp_path, caplog):
    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.send(rid, MsgType.REFUSE, {"code": "features", "message": "cannot produce features",
                                                "missing": ["flow", "vibration"]})
        await _until(lambda: uplink.status()["refused"] is not None)
        assert not uplink.status()["connected"]

    with caplog.at_level(logging.ERROR, logger="fedgate.agent.uplink"):
        run_scenario(None, tmp_path / "s.db", scenario)
    assert "flow, vibration" in caplog.text


def test_outbox_resent_after_reregistration(tmp_path):
    """A restarted server says not_registered; the agent says hello again and re-sends."""

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid, round_=3)
        tf = task_fields(3, kind="statistics")
        await server.send(rid, MsgType.TASK, tf)
        _, first = await server.recv()
        assert first.fields["task_id"] == tf["task_id"]
        await server.send(rid, MsgType.ERROR, {"code": "not_registered", "message": "who are you"})
        _, hello = await server.recv()
        assert hello.type is MsgType.HELLO
        await server.welcome(rid, round_=3)
        _, again = await server.recv()
        assert again.type is MsgType.RESULT and again.fields == first.fields
        await server.send(rid, MsgType.ACK, {"task_id": tf["task_id"], "status": "duplicate"})
        # the same task again (server resumed its task table): answered from the outbox, not re-run
        await server.send(rid, MsgType.TASK, tf)
        _, third = await server.recv()
        assert third.fields == first.fields
        await server.send(rid, MsgType.COMMITTED, {"round": 3})
        await _until(lambda: uplink.status()["outbox"] == 0)

    handler = Handler()
    up = run_scenario(None, tmp_path / "s.db", scenario, handler=handler)
    assert len(handler.tasks) == 1
    assert up.counters["results_resent"] == 2 and up.counters["ack_duplicate"] == 1


def test_silent_server_detected_and_socket_recreated(tmp_path):
    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        # say nothing more: after dead_after the agent reconnects with a new socket (new routing id)
        server.answer_heartbeats = False
        rid2, hello = await server.recv(timeout_s=20)
        assert hello.type is MsgType.HELLO and rid2 != rid
        await server.welcome(rid2)
        await _until(lambda: uplink.status()["connected"])

    up = run_scenario(None, tmp_path / "s.db", scenario)
    assert up.counters["server_silent"] >= 1 and up.counters["reconnects"] >= 1


def test_results_survive_agent_restart_and_rejected_ones_are_dropped(tmp_path):
    db = tmp_path / "s.db"
    ids: dict[str, str] = {}

    async def first(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid, round_=2)
        for name in ("a", "b"):
            tf = task_fields(2)
            ids[name] = tf["task_id"]
            await server.send(rid, MsgType.TASK, tf)
            await server.recv()
        # no ack, no commit: the agent goes down holding both results

    run_scenario(None, db, first)

    async def second(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid, round_=2)
        got = {(await server.recv())[1].fields["task_id"] for _ in range(2)}
        assert got == set(ids.values())
        await server.send(rid, MsgType.ACK, {"task_id": ids["a"], "status": "rejected", "reason": "stale"})
        await _until(lambda: uplink.status()["outbox"] == 1)

    up = run_scenario(None, db, second)
    assert up.counters["results_resent"] == 2 and up.counters["ack_rejected"] == 1


def test_heartbeats_continue_while_a_task_runs(tmp_path):
    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        await server.send(rid, MsgType.TASK, task_fields(1))
        beats = 0
        while True:
            _, msg = await server.recv(skip_heartbeats=False)
            if msg.type is MsgType.RESULT:
                break
            beats += msg.type is MsgType.HEARTBEAT
        assert beats >= 3  # the handler sleeps 1.5 s; heartbeats every 0.3 s

    up = run_scenario(None, tmp_path / "s.db", scenario, handler=Handler(delay_s=1.5))
    assert up.counters["server_silent"] == 0


def test_malformed_server_messages_counted_not_fatal(tmp_path):
    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        await server.sock.send_multipart([rid, b"{not json"])
        await server.sock.send_multipart([rid, b'{"v": 9, "type": "task"}'])
        await server.sock.send_multipart([rid, b"a", b"b", b"c"])
        await _until(lambda: uplink.counters["bad_messages"] == 3)
        await server.send(rid, MsgType.TASK, task_fields(1))
        _, res = await server.recv()
        assert res.type is MsgType.RESULT

    run_scenario(None, tmp_path / "s.db", scenario)


def test_stop_sends_bye(tmp_path):
    got: list[MsgType] = []

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        await _until(lambda: uplink.status()["connected"])
        uplink.stop()
        _, msg = await server.recv()
        got.append(msg.type)

    run_scenario(None, tmp_path / "s.db", scenario)
    assert got == [MsgType.BYE]


class TrainHandler(Handler):
    """Train tasks return global + 1 (so what arrives is checkable)."""

    def run_task(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
        self.tasks.append(task)
        if task.kind == "train":
            assert global_params is not None and global_params.dtype == np.float32
            return TaskOutcome(n_samples=5, metrics={"loss": 1.0}, params=global_params + 1.0)
        return super().run_task(task, global_params)


@pytest.mark.parametrize("codec_name", ["f32", "f16", "q8", "topk"])
def test_train_result_encoded_with_the_task_codec(tmp_path, codec_name):
    from fedgate.core import codec

    glob = np.linspace(-1, 1, 500, dtype=np.float32)
    received: list[np.ndarray] = []

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        for round_ in (1, 2):
            tf = task_fields(round_, kind="train") | {"codec": codec_name, "codec_params": {"k": 0.5}}
            await server.send(rid, MsgType.TASK, tf, payload=codec.encode(glob, "f32"))
            _, res = await server.recv()
            assert res.fields["kind"] == "train" and res.fields["round"] == round_
            assert codec.read_header(res.payload).codec.value == codec_name
            received.append(codec.decode(res.payload))

    run_scenario(None, tmp_path / "s.db", scenario, handler=TrainHandler())
    want = glob + 1.0
    if codec_name == "topk":
        # top-k carries the update (params - global = +1 everywhere), half of it per round;
        # error feedback: what round 1 left out is added to round 2's update and sent then
        assert np.count_nonzero(received[0]) == 250
        sent_first = received[0] != 0
        np.testing.assert_allclose(received[0][sent_first], 1.0)
        np.testing.assert_allclose(received[1][~sent_first], 2.0)
        # what was sent plus what is still owed (round 2's part of the first half) is both updates
        np.testing.assert_allclose(received[0] + received[1] + sent_first, 2.0)
    else:
        for got in received:
            np.testing.assert_allclose(got, want, atol=0.02)


def test_published_model_reaches_the_handler(tmp_path):
    from fedgate.core import codec

    handler = Handler()
    params = np.arange(3, dtype=np.float32)

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        await server.send(rid, MsgType.MODEL, {"round": 4, "spec": SPEC, "features": FEATURES, "label": "y",
                                               "scaler": {"mean": [0.0, 1.0], "std": [1.0, 2.0]}},
                          payload=codec.encode(params, "f32"))
        await _until(lambda: len(handler.models) == 1)

    run_scenario(None, tmp_path / "s.db", scenario, handler=handler)
    m = handler.models[0]
    assert m.round == 4 and m.features == FEATURES and m.scaler["std"] == [1.0, 2.0]
    np.testing.assert_array_equal(m.params, params)


def test_model_carried_by_tasks_reaches_the_handler_once_its_round_is_committed(tmp_path):
    from fedgate.core import codec

    class Trainer(Handler):
        def run_task(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
            if task.kind == "train":
                return TaskOutcome(n_samples=10, metrics={}, params=global_params + 1)
            return super().run_task(task, global_params)

    handler = Trainer()
    p4, p5 = np.full(3, 4.0, dtype=np.float32), np.full(3, 5.0, dtype=np.float32)

    async def task(server: ScriptedServer, rid: bytes, round_: int, kind: str, params: np.ndarray) -> None:
        await server.send(rid, MsgType.TASK, task_fields(round_, kind), payload=codec.encode(params, "f32"))
        _, msg = await server.recv()
        assert msg.type is MsgType.RESULT and msg.fields["round"] == round_

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        await task(server, rid, 4, "evaluate", p4)      # the model of round 4, not yet committed
        assert handler.models == []
        await server.send(rid, MsgType.COMMITTED, {"round": 4})
        await _until(lambda: len(handler.models) == 1)
        await task(server, rid, 4, "evaluate", p4)      # the same model again: not handed twice
        await task(server, rid, 6, "train", p5)         # a train task of round 6 carries model 5
        await server.send(rid, MsgType.HEARTBEAT, {})
        assert len(handler.models) == 1
        await server.send(rid, MsgType.COMMITTED, {"round": 5})
        await _until(lambda: len(handler.models) == 2)

    uplink = run_scenario(None, tmp_path / "s.db", scenario, handler=handler)
    (m4, m5) = handler.models
    assert (m4.round, m5.round) == (4, 5) and m4.features == FEATURES and m5.spec == SPEC
    np.testing.assert_array_equal(m4.params, p4)
    np.testing.assert_array_equal(m5.params, p5)
    assert uplink.counters["models_from_tasks"] == 2


def test_a_commit_notice_carried_by_a_task_drops_results_and_hands_over_the_model(tmp_path):
    """task_commits: round r's notice comes in the task of round r + 2; it acts before that task runs."""
    from fedgate.core import codec

    class Trainer(Handler):
        def run_task(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
            return TaskOutcome(n_samples=10, metrics={}, params=global_params + 1)

    handler = Trainer()

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, hello = await server.recv()
        assert hello.fields["quiet_acks"] == 1 and hello.fields["task_commits"] == 1
        await server.welcome(rid)
        for rnd in (1, 2, 3):  # no ack, no committed message: only tasks, the last two carry notices
            fields = task_fields(rnd, "train")
            if rnd >= 2:
                fields["committed"] = rnd - 1
            await server.send(rid, MsgType.TASK, fields,
                              payload=codec.encode(np.full(3, float(rnd - 1), dtype=np.float32), "f32"))
            _, msg = await server.recv()
            assert msg.type is MsgType.RESULT and msg.fields["round"] == rnd
            st = uplink.status()
            assert st["outbox"] == 1  # this round's result; round rnd - 1's went with the notice
            assert st["last_committed_round"] == (None if rnd == 1 else rnd - 1)
        await server.send(rid, MsgType.COMMITTED, {"round": 3})
        await _until(lambda: uplink.status()["outbox"] == 0)

    uplink = run_scenario(None, tmp_path / "s.db", scenario, handler=handler)
    # the train task of round r carries model r - 1: handed over once round r - 1 is committed
    assert [m.round for m in handler.models] == [1, 2]
    np.testing.assert_array_equal(handler.models[-1].params, np.full(3, 2.0, dtype=np.float32))
    assert uplink.counters["outbox_dropped_committed"] == 3


def test_failing_handler_is_counted_and_the_link_stays(tmp_path, caplog):
    class Broken(Handler):
        def run_task(self, task, global_params):
            raise RuntimeError("sensor table empty")

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        rid, _ = await server.recv()
        await server.welcome(rid)
        await server.send(rid, MsgType.TASK, task_fields(1))
        await _until(lambda: uplink.counters["tasks_failed"] == 1)
        await asyncio.sleep(0.7)
        assert uplink.status()["connected"] and uplink.status()["outbox"] == 0

    with caplog.at_level(logging.ERROR, logger="fedgate.agent.uplink"):
        run_scenario(None, tmp_path / "s.db", scenario, handler=Broken())
    assert "sensor table empty" in caplog.text


def test_impostor_server_never_gets_a_hello(keys, tmp_path):
    """The server's public key is pinned: a server with another key never completes CURVE."""
    _, impostor_secret = zmq.curve_keypair()
    impostor = dict(keys, server_secret=impostor_secret)
    got: list[Any] = []

    async def scenario(server: ScriptedServer, uplink: Uplink) -> None:
        try:
            got.append(await server.recv(timeout_s=2.5))
        except (AssertionError, asyncio.TimeoutError):
            pass
        await _until(lambda: uplink.counters["hello_timeouts"] >= 1)
        assert not uplink.status()["connected"]

    up = run_scenario(impostor, tmp_path / "s.db", scenario)
    assert got == [] and up.counters["reconnects"] >= 1
