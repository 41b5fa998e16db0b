"""The agent against the simulated plant, as real processes.

fedgate-sim serves Modbus TCP (and RTU on a pty link with a serial sensor); the agent
runs as ``fedgate-agent run`` with a test-owned NOTIFY_SOCKET. Checked: readiness,
labels against the plant's ground truth, the prediction written into the plant's
holding register from the persisted model, kill -9 during writes, SIGHUP with a broken
config, a device that goes away and comes back, and a clean SIGTERM.
"""
from __future__ import annotations

import csv
import math
import signal
import sqlite3
import struct
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent_rig import BIN, AgentProc, Sim, plant_toml, wait_for
from fedgate.agent.store import Store
from fedgate.core.model import ModelSpec

pytestmark = pytest.mark.slow

SIM_ARGS = ("--profile", "standard", "--seed", "3", "--speed", "30", "--set", "life_min=4", "--set", "repair_min=1")


@pytest.fixture
def sim(tmp_path):
    s = Sim(tmp_path, "--tcp", "127.0.0.1:0", *SIM_ARGS)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def agent_factory(tmp_path):
    made: list[AgentProc] = []

    def make(text: str) -> AgentProc:
        cfg = tmp_path / "agent.toml"
        cfg.write_text(text)
        a = AgentProc(tmp_path, cfg, tmp_path / "data")
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def _samples(data_dir: Path, names: list[str]):
    with Store(data_dir / "agent.db") as st:
        return st.load_samples(names)


def test_ready_then_samples_whose_look_ahead_labels_match_the_plants_ground_truth(tmp_path, sim, agent_factory):
    data = tmp_path / "data"
    agent = agent_factory(plant_toml(data_dir=data, port=sim.port, horizon="2s"))
    agent.start()
    ready = agent.wait_notify("READY=1")
    assert "STATUS=" in ready
    # enough samples to span two faults (a fault every ~8 s of real time with these settings)
    wait_for(lambda: agent.rows() >= 50, "50 stored samples", 90)
    agent.signal(signal.SIGTERM)
    agent.wait_notify("STOPPING=1")
    assert agent.stop() == 0
    got = _samples(data, ["step_last", "fault_last"])
    steps = got.x[:, 0].astype(np.int64)
    assert (np.diff(got.ts) > 0).all() and (np.diff(steps) > 0).all()
    # ground truth: the same plant offline; horizon 2 s real = 60 plant s at speed 30
    truth_csv = tmp_path / "truth.csv"
    subprocess.run([str(BIN / "fedgate-sim"), "--dump-csv", str(int(steps.max()) + 10), "--horizon", "60s",
                    *[a for a in SIM_ARGS if a not in ("--speed", "30")], "--out", str(truth_csv)],
                   check=True, capture_output=True, timeout=120)
    with open(truth_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["machine"] == "0"]
    fault = np.zeros(len(rows) + 2, dtype=bool)
    for r in rows:
        fault[int(r["step"])] = r["fault"] in ("1", "True", "true")
    # the agent's label of a window ending at step s: any fault in (s, s + 60]
    truth = np.array([fault[s + 1:s + 61].any() for s in steps])
    labels = got.y.astype(bool)
    agree = float((truth == labels).mean())
    # grid points see the latest poll (normally <= ~0.35 s = ~10 plant steps old; allow 1 s on a
    # busy machine): a label may differ only where a fault starts or ends within that slack
    slack = 30

    def changes(lo: int, hi: int) -> bool:
        part = fault[max(0, lo):hi]
        return bool(part.size) and bool(part.any()) and not bool(part.all())

    edge = np.array([changes(s + 1 - slack, s + 1 + slack) or changes(s + 61 - slack, s + 61 + slack)
                     for s in steps])
    assert agree >= 0.8, (agree, list(zip(steps, truth, labels)))
    assert ((truth == labels) | edge).all(), [(s, t, lab) for s, t, lab, e in zip(steps, truth, labels, edge)
                                               if t != lab and not e]
    assert labels.any() and not labels.all()
    # look-ahead: windows labelled 1 while the machine was still running fine
    assert (labels & (got.x[:, 1] == 0)).any()


def _persist_model(data: Path, bias: float) -> None:
    data.mkdir(parents=True, exist_ok=True)
    with Store(data / "agent.db") as st:
        st.save_model(round=7, spec=ModelSpec("logistic", n_features=2).to_dict(), features=["temp_mean", "vib_mean"],
                      label="fault_soon", scaler={"mean": [50.0, 2.0], "std": [10.0, 1.0]},
                      params=np.array([0.0, 0.0, bias], np.float32))


def _read_plant(port: int) -> tuple[float, bool]:
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    try:
        assert client.connect()
        regs = client.read_holding_registers(0, count=2, device_id=1).registers
        coil = client.read_coils(1, count=1, device_id=1).bits[0]
    finally:
        client.close()
    return struct.unpack(">f", struct.pack(">HH", *regs))[0], bool(coil)


def test_the_persisted_model_predicts_from_the_start_into_the_plants_register(tmp_path, sim, agent_factory):
    data = tmp_path / "data"
    _persist_model(data, bias=math.log(0.9 / 0.1))  # p = 0.9 whatever the features
    extra = """
[predict]
write_tag = "pump1.prediction"
alarm_threshold = 0.7
hysteresis = 0.1
alarm_tag = "pump1.alarm"
"""
    agent = agent_factory(plant_toml(data_dir=data, port=sim.port, extra=extra))
    agent.start()
    agent.wait_notify("READY=1")
    value, alarm = wait_for(lambda: (lambda v: v if v[0] > 0 else None)(_read_plant(sim.port)),
                            "the prediction in holding register 0", 30)
    assert value == pytest.approx(0.9, abs=1e-5) and alarm is True
    state = wait_for(lambda: (lambda s: s if (s.get("prediction") or {}).get("score") else None)(agent.state()),
                     "a prediction in the state file")
    assert state["prediction"]["model_round"] == 7 and state["prediction"]["alarm"] is True
    body = urllib.request.urlopen(f"http://127.0.0.1:{state['metrics_port']}/metrics", timeout=10).read().decode()
    metrics = {line.split(" ")[0]: line.split(" ")[1] for line in body.splitlines() if line and line[0] != "#"}
    assert float(metrics["fedgate_agent_prediction"]) == pytest.approx(0.9, abs=1e-5)
    assert float(metrics["fedgate_agent_model_round"]) == 7 and float(metrics["fedgate_agent_alarm"]) == 1
    assert float(metrics['fedgate_modbus_device_up{device="pump1"}']) == 1
    out = subprocess.run([str(BIN / "fedgate-agent"), "status", "--config", str(agent.config)],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert "last prediction: 0.9" in out and "ALARM" in out and "device pump1: up" in out
    assert agent.stop() == 0


def test_kill_9_during_writes_loses_no_committed_row_and_the_agent_resumes(tmp_path, sim, agent_factory):
    data = tmp_path / "data"
    agent = agent_factory(plant_toml(data_dir=data, port=sim.port, grid="100ms", window="500ms", hop="100ms",
                                     horizon="100ms", poll="50ms"))
    committed = 0
    for cycle in range(3):
        agent.start()
        agent.wait_notify("READY=1")
        # the state file reports rows committed before it was written
        state = wait_for(lambda: (lambda s: s if s.get("running") and s["samples"]["rows_written"] >= committed + 20
                                  and s["pid"] == agent.proc.pid else None)(agent.state()),
                         "new committed rows", 60)
        agent.kill9()
        committed = state["samples"]["rows_written"]
        conn = sqlite3.connect(str(data / "agent.db"))
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            n = conn.execute("SELECT COUNT(*) FROM agent_samples").fetchone()[0]
            written = conn.execute("SELECT value FROM agent_counters WHERE name = 'rows_written'").fetchone()[0]
        finally:
            conn.close()
        assert n >= committed and n == written, (cycle, n, committed, written)
        committed = n
    got = _samples(data, ["step_last"])
    assert len(got) == committed and (np.diff(got.ts) > 0).all()


def test_sighup_with_a_broken_config_keeps_the_running_one(tmp_path, sim, agent_factory):
    data = tmp_path / "data"
    good = plant_toml(data_dir=data, port=sim.port)
    agent = agent_factory(good)
    agent.start()
    agent.wait_notify("READY=1")
    wait_for(lambda: agent.rows() >= 2, "first samples", 60)
    agent.config.write_text(good.replace('window = "1s"', 'window = "eventually"'))
    agent.signal(signal.SIGHUP)
    agent.wait_notify("RELOADING=1")
    assert "running configuration kept" in agent.wait_notify("READY=1")
    before = agent.rows()
    wait_for(lambda: agent.rows() >= before + 4, "samples after the refused reload", 60)
    assert agent.alive()
    assert "samples.window = 'eventually'" in agent.log()
    state = wait_for(lambda: (lambda s: s if s["counters"]["reloads_failed"] == 1 else None)(agent.state()),
                     "the failed reload in the state file")
    assert state["counters"]["reloads_ok"] == 0
    # a valid change is taken
    agent.config.write_text(good.replace("[metrics]", "[predict]\nhysteresis = 0.2\n\n[metrics]"))
    agent.signal(signal.SIGHUP)
    assert "reloaded" in agent.wait_notify("READY=1")
    wait_for(lambda: agent.state()["counters"]["reloads_ok"] == 1, "the reload in the state file")
    assert agent.stop() == 0


def test_a_device_that_goes_away_and_comes_back(tmp_path, sim, agent_factory):
    data = tmp_path / "data"
    agent = agent_factory(plant_toml(data_dir=data, port=sim.port))
    agent.start()
    agent.wait_notify("READY=1")
    wait_for(lambda: agent.rows() >= 2, "first samples", 60)
    port = sim.port
    sim.stop()
    wait_for(lambda: agent.state().get("devices", {}).get("pump1", {}).get("state") == "down", "pump1 down", 30)
    stalled = agent.rows()
    skipped = lambda: sum(agent.state()["samples"]["sampler"][k] for k in ("windows_low_coverage", "windows_bad_quality"))
    first = skipped()
    wait_for(lambda: skipped() >= first + 4, "windows skipped while the device is down", 30)
    assert agent.rows() <= stalled + 4  # only windows labelled before the loss may still land
    assert agent.alive()
    sim.args[sim.args.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
    wait_for(lambda: _restart(sim), "the plant back on its port", 60, every_s=0.5)
    wait_for(lambda: agent.state().get("devices", {}).get("pump1", {}).get("state") == "up", "pump1 up again", 30)
    n = agent.rows()
    wait_for(lambda: agent.rows() >= n + 3, "samples after the device came back", 60)
    assert agent.stop() == 0


def _restart(sim: Sim) -> bool:
    try:
        sim.start()
    except AssertionError:  # the port may still be held for a moment
        sim.stop()
        return False
    return True


def test_modbus_rtu_over_a_pty_and_a_serial_sensor(tmp_path, agent_factory):
    plc, vib = tmp_path / "plc", tmp_path / "vib"
    sim = Sim(tmp_path, "--rtu-pty", str(plc), "--sensor-pty", str(vib), "--sensor-rate", "10", *SIM_ARGS, name="rtu")
    sim.start()
    try:
        text = f"""
[agent]
name = "site-rtu"
data_dir = "{tmp_path / 'data'}"
[[transports]]
name = "bus"
kind = "modbus-rtu"
port = "{plc}"
baudrate = 19200
timeout = "500ms"
[[devices]]
name = "pump"
transport = "bus"
poll = "200ms"
  [[devices.tags]]
  name = "vibration"
  register = "input"
  address = 41
  type = "uint16"
  scale = 0.01
  [[devices.tags]]
  name = "fault"
  register = "input"
  address = 48
  type = "bit"
  bit = 0
[[transports]]
name = "vib"
kind = "serial-line"
port = "{vib}"
[[devices]]
name = "vib"
transport = "vib"
format = "nmea"
terminator = "\\r\\n"
stale_after = "2s"
  [[devices.tags]]
  name = "vibration"
  sentence = "FGVIB"
  field = 1
[samples]
grid = "250ms"
window = "1s"
hop = "500ms"
min_coverage = 0.75
max_gap = "1s"
features = [
  {{ name = "plc_vib", tag = "pump.vibration", agg = "mean" }},
  {{ name = "sensor_vib", tag = "vib.vibration", agg = "mean" }},
]
  [samples.label]
  name = "fault_soon"
  tag = "pump.fault"
  horizon = "1s"
[metrics]
address = ""
"""
        agent = agent_factory(text)
        agent.start()
        agent.wait_notify("READY=1")
        wait_for(lambda: agent.rows() >= 5, "samples from RTU and the serial sensor", 60)
        got = _samples(tmp_path / "data", ["plc_vib", "sensor_vib"])
        assert (got.x > 0).all()
        # the sensor reports machine 0's vibration: the same signal as the register, rounded
        np.testing.assert_allclose(got.x[:, 0], got.x[:, 1], rtol=0.5)
        assert agent.stop() == 0
    finally:
        sim.stop()


def test_watchdog_pings_come_from_the_running_loop(tmp_path, sim, agent_factory):
    agent = agent_factory(plant_toml(data_dir=tmp_path / "data", port=sim.port))
    agent.start(watchdog_usec=1_000_000)  # systemd asks for a ping at least every second
    agent.wait_notify("READY=1")
    for _ in range(4):
        agent.wait_notify("WATCHDOG=1", timeout_s=10)
    # a stopped (wedged) process sends nothing, so systemd would restart it
    agent.signal(signal.SIGSTOP)
    try:
        agent.messages.clear()
        with pytest.raises(AssertionError, match="no 'WATCHDOG=1'"):
            agent.wait_notify("WATCHDOG=1", timeout_s=2)
    finally:
        agent.signal(signal.SIGCONT)
    agent.wait_notify("WATCHDOG=1", timeout_s=10)
    assert agent.stop() == 0
