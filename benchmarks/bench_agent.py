#!/usr/bin/env python
"""Footprint of the gateway agent: exec -> READY, polling CPU, peak RSS with a training round.

Setup: ``fedgate-sim`` serves two units over Modbus TCP; the agent polls 100 tags (99
registers + the fault bit) at 10 Hz, builds 20 features, and starts with 100,000
samples already in its store. Measured, each beside a baseline taken in the same run:

* exec -> READY=1 (our own NOTIFY_SOCKET datagram socket) vs exec -> exit of
  ``python -c "import numpy, zmq, pymodbus"``;
* CPU share while polling (samples, windows, store writes, predictions) vs a bare
  pymodbus asyncio loop making the same requests at the same rate;
* peak RSS (VmHWM) of the agent after a statistics + train round run by the real
  server over those 100k samples vs the peak RSS of the bare import.

    flock /tmp/fedgate-bench.lock python benchmarks/bench_agent.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

BIN = Path(sys.executable).parent
N_FEATURES = 20
BASELINE_IMPORT = "import numpy, zmq, pymodbus"
UNIT = Path(__file__).resolve().parent.parent / "deploy" / "fedgate-agent.service"


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The ``Environment=`` settings of the systemd unit, so the agent runs as it would there.

    ``PYTHONDONTWRITEBYTECODE`` is left out: the unit relies on byte code compiled at
    install time, here Python writes it on the first start (the READY median absorbs it).
    """
    env: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line[len("Environment="):].partition("=")
            if key != "PYTHONDONTWRITEBYTECODE":
                env[key] = value
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        out = cond()
        if out:
            return out
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def start_sim(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    ready = tmp / "sim.json"
    proc = subprocess.Popen([str(BIN / "fedgate-sim"), "--tcp", "127.0.0.1:0", "--profile", "standard,heavy",
                             "--seed", "1", "--speed", "10", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(ready.exists, 30, "fedgate-sim")
    return proc, int(json.loads(ready.read_text())["port"])


def agent_toml(tmp: Path, port: int, server_port: int | None) -> Path:
    lines = [f'[agent]\nname = "bench"\ndata_dir = "{tmp / "data"}"\nlog_level = "warning"\n']
    if server_port is not None:
        lines.append(f'[uplink]\nserver = "tcp://127.0.0.1:{server_port}"\ninsecure = true\n'
                     'heartbeat = "500ms"\nreconnect_delay = "200ms"\nreconnect_delay_max = "1s"\n')
    lines.append(f'[[transports]]\nname = "plc"\nkind = "modbus-tcp"\nhost = "127.0.0.1"\nport = {port}\n')
    for unit, n in ((1, 50), (2, 49)):
        lines.append(f'[[devices]]\nname = "u{unit}"\ntransport = "plc"\nunit_id = {unit}\npoll = "100ms"\n')
        for a in range(n):
            lines.append(f'  [[devices.tags]]\n  name = "r{a}"\n  register = "input"\n  address = {a}\n'
                         '  type = "uint16"\n')
        if unit == 1:
            lines.append('  [[devices.tags]]\n  name = "fault"\n  register = "discrete"\n  address = 0\n'
                         '  type = "bool"\n')
    feats = ",\n".join(f'  {{ name = "f{i}", tag = "u{1 + i % 2}.r{i}", agg = "{("mean", "max", "std", "slope")[i % 4]}" }}'
                       for i in range(N_FEATURES))
    lines.append(f'[samples]\ngrid = "100ms"\nwindow = "5s"\nhop = "1s"\nmin_coverage = 0.5\nmax_gap = "1s"\n'
                 f'features = [\n{feats}\n]\n[samples.label]\nname = "fault_soon"\ntag = "u1.fault"\n'
                 'horizon = "2s"\n[store]\nmax_rows = 150000\n[metrics]\naddress = ""\n')
    path = tmp / "agent.toml"
    path.write_text("\n".join(lines))
    return path


def prefill(tmp: Path, n_rows: int) -> None:
    from fedgate.agent.store import Store

    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(N_FEATURES)]
    with Store(tmp / "data" / "agent.db", max_rows=150_000) as st:
        t0 = time.time() - n_rows
        for start in range(0, n_rows, 10_000):
            x = rng.normal(size=(10_000, N_FEATURES))
            y = (x[:, 0] + rng.normal(size=10_000) > 1).astype(float)
            st.add_samples([(t0 + start + i, x[i], y[i]) for i in range(10_000)], names)


class Agent:
    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp, self.config = tmp, config
        self.sock_path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start; return seconds from exec to READY=1."""
        env = dict(os.environ, **unit_environment(), NOTIFY_SOCKET=str(self.sock_path))
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([str(BIN / "fedgate-agent"), "run", "--config", str(self.config)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.tmp / "agent.log", "ab"))
        self.sock.settimeout(30)
        while True:
            msg = self.sock.recv(4096).decode()
            if "READY=1" in msg:
                return time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.sock.close()


def baseline_import() -> tuple[float, int]:
    """(exec -> exit seconds, peak RSS KiB) of the bare import."""
    # VmHWM, not ru_maxrss: the latter keeps the peak of the forked parent across exec
    code = BASELINE_IMPORT + "; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, int(out.stdout.strip())


def baseline_polling_cpu(port: int, seconds: float) -> float:
    """CPU share of a bare pymodbus loop making the agent's requests (2 x input, 1 x discrete) at 10 Hz."""
    code = f"""
import asyncio, time, resource
from pymodbus.client import AsyncModbusTcpClient
async def main():
    c = AsyncModbusTcpClient("127.0.0.1", port={port})
    await c.connect()
    await asyncio.sleep(1.0)
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.monotonic()
    nxt = time.monotonic()
    while time.monotonic() - t0 < {seconds}:
        await c.read_input_registers(0, count=50, device_id=1)
        await c.read_discrete_inputs(0, count=1, device_id=1)
        await c.read_input_registers(0, count=49, device_id=2)
        nxt += 0.1
        await asyncio.sleep(max(0.0, nxt - time.monotonic()))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (time.monotonic() - t0))
    c.close()
asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cpu_share(pid: int, seconds: float) -> float:
    p = psutil.Process(pid)
    c0, t0 = p.cpu_times(), time.monotonic()
    time.sleep(seconds)
    c1 = p.cpu_times()
    return (c1.user + c1.system - c0.user - c0.system) / (time.monotonic() - t0)


def rounds_done(server_dir: Path) -> int:
    path = server_dir / "history.db"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT COUNT(*) FROM rounds WHERE kind = 'train' AND finished IS NOT NULL")
                       .fetchone()[0] or 0)
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def server_toml(tmp: Path, port: int) -> Path:
    names = ", ".join(f'"f{i}"' for i in range(N_FEATURES))
    path = tmp / "server.toml"
    path.write_text(f"""[server]
bind = "tcp://127.0.0.1:{port}"
data_dir = "{tmp / 'server'}"
insecure = true
metrics = ""
heartbeat = "500ms"
log_level = "warning"
[federation]
name = "bench"
features = [{names}]
label = "fault_soon"
rounds = 1
min_agents = 1
round_timeout = "120s"
local_epochs = 1
batch_size = 32
lr = 0.05
evaluate = false
statistics = true
[federation.model]
kind = "logistic"
n_features = {N_FEATURES}
[strategy]
name = "fedavg"
max_update_norm = 1e6
""")
    return path


def precompile() -> None:
    """Byte-compile what the agent imports at the unit's optimisation level (the install step).

    The unit runs with ``PYTHONDONTWRITEBYTECODE=1``; without the ``.opt-2.pyc`` files
    every start would compile from source.
    """
    level = unit_environment().get("PYTHONOPTIMIZE")
    if not level:
        return
    import importlib.util

    dirs = []
    for name in ("numpy", "zmq", "pymodbus", "serial", "fedgate.agent", "fedgate.core", "fedgate.drivers"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(spec.submodule_search_locations)
    subprocess.run([sys.executable, "-" + "O" * int(level), "-m", "compileall", "-q", "-j", "0", *dirs],
                   check=True, stdout=subprocess.DEVNULL)


def run_once(tmp: Path, *, n_rows: int, poll_s: float, ready_repeats: int) -> dict[str, float]:
    sim, port = start_sim(tmp)
    agent = None
    server = None
    try:
        server_port = _free_port()
        cfg = agent_toml(tmp, port, server_port)
        prefill(tmp, n_rows)
        agent = Agent(tmp, cfg)
        ready, base_ready, base_rss = [], [], []
        for i in range(ready_repeats + 1):  # interleaved with the baseline, so both see the same load
            b_s, b_kib = baseline_import()
            base_ready.append(b_s)
            base_rss.append(b_kib)
            ready.append(agent.start())
            if i < ready_repeats:
                agent.stop()
        assert agent.proc is not None
        time.sleep(3.0)  # devices connected, windows flowing
        cpu = cpu_share(agent.proc.pid, poll_s)
        rss_polling = psutil.Process(agent.proc.pid).memory_info().rss // 1024
        t0 = time.perf_counter()
        server = subprocess.Popen([str(BIN / "fedgate-server"), "run", "--config", str(server_toml(tmp, server_port))],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "ab"))
        _wait(lambda: rounds_done(tmp / "server") >= 1, 180, "the training round")
        round_s = time.perf_counter() - t0
        hwm = _vm_hwm_kib(agent.proc.pid)
        base_cpu = baseline_polling_cpu(port, poll_s)
        return {"ready_s": statistics.median(ready), "cpu_share": cpu, "rss_polling_kib": rss_polling,
                "peak_rss_kib": hwm, "round_s": round_s, "baseline_cpu_share": base_cpu,
                "baseline_ready_s": statistics.median(base_ready), "baseline_rss_kib": statistics.median(base_rss)}
    finally:
        if agent is not None:
            agent.close()
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one short repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=100_000, help="samples in the store at start")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    poll_s = 5.0 if args.quick else 15.0
    precompile()
    runs = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory(prefix="fedgate-bench-agent-") as d:
            runs.append(run_once(Path(d), n_rows=args.rows, poll_s=poll_s, ready_repeats=2 if args.quick else 4))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    b_ready = med["baseline_ready_s"]
    b_rss = med["baseline_rss_kib"]
    rows = [
        ("exec -> READY (s)", med["ready_s"], b_ready, "exec -> exit of the bare import", "<= 0.5"),
        ("polling CPU (share of a core)", med["cpu_share"], med["baseline_cpu_share"],
         "bare pymodbus loop, same requests", "< 0.05"),
        ("peak RSS with a train round (MiB)", med["peak_rss_kib"] / 1024, b_rss / 1024, "peak RSS of the bare import",
         "<= 50"),
        ("RSS while polling (MiB)", med["rss_polling_kib"] / 1024, b_rss / 1024, "peak RSS of the bare import", ""),
    ]
    print(f"agent: 100 tags at 10 Hz, {N_FEATURES} features, {args.rows} stored samples; medians of {repeats} run(s)")
    print(f"{'measure':36} {'agent':>10} {'baseline':>10} {'ratio':>7}  target   baseline")
    for name, ours, theirs, what, target in rows:
        ratio = ours / theirs if theirs else float("inf")
        print(f"{name:36} {ours:10.3f} {theirs:10.3f} {ratio:7.2f}  {target:7}  {what}")
    print("agent environment from deploy/fedgate-agent.service: "
          + " ".join(f"{k}={v}" for k, v in sorted(unit_environment().items())))
    print(f"statistics + train round over {args.rows} samples (server start -> committed): {med['round_s']:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median": med, "baseline_ready_s": b_ready,
                                               "baseline_rss_kib": b_rss}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
