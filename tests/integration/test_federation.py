"""Whole federations on 127.0.0.1: the real server daemon and agent processes.

``fedgate-server run --config`` is started as a subprocess; every agent is a process
of ``tests/fedtools.py`` (the real uplink with a seeded synthetic-data handler).
CURVE keys are generated into ``tmp_path``. The fixture kills whatever is still
running at the end and asserts that no process was left behind.
"""
from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedtools  # noqa: E402

pytestmark = pytest.mark.slow

N_FEATURES = 4
FEATURES = [f"f{i}" for i in range(N_FEATURES)]


class Federation:
    """One server and its agents, all real processes, in ``root``."""

    n_features = N_FEATURES  # a subclass widens the model (its extra_fed then names the features)

    def __init__(self, root: Path, agents: list[str], *, rounds: int, min_agents: int | None = None,
                 round_timeout: str = "20s", curve: bool = True, seed_base: int = 11,
                 n_samples: int = 150, evaluate: bool = True, extra_fed: dict[str, Any] | None = None) -> None:
        self.root = root
        self.names = agents
        self.curve = curve
        self.seed_base = seed_base
        self.n_samples = n_samples
        self.keys = fedtools.make_keys(root, "server", agents) if curve else None
        self.port = fedtools.free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.data_dir = root / "server"
        server: dict[str, Any] = {"bind": self.endpoint, "data_dir": str(self.data_dir), "metrics": "",
                                  "heartbeat": "300ms", "dead_after": "2s", "handshake_timeout": "2s"}
        if self.keys is not None:
            server.update(secret_key=str(self.keys["server_secret"]), agents_dir=str(self.keys["agents_dir"]))
        else:
            server["insecure"] = True
        fed: dict[str, Any] = {
            "name": "plant", "model": {"kind": "linear", "n_features": N_FEATURES}, "features": FEATURES,
            "label": "y", "rounds": rounds, "min_agents": min_agents or len(agents), "fraction": 1.0,
            "round_timeout": round_timeout, "local_epochs": 1, "batch_size": 16, "lr": 0.05,
            "codec": "f32", "evaluate": evaluate, "statistics": True, "seed": 3,
        }
        fed.update(extra_fed or {})
        self.config = fedtools.write_toml(root / "server.toml", {
            "server": server, "federation": fed, "strategy": {"name": "fedavg", "max_update_norm": 1e6}})
        self.server: Any = None
        self.agents: dict[str, Any] = {}
        self.all_procs: list[Any] = []

    # -- processes ----------------------------------------------------------------
    def start_server(self) -> None:
        self.server = fedtools.spawn(fedtools.server_command(self.config), self.root / "server.log")
        self.all_procs.append(self.server)

    def start_agent(self, name: str, *, train_delay_s: float = 0.0, **extra: Any) -> None:
        """Start agent ``name`` (``extra``: more ``fedtools.agent_command`` options)."""
        i = self.names.index(name)
        cmd = fedtools.agent_command(
            name, server=self.endpoint, db=self.root / f"{name}.db", keys=self.keys, seed=self.seed_base + i,
            n_samples=self.n_samples, n_features=self.n_features, model_out=self.root / f"{name}.model.npy",
            report=self.root / f"{name}.report.json", heartbeat="300ms", dead_after="1500ms",
            train_delay_s=train_delay_s, **extra)
        proc = fedtools.spawn(cmd, self.root / f"{name}.log")
        self.agents[name] = proc
        self.all_procs.append(proc)

    def start_all(self, **delays: float) -> None:
        self.start_server()
        for name in self.names:
            self.start_agent(name, train_delay_s=delays.get(name, 0.0))

    def shutdown(self) -> None:
        for name, proc in self.agents.items():
            fedtools.stop(proc)
        if self.server is not None:
            fedtools.stop(self.server)

    def assert_alive(self) -> None:
        if self.server is not None and self.server.poll() is not None:
            raise AssertionError(f"server exited with {self.server.returncode}:\n{self.log('server')}")

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    # -- the server's history -------------------------------------------------------
    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        path = self.data_dir / "history.db"
        if not path.exists():
            return []
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
            try:
                return db.execute(sql, args).fetchall()
            finally:
                db.close()
        except sqlite3.OperationalError:
            return []

    def count(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        rows = self.query(sql, args)
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def train_rounds_done(self) -> int:
        rows = self.query("SELECT COUNT(*) FROM rounds WHERE kind = 'train' AND finished IS NOT NULL")
        return int(rows[0][0]) if rows else 0

    def wait(self, cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            self.assert_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n--- server log ---\n{self.log('server')}")
            time.sleep(0.05)

    def final_params(self, round_: int) -> np.ndarray:
        """The global params of the checkpoint of train round ``round_`` (waits for it)."""
        from fedgate.server.store import CheckpointStore

        store = CheckpointStore(self.data_dir / "checkpoints")
        found: dict[str, Any] = {}

        def ready() -> bool:
            ckpt, _ = store.load_latest()
            if ckpt is not None and ckpt.phase == "train" and ckpt.round >= round_:
                found["ckpt"] = ckpt
            return "ckpt" in found

        self.wait(ready, f"the checkpoint of round {round_}", timeout_s=30)
        assert found["ckpt"].round == round_
        return found["ckpt"].arrays["params"].astype(np.float64)

    def pooled_data(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [fedtools.agent_data(self.seed_base + i, self.n_samples, self.n_features)
                 for i in range(len(self.names))]
        return np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def federation_factory(tmp_path: Path, cls: type[Any]) -> Iterator[Callable[..., Any]]:
    """Body of a fixture making ``cls(tmp_path / name, *args, **kw)`` rigs (anything with
    ``shutdown()`` and ``all_procs``), then stopping every process they started."""
    made: list[Any] = []

    def make(name: str, *args: Any, **kw: Any) -> Any:
        root = tmp_path / name
        root.mkdir()
        fed = cls(root, *args, **kw)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.shutdown()
    for fed in made:
        for proc in fed.all_procs:
            if proc.poll() is None:
                fedtools.kill9(proc)
    leftover = [p.pid for fed in made for p in fed.all_procs if p.poll() is None]
    children = psutil.Process().children(recursive=True)
    assert not leftover and not children, f"processes left behind: {leftover} {children}"


@pytest.fixture
def federations(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    yield from federation_factory(tmp_path, Federation)


def ols_on_scaled(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Centralized optimum on the pooled data, features scaled by the pooled mean/std."""
    Xs = (X - X.mean(axis=0)) / X.std(axis=0)
    A = np.hstack([Xs, np.ones((len(Xs), 1))])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return coef  # [w..., b]: the linear model's flat layout


# ------------------------------------------------------------------ tests

def test_federation_converges_to_the_centralized_model(federations):
    fed = federations("conv", ["press-01", "press-02", "press-03", "press-04"], rounds=25)
    fed.start_all()
    fed.wait(lambda: fed.train_rounds_done() >= 25, "25 train rounds", timeout_s=120)
    params = fed.final_params(25)
    X, y = fed.pooled_data()
    want = ols_on_scaled(X, y)
    np.testing.assert_allclose(params, want, rtol=0, atol=0.02)
    # and the same model centralized SGD reaches with as many epochs over the pooled data
    from fedgate.core.model import Model, ModelSpec

    central = Model(ModelSpec("linear", n_features=N_FEATURES), seed=0)
    central.fit((X - X.mean(axis=0)) / X.std(axis=0), y, epochs=25, batch_size=16, lr=0.05)
    np.testing.assert_allclose(params, central.params, rtol=0, atol=0.02)
    # every round aggregated all four agents exactly once
    rows = fed.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round")
    assert [n for _, n in rows] == [4] * 25
    # the agents received the final global model
    fed.wait(lambda: all((fed.root / f"{n}.model.round").exists()
                         and int((fed.root / f"{n}.model.round").read_text()) == 25 for n in fed.names),
             "agents to hold the model of round 25", timeout_s=30)
    np.testing.assert_allclose(np.load(fed.root / "press-01.model.npy"), params, rtol=0, atol=1e-6)


def _outbox_rounds(fed: Federation, name: str) -> list[int]:
    return outbox_rounds_at(fed.root / f"{name}.db")


def outbox_rounds_at(path: Path) -> list[int]:
    """Rounds of the train results an outbox (an agent's or a relay's state file) still holds."""
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return [r for (r,) in db.execute("SELECT round FROM uplink_outbox WHERE kind = 'train'")]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return []


def _kill_mid_round(fed: Federation, round_: int, fast: str) -> None:
    """kill -9 the server once ``fast`` has stored (and so sent) its result of ``round_``."""
    def mid() -> bool:
        issued = fed.count("SELECT COUNT(*) FROM tasks WHERE round = ? AND kind = 'train'", (round_,))
        return issued == len(fed.names) and round_ in _outbox_rounds(fed, fast)
    fed.wait(mid, f"round {round_} half answered", timeout_s=60)
    time.sleep(0.05)  # let the result reach the server
    fedtools.kill9(fed.server)


def test_server_kill9_mid_round_resumes_and_matches_an_uninterrupted_run(federations):
    names = ["line-a", "line-b", "line-c"]
    rounds = 6
    ref = federations("ref", names, rounds=rounds, curve=False, evaluate=False)
    ref.start_all()
    ref.wait(lambda: ref.train_rounds_done() >= rounds, "reference run", timeout_s=120)
    want = ref.final_params(rounds)
    ref.shutdown()

    fed = federations("crash", names, rounds=rounds, curve=True, evaluate=False)
    fed.start_all(**{"line-c": 1.5})  # a slow agent keeps each round open for a while
    _kill_mid_round(fed, 3, fast="line-a")
    assert fed.train_rounds_done() == 2
    fed.start_server()
    fed.wait(lambda: fed.train_rounds_done() >= rounds, "the resumed run", timeout_s=120)
    got = fed.final_params(rounds)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # round 3 resumed (not restarted as a new round) and aggregated each agent exactly once
    rows = fed.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round")
    assert rows == [(r, 3) for r in range(1, rounds + 1)]
    per_agent = fed.query("SELECT agent, COUNT(*) FROM tasks WHERE round = 3 AND kind = 'train' "
                          "AND status = 'accepted' GROUP BY agent")
    assert sorted(per_agent) == [(n, 1) for n in names]
    # the last round's notice goes out once its checkpoint is on disk: then no result is kept
    fed.wait(lambda: not any(_outbox_rounds(fed, n) for n in names), "the agents' outboxes to empty")
    fed.shutdown()
    # an agent re-sent its outbox after the restart, and nothing was left in it
    import json

    reports = [json.loads((fed.root / f"{n}.report.json").read_text()) for n in names]
    assert sum(r["status"]["counters"].get("results_resent", 0) for r in reports) >= 1
    assert all(r["status"]["outbox"] == 0 for r in reports)


def test_agent_killed_mid_round_round_closes_at_deadline_and_agent_rejoins(federations):
    names = ["cell-1", "cell-2", "cell-3"]
    fed = federations("agentkill", names, rounds=14, min_agents=2, round_timeout="3s", evaluate=False)
    fed.start_all(**{"cell-1": 0.3, "cell-3": 0.8})
    # kill cell-3 while it trains in round 2
    fed.wait(lambda: fed.count("SELECT COUNT(*) FROM tasks WHERE round = 2 AND kind = 'train'") == 3,
             "round 2 issued")
    fedtools.kill9(fed.agents["cell-3"])
    fed.wait(lambda: fed.train_rounds_done() >= 3, "two rounds without cell-3", timeout_s=60)
    (r2,) = fed.query("SELECT n_accepted, finished - started FROM rounds WHERE kind = 'train' AND round = 2")
    assert r2[0] == 2 and r2[1] >= 2.9  # closed by its 3 s deadline, with the two live agents
    (r3,) = fed.query("SELECT n_sampled, n_accepted FROM rounds WHERE kind = 'train' AND round = 3")
    assert r3[1] == 2
    fed.start_agent("cell-3")
    fed.wait(lambda: fed.train_rounds_done() >= 14, "the rest of the run", timeout_s=60)
    back = fed.query("SELECT MIN(round) FROM tasks WHERE agent = 'cell-3' AND kind = 'train' "
                     "AND status = 'accepted' AND round > 3")
    assert back[0][0] is not None and back[0][0] < 14
    assert fed.query("SELECT n_accepted FROM rounds WHERE kind = 'train' AND round = 14") == [(3,)]
