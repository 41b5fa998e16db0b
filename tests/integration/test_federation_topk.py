"""Federations whose agents send top-k sparsified deltas (with error feedback).

Real processes on 127.0.0.1 as in ``test_federation.py`` (whose :class:`Federation`
rig this reuses), with a wider linear model so that k = 0.1 really drops most of
every update; and the server daemon in-process with scripted agents
(``test_server_support.py``) for what it does with good and bad deltas.
"""
from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedtools
from fedgate.core import codec
from fedgate.core.protocol import MsgType
from test_federation import Federation, _kill_mid_round, federation_factory, ols_on_scaled
from test_server_support import Agent, ServerThread, global_params, write_config  # starts pyzmq's gc thread

pytestmark = pytest.mark.slow

N_FEATURES = 20  # 21 parameters: k = 0.1 sends 3 of them per agent and round


class WideFederation(Federation):
    """:class:`Federation` with ``n_features`` features and the given codec."""

    def __init__(self, root: Path, agents: list[str], *, n_features: int, codec: str,
                 codec_params: dict[str, Any], **kw: Any) -> None:
        self.n_features = n_features
        fed = {"model": {"kind": "linear", "n_features": n_features},
               "features": [f"f{i}" for i in range(n_features)], "codec": codec, "codec_params": codec_params}
        strategy = kw.pop("strategy", None)
        super().__init__(root, agents, extra_fed=fed | kw.pop("extra_fed", {}), **kw)
        if strategy is not None:
            table = tomllib.loads(self.config.read_text())
            table["strategy"].update(strategy)
            fedtools.write_toml(self.config, table)


@pytest.fixture
def federations(tmp_path: Path) -> Iterator[Callable[..., WideFederation]]:
    yield from federation_factory(tmp_path, WideFederation)


def test_topk_federation_converges_to_the_centralized_model(federations):
    names = ["press-01", "press-02", "press-03", "press-04"]
    rounds = 40
    fed = federations("topk", names, rounds=rounds, n_features=N_FEATURES, codec="topk",
                      codec_params={"k": 0.1}, evaluate=False)
    fed.start_all()
    fed.wait(lambda: fed.train_rounds_done() >= rounds, f"{rounds} train rounds", timeout_s=180)
    params = fed.final_params(rounds)
    X, y = fed.pooled_data()
    want = ols_on_scaled(X, y)
    err = np.abs(params - want).max()
    assert err < 0.05, f"max |params - OLS| = {err:.4g}\n{params}\n{want}"
    # every update of every round was accepted: the server rebuilt parameters from deltas
    rows = fed.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round")
    assert rows == [(r, len(names)) for r in range(1, rounds + 1)]
    assert fed.count("SELECT COUNT(*) FROM tasks WHERE kind = 'train' AND status != 'accepted'") == 0


def test_topk_server_kill9_mid_round_matches_an_uninterrupted_run(federations):
    """Error feedback survives a server crash: no residual applied twice, none lost."""
    names = ["line-a", "line-b", "line-c"]
    rounds = 6
    kw: dict[str, Any] = {"rounds": rounds, "n_features": N_FEATURES, "codec": "topk",
                          "codec_params": {"k": 0.1}, "evaluate": False}
    ref = federations("ref", names, curve=False, **kw)
    ref.start_all()
    ref.wait(lambda: ref.train_rounds_done() >= rounds, "reference run", timeout_s=120)
    want = ref.final_params(rounds)
    ref.shutdown()

    fed = federations("crash", names, curve=True, **kw)
    fed.start_all(**{"line-c": 1.5})  # a slow agent keeps each round open for a while
    _kill_mid_round(fed, 3, fast="line-a")
    assert fed.train_rounds_done() == 2
    fed.start_server()
    fed.wait(lambda: fed.train_rounds_done() >= rounds, "the resumed run", timeout_s=120)
    got = fed.final_params(rounds)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    rows = fed.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round")
    assert rows == [(r, 3) for r in range(1, rounds + 1)]


@pytest.mark.parametrize("strategy", [{"name": "median"}, {"name": "fedavgm", "momentum": 0.5}])
def test_topk_deltas_work_with_robust_and_momentum_strategies(federations, strategy):
    """Strategies see parameters rebuilt from deltas; they converge, only slower than with f32.

    A coordinate-wise median moves a coordinate only when most agents sent it in the
    same round; error feedback makes that happen as the residuals grow.
    """
    names = ["press-01", "press-02", "press-03", "press-04"]
    rounds = 80
    fed = federations(strategy["name"], names, rounds=rounds, n_features=N_FEATURES, codec="topk",
                      codec_params={"k": 0.1}, evaluate=False, strategy=strategy)
    fed.start_all()
    fed.wait(lambda: fed.train_rounds_done() >= rounds, f"{rounds} train rounds", timeout_s=180)
    X, y = fed.pooled_data()
    err = np.abs(fed.final_params(rounds) - ols_on_scaled(X, y)).max()
    assert err < 0.02, f"{strategy}: max |params - OLS| = {err:.4g}"


def test_server_rebuilds_deltas_and_rejects_bad_ones_by_reason(tmp_path):
    """The daemon (in-process, scripted agents): deltas become params; bad ones are counted."""
    fed = {"statistics": False, "rounds": 2, "min_agents": 2, "min_available": 4, "codec": "topk",
           "codec_params": {"k": 0.5}, "round_timeout": "3s"}
    cfg = write_config(tmp_path, federation=fed, strategy={"name": "fedavg", "max_update_norm": 1.0},
                       server={"heartbeat": "10s", "dead_after": "120s"})  # scripted agents send no heartbeats
    srv = ServerThread(cfg)
    agents = [Agent(srv.endpoint, n) for n in ("gw-a", "gw-b", "gw-c", "gw-d")]
    try:
        for x in agents:
            x.hello()
        tasks = [x.expect(MsgType.TASK) for x in agents]
        assert {t.fields["codec"] for t in tasks} == {"topk"} and tasks[0].fields["round"] == 1
        g = global_params(tasks[0])
        rng = np.random.default_rng(5)
        d_a = (rng.normal(size=g.size) * 0.1).astype(np.float32)
        sends = {
            "gw-a": codec.encode(d_a, "topk", k=0.5, delta=True),                      # accepted
            "gw-b": codec.encode(g + d_a, "topk", k=0.5),                              # params: decode
            "gw-c": codec.encode(np.full(g.size, 5.0, np.float32), "topk", k=1.0, delta=True),  # norm
            "gw-d": codec.encode(g - 0.1, "f32"),                                      # params, accepted
        }
        for x, t in zip(agents, tasks):
            x.send(MsgType.RESULT, {"agent": x.name, "task_id": t.fields["task_id"], "round": 1, "kind": "train",
                                    "n_samples": 10, "metrics": {"loss": 1.0}}, sends[x.name])
        acks = {x.name: x.expect(MsgType.ACK).fields for x in agents}
        assert acks["gw-a"]["status"] == acks["gw-d"]["status"] == "accepted"
        assert (acks["gw-b"]["status"], acks["gw-b"]["reason"]) == ("rejected", "decode")
        assert (acks["gw-c"]["status"], acks["gw-c"]["reason"]) == ("rejected", "norm")
        assert srv.metric("fedgate_server_updates_rejected_total", reason="decode") == 1
        assert srv.metric("fedgate_server_updates_rejected_total", reason="norm") == 1
        nxt = agents[0].expect(MsgType.TASK, skip=(MsgType.COMMITTED, MsgType.MODEL, MsgType.HEARTBEAT))
        assert nxt.fields["round"] == 2
        want = ((g + codec.decode(sends["gw-a"])) + (g - np.float32(0.1))) / 2
        np.testing.assert_allclose(global_params(nxt), want, rtol=0, atol=1e-6)
    finally:
        for x in agents:
            x.close()
        srv.stop()
