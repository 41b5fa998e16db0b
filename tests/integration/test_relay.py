"""The relay tier on 127.0.0.1: headquarters, relays and gateways as real processes.

Headquarters and each relay are ``fedgate-server run --config`` subprocesses; every
gateway is a ``tests/fedtools.py`` agent (the real uplink, seeded synthetic data).
CURVE keys everywhere: the relays' public keys sit in headquarters' ``agents_dir``,
each relay's gateways' keys in that relay's own ``agents_dir``.
"""
from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedtools  # noqa: E402
from test_federation import federation_factory, outbox_rounds_at  # noqa: E402

pytestmark = pytest.mark.slow

N_FEATURES = 4
FEATURES = [f"f{i}" for i in range(N_FEATURES)]
# five gateways: two behind each relay, one straight at headquarters
LAYOUT = {"relay-a": ["gw-1", "gw-2"], "relay-b": ["gw-3", "gw-4"], None: ["gw-5"]}
GATEWAYS = ["gw-1", "gw-2", "gw-3", "gw-4", "gw-5"]


def _fed_table(rounds: int, min_agents: int, *, evaluate: bool, relay: bool) -> dict[str, Any]:
    fed: dict[str, Any] = {
        "name": "plant", "model": {"kind": "linear", "n_features": N_FEATURES}, "features": FEATURES,
        "label": "y", "min_agents": min_agents, "fraction": 1.0, "round_timeout": "20s" if not relay else "15s",
        "local_epochs": 1, "batch_size": 16, "lr": 0.05, "codec": "f32", "seed": 3,
    }
    if not relay:
        fed.update(rounds=rounds, evaluate=evaluate, statistics=True)
    return fed


class Tier:
    """Headquarters, its relays and gateways in ``root`` (``flat``: all gateways at headquarters)."""

    def __init__(self, root: Path, *, rounds: int, flat: bool = False, evaluate: bool = True,
                 relay_fed: dict[str, dict[str, Any]] | None = None, hq_fed: dict[str, Any] | None = None,
                 layout: dict[str | None, list[str]] | None = None,
                 relay_strategy: dict[str, Any] | None = None, modes: dict[str, str] | None = None) -> None:
        self.root = root
        self.rounds = rounds
        self.layout = dict(layout or LAYOUT)
        if flat:
            self.layout = {None: [gw for gws in self.layout.values() for gw in gws]}
        self.gateways = [gw for gws in self.layout.values() for gw in gws]
        self.modes = modes or {}
        direct = [*[r for r in self.layout if r], *self.layout.get(None, [])]
        self.hq_keys = fedtools.make_keys(root / "hq", "hq", direct)
        self.hq_endpoint = f"tcp://127.0.0.1:{fedtools.free_port()}"
        self.hq_dir = root / "hq" / "data"
        self.hq_config = fedtools.write_toml(root / "hq.toml", {
            "server": self._server_table(self.hq_endpoint, self.hq_dir, self.hq_keys),
            "federation": {**_fed_table(rounds, len(direct), evaluate=evaluate, relay=False), **(hq_fed or {})},
            "strategy": {"name": "fedavg"}})
        self.relays: dict[str, dict[str, Any]] = {}
        for name in (r for r in self.layout if r):
            keys = fedtools.make_keys(root / name, f"{name}-server", self.layout[name])
            endpoint = f"tcp://127.0.0.1:{fedtools.free_port()}"
            fed = _fed_table(rounds, len(self.layout[name]), evaluate=evaluate, relay=True)
            fed.update((relay_fed or {}).get(name, {}))
            config = fedtools.write_toml(root / f"{name}.toml", {
                "server": self._server_table(endpoint, root / name / "data", keys),
                "federation": fed, "strategy": relay_strategy or {"name": "fedavg"},
                "relay": {"name": name, "server": self.hq_endpoint,
                          "server_key": str(self.hq_keys["server_public"]),
                          "secret_key": str(self.hq_keys["keys_dir"] / f"{name}.key_secret"),
                          "heartbeat": "300ms", "dead_after": "1500ms", "hello_timeout": "2s",
                          "reconnect_delay": "100ms", "reconnect_delay_max": "1s"}})
            self.relays[name] = {"keys": keys, "endpoint": endpoint, "config": config,
                                 "data": root / name / "data"}
        self.procs: dict[str, Any] = {}
        self.all_procs: list[Any] = []

    @staticmethod
    def _server_table(endpoint: str, data: Path, keys: dict[str, Path]) -> dict[str, Any]:
        return {"bind": endpoint, "data_dir": str(data), "metrics": "", "heartbeat": "300ms",
                "dead_after": "2s", "handshake_timeout": "2s", "secret_key": str(keys["server_secret"]),
                "agents_dir": str(keys["agents_dir"])}

    # -- processes ----------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        proc = fedtools.spawn(cmd, self.root / f"{name}.log")
        self.procs[name] = proc
        self.all_procs.append(proc)

    def start_hq(self) -> None:
        self._spawn("hq", fedtools.server_command(self.hq_config))

    def start_relay(self, name: str) -> None:
        self._spawn(name, fedtools.server_command(self.relays[name]["config"]))

    def start_gateway(self, gw: str, *, train_delay_s: float = 0.0) -> None:
        relay = next(r for r, gws in self.layout.items() if gw in gws)
        if relay is None:
            endpoint, keys = self.hq_endpoint, self.hq_keys
        else:
            endpoint, keys = self.relays[relay]["endpoint"], self.relays[relay]["keys"]
        cmd = fedtools.agent_command(
            gw, server=endpoint, db=self.root / f"{gw}.db", keys=keys, seed=10 + int(gw.split("-")[1]),
            mode=self.modes.get(gw, "synth"),
            n_samples=150, n_features=N_FEATURES, model_out=self.root / f"{gw}.model.npy",
            report=self.root / f"{gw}.report.json", heartbeat="300ms", dead_after="1500ms",
            train_delay_s=train_delay_s)
        self._spawn(gw, cmd)

    def start_all(self, **delays: float) -> None:
        self.start_hq()
        for name in self.relays:
            self.start_relay(name)
        for gw in self.gateways:
            self.start_gateway(gw, train_delay_s=delays.get(gw.replace("-", "_"), 0.0))

    def shutdown(self) -> None:
        for gw in self.gateways:
            if gw in self.procs:
                fedtools.stop(self.procs[gw])
        for name in [*self.relays, "hq"]:
            if name in self.procs:
                fedtools.stop(self.procs[name])

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def assert_alive(self) -> None:
        for name in ["hq", *self.relays]:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None and proc.returncode != -9:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")

    # -- history ----------------------------------------------------------------------
    def query(self, sql: str, args: tuple[Any, ...] = (), data: Path | None = None) -> list[tuple[Any, ...]]:
        path = (data or self.hq_dir) / "history.db"
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

    def train_rounds_done(self) -> int:
        rows = self.query("SELECT COUNT(*) FROM rounds WHERE kind = 'train' AND finished IS NOT NULL")
        return int(rows[0][0]) if rows else 0

    def wait(self, cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            self.assert_alive()
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n} ---\n{self.log(n)}" for n in ["hq", *self.relays])
                raise AssertionError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.05)

    def checkpoint(self, data: Path, round_: int) -> Any:
        from fedgate.server.store import CheckpointStore

        store = CheckpointStore(data / "checkpoints")
        found: dict[str, Any] = {}

        def ready() -> bool:
            ckpt, _ = store.load_latest()
            if ckpt is not None and ckpt.phase == "train" and ckpt.round >= round_:
                found["ckpt"] = ckpt
            return "ckpt" in found

        self.wait(ready, f"the checkpoint of round {round_} in {data}", timeout_s=30)
        return found["ckpt"]


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[Callable[..., Tier]]:
    yield from federation_factory(tmp_path, Tier)


def _run(tier: Tier, **delays: float) -> Any:
    tier.start_all(**delays)
    tier.wait(lambda: tier.train_rounds_done() >= tier.rounds, f"{tier.rounds} train rounds", timeout_s=120)
    return tier.checkpoint(tier.hq_dir, tier.rounds)


# ------------------------------------------------------------------ tests

def test_two_relays_and_a_direct_gateway_equal_the_flat_federation(tiers):
    rounds = 4
    flat = tiers("flat", rounds=rounds, flat=True)
    want = _run(flat)
    flat.shutdown()

    tier = tiers("tier", rounds=rounds)
    got = _run(tier)
    np.testing.assert_allclose(got.arrays["params"], want.arrays["params"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.arrays["scaler_mean"], want.arrays["scaler_mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.arrays["scaler_std"], want.arrays["scaler_std"], rtol=1e-6, atol=1e-7)
    # headquarters saw three agents each round: one accepted result per relay (and gw-5) per round
    rows = tier.query("SELECT round, agent, COUNT(*) FROM tasks WHERE kind = 'train' AND status = 'accepted' "
                      "GROUP BY round, agent")
    assert sorted(rows) == sorted((r, a, 1) for r in range(1, rounds + 1) for a in ("gw-5", "relay-a", "relay-b"))
    # a relay's weight is its gateways' samples
    n = tier.query("SELECT n_samples FROM agent_metrics WHERE kind = 'train' AND agent = 'relay-a' AND round = 1")
    assert n == [(300,)]
    # headquarters' evaluate tasks were answered by each relay for its two gateways
    tier.wait(lambda: len(tier.query("SELECT 1 FROM agent_metrics WHERE kind = 'evaluate' AND round = ? "
                                     "AND agent LIKE 'relay-%'", (rounds,))) == 2, "the relays' evaluations")
    ev = tier.query("SELECT agent, n_samples FROM agent_metrics WHERE kind = 'evaluate' AND round = 1 "
                    "AND agent LIKE 'relay-%' ORDER BY agent")
    assert ev == [("relay-a", 300), ("relay-b", 300)]
    # each relay ran the local rounds and checkpointed headquarters' model once committed
    for name, relay in tier.relays.items():
        local = tier.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round",
                           data=relay["data"])
        assert local == [(r, 2) for r in range(1, rounds + 1)], name
        ckpt = tier.checkpoint(relay["data"], rounds)
        np.testing.assert_array_equal(ckpt.arrays["params"], got.arrays["params"])
    # the gateways behind a relay predict with headquarters' model
    tier.wait(lambda: all((tier.root / f"{gw}.model.round").exists()
                          and int((tier.root / f"{gw}.model.round").read_text()) == rounds for gw in GATEWAYS),
              "gateways to hold the final model", timeout_s=30)
    for gw in GATEWAYS:
        np.testing.assert_array_equal(np.load(tier.root / f"{gw}.model.npy"), got.arrays["params"])
    # SIGHUP reloads a relay's config and keys; SIGTERM stops headquarters, relays and gateways cleanly
    tier.procs["relay-b"].send_signal(signal.SIGHUP)
    tier.wait(lambda: "reload" in tier.log("relay-b") or "allow-list" in tier.log("relay-b"), "relay-b to reload")
    for name in GATEWAYS:
        assert fedtools.stop(tier.procs[name]) == 0, tier.log(name)
    for name in ("relay-a", "relay-b", "hq"):
        assert fedtools.stop(tier.procs[name]) == 0, tier.log(name)


def test_q8_updates_through_relays_stay_close_to_the_flat_federation(tiers):
    # the gateways quantize with headquarters' codec, the relays quantize their combination again
    q8 = {"codec": "q8", "codec_params": {"block": 64}}
    flat = tiers("flat", rounds=3, flat=True, evaluate=False, hq_fed=q8)
    want = _run(flat).arrays["params"]
    flat.shutdown()
    tier = tiers("tier", rounds=3, evaluate=False, hq_fed=q8)
    got = _run(tier).arrays["params"]
    assert not np.array_equal(got, want)  # quantized twice on this path
    np.testing.assert_allclose(got, want, rtol=0, atol=0.1)


def _local_outbox_rounds(tier: Tier, gw: str) -> list[int]:
    return outbox_rounds_at(tier.root / f"{gw}.db")


def test_relay_killed_mid_round_restarts_and_the_model_equals_an_uninterrupted_run(tiers):
    rounds = 5
    ref = tiers("ref", rounds=rounds, evaluate=False)
    want = _run(ref)
    ref.shutdown()

    tier = tiers("crash", rounds=rounds, evaluate=False)
    tier.start_all(gw_2=1.5)  # a slow gateway keeps relay-a's local rounds open for a while
    relay = tier.relays["relay-a"]

    def mid() -> bool:  # relay-a issued local round 3 and gw-1 has answered it
        issued = tier.query("SELECT COUNT(*) FROM tasks WHERE round = 3 AND kind = 'train'", data=relay["data"])
        return bool(issued) and issued[0][0] == 2 and 3 in _local_outbox_rounds(tier, "gw-1")

    tier.wait(mid, "relay-a's local round 3 half answered")
    time.sleep(0.05)  # let gw-1's result reach the relay
    fedtools.kill9(tier.procs["relay-a"])
    assert tier.train_rounds_done() == 2
    tier.start_relay("relay-a")
    tier.wait(lambda: tier.train_rounds_done() >= rounds, "the resumed run", timeout_s=120)
    got = tier.checkpoint(tier.hq_dir, rounds)
    np.testing.assert_allclose(got.arrays["params"], want.arrays["params"], rtol=0, atol=1e-6)
    # nothing counted twice: headquarters took one result per agent per round
    rows = tier.query("SELECT round, agent, COUNT(*) FROM tasks WHERE kind = 'train' AND status = 'accepted' "
                      "GROUP BY round, agent")
    assert sorted(rows) == sorted((r, a, 1) for r in range(1, rounds + 1) for a in ("gw-5", "relay-a", "relay-b"))
    assert tier.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round") == \
        [(r, 3) for r in range(1, rounds + 1)]
    # the restarted relay ran round 3 again with fresh local tasks; the old ones were expired
    local3 = tier.query("SELECT status, COUNT(*) FROM tasks WHERE round = 3 AND kind = 'train' GROUP BY status",
                        data=relay["data"])
    assert dict(local3) == {"expired": 2, "accepted": 2}
    # once headquarters' last commit reached relay-a, its gateways hold no result any more
    tier.checkpoint(relay["data"], rounds)
    tier.wait(lambda: not _local_outbox_rounds(tier, "gw-1") and not _local_outbox_rounds(tier, "gw-2"),
              "the gateways' outboxes to empty")
    from fedgate.server.cli import status_report

    tier.wait(lambda: (status_report(str(relay["config"]))["relay"] or {}).get("gateways_committed_round") == rounds,
              "relay-a's status to show the gateways told the last round")
    tier.shutdown()
    reports = [json.loads((tier.root / f"{gw}.report.json").read_text()) for gw in ("gw-1", "gw-2")]
    assert all(r["status"]["outbox"] == 0 for r in reports)


def _relay_outbox_rounds(tier: Tier, relay: str) -> list[int]:
    return outbox_rounds_at(tier.relays[relay]["data"] / "relay.db")


def test_relay_killed_after_answering_resends_its_stored_result(tiers):
    rounds = 4
    ref = tiers("ref", rounds=rounds, evaluate=False)
    want = _run(ref)
    ref.shutdown()

    tier = tiers("answered", rounds=rounds, evaluate=False)
    tier.start_all(gw_5=1.5)  # the direct gateway keeps headquarters' rounds open after relay-a answered
    tier.wait(lambda: 3 in _relay_outbox_rounds(tier, "relay-a"), "relay-a's stored answer to round 3")
    fedtools.kill9(tier.procs["relay-a"])
    assert tier.train_rounds_done() == 2
    tier.start_relay("relay-a")
    tier.wait(lambda: tier.train_rounds_done() >= rounds, "the resumed run", timeout_s=120)
    got = tier.checkpoint(tier.hq_dir, rounds)
    np.testing.assert_allclose(got.arrays["params"], want.arrays["params"], rtol=0, atol=1e-6)
    rows = tier.query("SELECT round, agent, COUNT(*) FROM tasks WHERE kind = 'train' AND status = 'accepted' "
                      "GROUP BY round, agent")
    assert sorted(rows) == sorted((r, a, 1) for r in range(1, rounds + 1) for a in ("gw-5", "relay-a", "relay-b"))
    # the restarted relay did not run round 3 again: its outbox sent the stored answer
    local3 = tier.query("SELECT COUNT(*) FROM tasks WHERE round = 3 AND kind = 'train'",
                        data=tier.relays["relay-a"]["data"])
    assert local3 == [(2,)]
    tier.checkpoint(tier.relays["relay-a"]["data"], rounds)  # headquarters' last commit reached the relay
    tier.wait(lambda: not _relay_outbox_rounds(tier, "relay-a"), "relay-a's outbox to empty")
    tier.shutdown()
    from fedgate.server.relay import read_state

    state = read_state(str(tier.relays["relay-a"]["data"]))
    assert state is not None and state["counters"].get("results_resent", 0) >= 1
    assert state["outbox"] == 0


def test_relay_with_features_headquarters_lacks_is_refused_at_hello(tiers):
    # (no gateway can serve these features: round_timeout bounds how long relay-b waits for them before joining)
    tier = tiers("features", rounds=2, relay_fed={"relay-b": {"features": ["f0", "f1", "x9", "f2"],
                                                             "round_timeout": "1s"}})
    tier.start_hq()
    tier.start_relay("relay-b")
    tier.wait(lambda: "relay-b refused" in tier.log("hq"), "headquarters to refuse relay-b")
    assert "lacks features f3" in tier.log("hq")
    from fedgate.server.cli import status_report

    def refused() -> bool:
        state = status_report(str(tier.relays["relay-b"]["config"])).get("relay") or {}
        return bool(state.get("upstream_state")) and state.get("refused") is not None

    tier.wait(refused, "relay-b's status to show the refusal")
    state = status_report(str(tier.relays["relay-b"]["config"]))["relay"]
    assert state["upstream"] == tier.hq_endpoint and state["name"] == "relay-b"
    assert state["refused"]["missing"] == ["f3"]
    assert not state["connected"]


def test_upstream_task_with_another_model_spec_fails_with_a_counter(tiers):
    port = fedtools.free_port()
    tier = tiers("spec", rounds=2, relay_fed={"relay-a": {"model": {"kind": "linear", "n_features": N_FEATURES,
                                                                      "loss": "huber"}, "round_timeout": "1s"}},
                 hq_fed={"min_agents": 1})
    text = tier.relays["relay-a"]["config"].read_text().replace('metrics = ""', f'metrics = "127.0.0.1:{port}"', 1)
    tier.relays["relay-a"]["config"].write_text(text)
    tier.start_hq()
    tier.start_relay("relay-a")
    import urllib.request

    def metric(name: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                body = resp.read().decode()
        except OSError:
            return 0.0
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    tier.wait(lambda: metric('fedgate_server_relay_upstream_failures_total{reason="spec"}') >= 1,
              "a refused upstream task")
    tier.wait(lambda: metric("fedgate_server_relay_upstream_connected") == 1, "the upstream link on the metrics")
    assert metric('fedgate_server_relay_upstream_tasks_total{kind="statistics"}') >= 1
    assert "does not match the relay's [federation]" in tier.log("relay-a")
    assert "huber" in tier.log("relay-a")


def test_a_median_relay_bounds_a_broken_gateway_behind_it(tiers):
    rounds = 4
    honest = tiers("honest", rounds=rounds, flat=True, layout={None: ["gw-1", "gw-2", "gw-3", "gw-4"]})
    want = _run(honest).arrays["params"]
    honest.shutdown()

    tier = tiers("robust", rounds=rounds, layout={"relay-a": ["gw-1", "gw-2", "gw-3"], None: ["gw-4"]},
                 relay_strategy={"name": "median"}, modes={"gw-3": "broken"})
    got = _run(tier).arrays["params"]
    # gw-3's results (+50 on every parameter) were taken by the relay every round ...
    local = tier.query("SELECT round, n_accepted FROM rounds WHERE kind = 'train' ORDER BY round",
                       data=tier.relays["relay-a"]["data"])
    assert local == [(r, 3) for r in range(1, rounds + 1)]
    # ... and the coordinate median kept the global model near the honest federation's
    # (a weighted mean at the relay moves the model by about 30 over these rounds)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=0, atol=2.0)  # 0.6 here; a fedavg relay: 31


def test_relay_joins_headquarters_once_its_gateways_are_ready(tiers):
    from fedgate.server.cli import status_report

    # relay-a joins anyway after its round_timeout: long enough for two gateways to start on a busy machine
    tier = tiers("join", rounds=1, layout={"relay-a": ["gw-1", "gw-2"]},
                 relay_fed={"relay-a": {"round_timeout": "120s"}})
    tier.start_hq()
    tier.start_relay("relay-a")
    config = str(tier.relays["relay-a"]["config"])
    tier.wait(lambda: (status_report(config)["relay"] or {}).get("upstream_state")
              == "waiting for its gateways before joining", "relay-a to wait for its gateways")
    tier.start_gateway("gw-1")
    tier.wait(lambda: "agent gw-1 registered" in tier.log("relay-a"), "gw-1 at relay-a")
    assert "relay-a registered" not in tier.log("hq")  # one gateway is not relay-a's quorum of two
    tier.start_gateway("gw-2")
    tier.wait(lambda: "agent relay-a registered (fedgate-relay/0.1.0, 300 samples)" in tier.log("hq"),
              "relay-a to join headquarters with its gateways' samples")
    tier.wait(lambda: tier.train_rounds_done() >= 1, "the round")
    tier.wait(lambda: (status_report(config)["relay"] or {}).get("upstream_state") == "connected",
              "relay-a's status to show it connected")


def test_relay_that_lost_its_quorum_asks_for_the_task_again_when_its_gateways_return(tiers):
    rounds = 4
    # headquarters needs relay-a's answer every round; relay-a needs both of its gateways
    tier = tiers("rejoin", rounds=rounds, evaluate=False, layout={"relay-a": ["gw-1", "gw-2"], None: ["gw-5"]},
                 relay_fed={"relay-a": {"round_timeout": "1s"}})
    tier.start_all(gw_1=0.2)
    tier.wait(lambda: tier.train_rounds_done() >= 1, "round 1")
    fedtools.kill9(tier.procs["gw-2"])
    tier.wait(lambda: "failed" in tier.log("relay-a") and "gateways" in tier.log("relay-a"),
              "relay-a to fail a task for want of gw-2")
    done = tier.train_rounds_done()
    assert done < rounds
    tier.start_gateway("gw-2")
    tier.wait(lambda: tier.train_rounds_done() >= rounds, "the rest of the run once gw-2 is back")
    assert "saying hello to headquarters so it re-sends its task" in tier.log("relay-a")
    rows = tier.query("SELECT round, agent, COUNT(*) FROM tasks WHERE kind = 'train' AND status = 'accepted' "
                      "GROUP BY round, agent")
    assert sorted(rows) == sorted((r, a, 1) for r in range(1, rounds + 1) for a in ("gw-5", "relay-a"))
