"""Two plants, two agents and the real server: a whole federation as processes.

Keys come from ``fedgate-agent keygen`` and ``fedgate-server keygen`` (CURVE on). The
agents start while the server is still down (they sample, store and wait), the server
comes up, statistics and train rounds run on the agents' stored samples, the global
model reaches the agents and its prediction lands in each plant's holding register;
then the server goes away for a while and comes back, and the rounds continue.
"""
from __future__ import annotations

import signal
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest

from agent_rig import BIN, AgentProc, Sim, plant_toml, wait_for

pytestmark = pytest.mark.slow

FEATURES = ["vib_mean", "vib_max", "temp_mean"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rounds_done(data_dir: Path) -> int:
    path = data_dir / "history.db"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT COUNT(*) FROM rounds WHERE kind = 'train' AND finished IS NOT NULL").fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0
    return int(row[0] or 0)


def _prediction(port: int) -> float:
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    try:
        if not client.connect():
            return 0.0
        regs = client.read_holding_registers(0, count=2, device_id=1).registers
    finally:
        client.close()
    return struct.unpack(">f", struct.pack(">HH", *regs))[0]


class Server:
    def __init__(self, root: Path, config: Path) -> None:
        self.root, self.config = root, config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "fedgate-server"), "run", "--config", str(self.config)],
                                         stdout=log, stderr=log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@pytest.fixture
def rig(tmp_path):
    made: list = []
    yield made
    for thing in reversed(made):
        thing.close() if isinstance(thing, AgentProc) else thing.stop()


def test_federation_of_two_plants_with_a_server_that_comes_and_goes(tmp_path, rig):
    keys, agents_dir = tmp_path / "keys", tmp_path / "agents.d"
    agents_dir.mkdir()
    names = ["site-a", "site-b"]
    subprocess.run([str(BIN / "fedgate-server"), "keygen", "server", "--dir", str(keys)], check=True,
                   capture_output=True, timeout=60)
    for name in names:
        out = subprocess.run([str(BIN / "fedgate-agent"), "keygen", name, "--dir", str(keys)], check=True,
                             capture_output=True, text=True, timeout=60).stdout
        assert f"{name}.key_secret" in out
        (agents_dir / f"{name}.key").write_text((keys / f"{name}.key").read_text())
        assert (keys / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
    port = _free_port()
    server_dir = tmp_path / "server"
    server_cfg = tmp_path / "server.toml"
    server_cfg.write_text(f"""
[server]
bind = "tcp://127.0.0.1:{port}"
data_dir = "{server_dir}"
secret_key = "{keys / 'server.key_secret'}"
agents_dir = "{agents_dir}"
metrics = ""
heartbeat = "300ms"
dead_after = "2s"
handshake_timeout = "2s"

[federation]
name = "pumps"
features = {FEATURES!r}
label = "fault_soon"
rounds = 6
min_agents = 2
round_timeout = "30s"
local_epochs = 2
batch_size = 16
lr = 0.1
prox_mu = 0.01
evaluate = true
statistics = true
[federation.model]
kind = "logistic"
n_features = {len(FEATURES)}

[strategy]
name = "fedavg"
max_update_norm = 1000.0
""".replace("'", '"'))
    sims, agents = [], []
    for i, name in enumerate(names):
        sim = Sim(tmp_path, "--tcp", "127.0.0.1:0", "--profile", "standard", "--seed", str(10 + i), "--speed", "30",
                  "--set", "life_min=3", "--set", "repair_min=1", name=f"sim-{name}")
        sim.start()
        rig.append(sim)
        sims.append(sim)
        root = tmp_path / name
        root.mkdir()
        uplink = f"""
[uplink]
server = "tcp://127.0.0.1:{port}"
server_key = "{keys / 'server.key'}"
secret_key = "{keys / (name + '.key_secret')}"
heartbeat = "300ms"
reconnect_delay = "200ms"
reconnect_delay_max = "1s"
"""
        text = plant_toml(data_dir=root / "data", port=sim.port, grid="250ms", window="1s", hop="250ms",
                          horizon="1s", uplink=uplink, extra='[predict]\nwrite_tag = "pump1.prediction"\n')
        text = text.replace('name = "site-a"', f'name = "{name}"', 1)
        (root / "agent.toml").write_text(text)
        agent = AgentProc(root, root / "agent.toml", root / "data")
        rig.append(agent)
        agents.append(agent)
        agent.start()
        agent.wait_notify("READY=1")
    # no server yet: the agents sample and store anyway
    for agent in agents:
        wait_for(lambda: agent.rows() >= 30, "samples stored while the server is down", 60)
        assert agent.alive()
    server = Server(tmp_path, server_cfg)
    rig.append(server)
    server.start()
    wait_for(lambda: _rounds_done(server_dir) >= 2, "two train rounds", 120)
    for agent, sim in zip(agents, sims):
        st = wait_for(lambda: (lambda s: s if (s.get("federation") or {}).get("model_round") else None)(agent.state()),
                      "a global model at the agent", 60)
        assert st["uplink"]["secure"] is True
        value = wait_for(lambda: (lambda v: v if 0.0 < v < 1.0 else None)(_prediction(sim.port)),
                         "the global model's prediction in the plant's register", 60)
        assert 0.0 < value < 1.0
    # the server goes away: the agents keep sampling; then it comes back and the rounds go on
    server.stop()
    done = _rounds_done(server_dir)
    before = [a.rows() for a in agents]
    for agent, n in zip(agents, before):
        wait_for(lambda: agent.rows() >= n + 8, "samples while the server is down", 60)
        assert agent.alive()
    # it comes back with three more rounds to run
    assert done == 6
    server_cfg.write_text(server_cfg.read_text().replace("rounds = 6", "rounds = 9"))
    server.start()
    wait_for(lambda: _rounds_done(server_dir) >= 9, "rounds after the server came back", 120)
    for agent in agents:
        st = wait_for(lambda: (lambda s: s if ((s.get("federation") or {}).get("model_round") or 0) >= 9
                               and s["federation"]["last_round"] >= 9 else None)(agent.state()),
                      "the last round's model at the agent", 60)
        assert st["federation"]["tasks_failed"] == 0, agent.log()[-3000:]
        assert st["federation"]["tasks_done"] >= 1 + 2 * 9 - 6  # every task since it last connected
        assert "loss" in st["federation"]["last_metrics"]
        assert agent.stop() == 0


def test_a_federation_asking_for_features_the_agent_lacks_is_refused_with_their_names(tmp_path, rig):
    sim = Sim(tmp_path, "--tcp", "127.0.0.1:0", "--profile", "standard", "--seed", "5")
    sim.start()
    rig.append(sim)
    port = _free_port()
    server_cfg = tmp_path / "server.toml"
    server_cfg.write_text(f"""
[server]
bind = "tcp://127.0.0.1:{port}"
data_dir = "{tmp_path / 'server'}"
insecure = true
metrics = ""
heartbeat = "300ms"
[federation]
name = "pumps"
features = ["vib_mean", "oil_temp", "temp_mean", "spindle_load"]
label = "fault_soon"
rounds = 1
min_agents = 1
[federation.model]
kind = "logistic"
n_features = 4
[strategy]
name = "fedavg"
""")
    server = Server(tmp_path, server_cfg)
    rig.append(server)
    server.start()
    uplink = f'[uplink]\nserver = "tcp://127.0.0.1:{port}"\ninsecure = true\nheartbeat = "300ms"\n'
    (tmp_path / "agent.toml").write_text(plant_toml(data_dir=tmp_path / "data", port=sim.port, uplink=uplink))
    agent = AgentProc(tmp_path, tmp_path / "agent.toml", tmp_path / "data")
    rig.append(agent)
    agent.start()
    agent.wait_notify("READY=1")
    st = wait_for(lambda: (lambda s: s if (s.get("uplink") or {}).get("refused") else None)(agent.state()),
                  "the refusal in the agent's state", 60)
    assert st["uplink"]["refused"]["missing"] == ["oil_temp", "spindle_load"]
    wait_for(lambda: "oil_temp" in agent.log() and "spindle_load" in agent.log(), "the missing names in the log", 30)
    assert "oil_temp" in (tmp_path / "server.log").read_text()
    # refused, it keeps sampling on its own
    n = agent.rows()
    wait_for(lambda: agent.rows() > n, "samples after the refusal", 60)
    assert agent.stop() == 0
