"""Dead agents, deadlines and quorum, evaluation rounds, DP accounting, Byzantine agents end to end."""
from __future__ import annotations

import numpy as np
import pytest

from fedgate.core.protocol import MsgType
from fedgate.server.store import History

from test_server_support import Agent, ServerThread, global_params, wait_for, write_config

NAMES = ["gw-a", "gw-b", "gw-c"]


@pytest.fixture
def insecure(tmp_path):
    made: list = []

    def start(**tables):
        srv = ServerThread(write_config(tmp_path, **tables))
        made.append(srv)
        agents = [Agent(srv.endpoint, n) for n in NAMES]
        made.extend(agents)
        return srv, agents

    yield start
    for obj in reversed(made):
        obj.stop() if isinstance(obj, ServerThread) else obj.close()


def test_dead_agent_is_noticed_and_round_closes_at_deadline(insecure):
    srv, (a, b, c) = insecure(federation={"statistics": False, "min_available": 3, "round_timeout": "2s"},
                              server={"heartbeat": "500ms", "dead_after": "2s"})
    for x in (a, b, c):
        assert x.hello().type is MsgType.WELCOME
    ta, tb, tc = (x.expect(MsgType.TASK) for x in (a, b, c))
    g = global_params(ta)
    a.train_result(ta, g + 1)
    b.train_result(tb, g + 3)
    c.close()  # killed mid-round: never answers, never heartbeats
    for x in (a, b):
        assert x.expect(MsgType.ACK).fields["status"] == "accepted"
    while True:  # keep a and b alive while the deadline passes
        a.send(MsgType.HEARTBEAT, {"agent": "gw-a"})
        b.send(MsgType.HEARTBEAT, {"agent": "gw-b"})
        msg = a.recv()
        if msg.type is MsgType.COMMITTED:
            break
    assert msg.fields["round"] == 1
    np.testing.assert_allclose(srv.coordinator.params, g + 2, atol=1e-6)
    wait_for(lambda: srv.metric("fedgate_server_dead_agents_total") >= 1, timeout_s=15, what="dead agent noticed")
    assert "gw-c" not in srv.coordinator.registry.alive_names()
    # the agent comes back: it is sampled again
    c2 = Agent(srv.endpoint, "gw-c")
    try:
        assert c2.hello().type is MsgType.WELCOME
        assert "gw-c" in srv.coordinator.registry.alive_names()
    finally:
        c2.close()


def test_without_quorum_the_round_waits(insecure, caplog):
    srv, (a, b, c) = insecure(federation={"statistics": False, "min_available": 3, "min_agents": 3,
                                          "round_timeout": "300ms"},
                              server={"heartbeat": "10s", "dead_after": "60s"})
    for x in (a, b, c):
        x.hello()
    ta = a.expect(MsgType.TASK)
    a.train_result(ta, global_params(ta))
    assert a.expect(MsgType.ACK).fields["status"] == "accepted"
    wait_for(lambda: "deadline passed with 1 of 3 results, need 3" in caplog.text, what="waiting logged")
    assert srv.coordinator.committed == -1 and srv.coordinator.open is not None


def test_evaluation_tasks_follow_each_commit(insecure, tmp_path):
    srv, (a, b, c) = insecure(federation={"statistics": False, "evaluate": True, "rounds": 1})
    a.hello()
    b.hello()
    ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
    g = global_params(ta)
    a.train_result(ta, g + 1)
    b.train_result(tb, g + 1)
    ea = a.expect(MsgType.TASK, skip=(MsgType.ACK, MsgType.COMMITTED, MsgType.MODEL))
    eb = b.expect(MsgType.TASK, skip=(MsgType.ACK, MsgType.COMMITTED, MsgType.MODEL))
    assert ea.fields["kind"] == "evaluate" and ea.fields["round"] == 1
    np.testing.assert_allclose(global_params(ea), g + 1)
    for x, t, loss in ((a, ea, 0.5), (b, eb, 1.5)):
        x.send(MsgType.RESULT, {"agent": x.name, "task_id": t.fields["task_id"], "round": 1, "kind": "evaluate",
                                "n_samples": 10, "metrics": {"loss": loss}})
        assert x.expect(MsgType.ACK).fields["status"] == "accepted"
    a.send(MsgType.RESULT, {"agent": "gw-a", "task_id": ea.fields["task_id"], "round": 1, "kind": "evaluate",
                            "n_samples": 10, "metrics": {"loss": 0.5}})
    assert a.expect(MsgType.ACK).fields["reason"] == "duplicate"

    def eval_row():
        h = History(tmp_path / "data" / "history.db", readonly=True)
        try:
            # both evaluations (the row is rewritten as results are flushed)
            return [r for r in h.summary()["rounds"] if r["kind"] == "evaluate" and r["n_accepted"] == 2]
        finally:
            h.close()
    rows = wait_for(eval_row, what="evaluation recorded")
    assert rows[0]["metrics"]["loss"] == pytest.approx(1.0)


def test_dp_rounds_report_epsilon(insecure, tmp_path):
    srv, (a, b, c) = insecure(federation={"statistics": False, "rounds": 2},
                              privacy={"noise_multiplier": 1.0, "clip_norm": 0.5, "population": 10})
    a.hello()
    b.hello()
    for rnd in (1, 2):
        ta, tb = (x.expect(MsgType.TASK, skip=(MsgType.ACK, MsgType.COMMITTED, MsgType.MODEL)) for x in (a, b))
        g = global_params(ta)
        a.train_result(ta, g + 10)  # far beyond the clip norm: clipped, not rejected
        b.train_result(tb, g - 10)
        a.committed(rnd)
    eps = srv.metric("fedgate_server_privacy_epsilon")
    assert eps > 0
    h = History(tmp_path / "data" / "history.db", readonly=True)
    rows = [r for r in h.summary()["rounds"] if r["kind"] == "train"]
    h.close()
    assert rows[0]["epsilon"] < rows[1]["epsilon"] == pytest.approx(eps)
    # each clipped change has norm 0.5, they cancel; the noise std is z * S / m = 0.25 per coordinate
    assert np.linalg.norm(srv.coordinator.params - g) < 0.25 * 4 * 4


@pytest.mark.parametrize("strategy", [{"name": "median"}, {"name": "trimmed_mean", "trim_beta": 0.25},
                                      {"name": "krum", "byzantine": 1}])
def test_byzantine_agent_does_not_move_robust_server(tmp_path, strategy):
    names = [f"gw-{i}" for i in range(5)]
    srv = ServerThread(write_config(tmp_path, federation={"statistics": False, "rounds": 2, "min_agents": 5},
                                    strategy=strategy, model={"kind": "linear", "n_features": 30}))
    agents = [Agent(srv.endpoint, n) for n in names]
    try:
        for x in agents:
            x.hello()
        rng = np.random.default_rng(3)
        for rnd in (1, 2):
            tasks = [x.expect(MsgType.TASK) for x in agents]
            g = global_params(tasks[0])
            step = rng.normal(size=g.size).astype(np.float32)
            honest = [g + step + rng.normal(scale=0.01, size=g.size).astype(np.float32) for _ in range(4)]
            for x, t, u in zip(agents, tasks, honest + [g - 40 * step]):  # gw-4 sign-flips and scales
                x.train_result(t, u)
            agents[0].committed(rnd)
            clean = np.mean(honest, axis=0)
            assert np.linalg.norm(srv.coordinator.params - clean) < 0.1 * np.linalg.norm(step)
    finally:
        for x in agents:
            x.close()
        srv.stop()


def test_a_round_that_cannot_be_checkpointed_stops_the_server(tmp_path):
    import shutil

    from fedgate.core.errors import StoreError

    srv = ServerThread(write_config(tmp_path, federation={"statistics": False}))
    a, b = Agent(srv.endpoint, "gw-a"), Agent(srv.endpoint, "gw-b")
    try:
        a.hello()
        b.hello()
        ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
        shutil.rmtree(tmp_path / "data" / "checkpoints")
        (tmp_path / "data" / "checkpoints").write_text("the disk went away")
        a.train_result(ta, global_params(ta))
        b.train_result(tb, global_params(tb))
        srv.thread.join(timeout=20)
        assert not srv.thread.is_alive()
        assert isinstance(srv.error, StoreError)
    finally:
        a.close()
        b.close()
        srv.error = None
        srv.stop()
