"""A whole federation against the real server: statistics round, train rounds, FedAvg maths."""
from __future__ import annotations

import numpy as np
import pytest

from fedgate.core.protocol import MsgType
from fedgate.server.store import History

from test_server_support import Agent, ServerThread, global_params, make_keys, wait_for, write_config


@pytest.fixture
def curve_rig(tmp_path):
    keys = make_keys(tmp_path, ["gw-a", "gw-b", "gw-c"])
    srv = ServerThread(write_config(tmp_path, keys=keys))
    agents = []
    yield srv, keys, agents
    for a in agents:
        a.close()
    srv.stop()


def test_statistics_then_fedavg_rounds_over_curve(curve_rig, tmp_path):
    srv, keys, agents = curve_rig
    a = Agent(srv.endpoint, "gw-a", keys=keys)
    b = Agent(srv.endpoint, "gw-b", keys=keys)
    agents += [a, b]
    welcome = a.hello()
    assert welcome.type is MsgType.WELCOME and welcome.fields["features"] == ["t", "p", "v"]
    assert b.hello().type is MsgType.WELCOME

    rng = np.random.default_rng(0)
    xa, xb = rng.normal(1, 2, (50, 3)), rng.normal(-1, 1, (150, 3))
    ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
    assert ta.fields["kind"] == "statistics" and ta.payload is None
    assert ta.fields["task_id"] != tb.fields["task_id"]
    a.stats_result(ta, xa)
    b.stats_result(tb, xb)
    assert a.expect(MsgType.ACK).fields["status"] == "accepted"
    assert b.expect(MsgType.ACK).fields["status"] == "accepted"

    pooled = np.vstack([xa, xb])
    expected = np.zeros(4, dtype=np.float32)
    for rnd in (1, 2, 3):
        ta, tb = a.expect(MsgType.TASK), b.expect(MsgType.TASK)
        assert ta.fields["kind"] == "train" and ta.fields["round"] == rnd
        np.testing.assert_allclose(ta.fields["scaler"]["mean"], pooled.mean(axis=0), rtol=1e-5)
        np.testing.assert_allclose(ta.fields["scaler"]["std"], pooled.std(axis=0), rtol=1e-5)
        g = global_params(ta)
        np.testing.assert_allclose(g, expected, atol=1e-6)
        ua = g + np.array([1, 0, 0, 0], dtype=np.float32) * rnd
        ub = g + np.array([0, 1, 0, 2], dtype=np.float32)
        a.train_result(ta, ua, n_samples=10, metrics={"loss": 2.0})
        b.train_result(tb, ub, n_samples=30, metrics={"loss": 1.0})
        assert a.expect(MsgType.ACK).fields["status"] == "accepted"
        assert b.expect(MsgType.ACK).fields["status"] == "accepted"
        a.committed(rnd)
        model = a.expect(MsgType.MODEL)
        expected = (10 * ua + 30 * ub) / 40
        np.testing.assert_allclose(global_params(model), expected, atol=1e-6)
    wait_for(lambda: srv.coordinator.finished, what="federation finished")

    hist = History(tmp_path / "data" / "history.db", readonly=True)
    summary = hist.summary()
    hist.close()
    train = [r for r in summary["rounds"] if r["kind"] == "train"]
    assert [r["round"] for r in train] == [1, 2, 3]
    assert train[0]["metrics"]["loss"] == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)
    assert summary["train_rounds"] == 3
    assert {ag["name"] for ag in summary["agents"]} == {"gw-a", "gw-b"}
