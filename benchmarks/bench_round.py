#!/usr/bin/env python3
"""Federated round overhead: fedgate server + N agent processes on loopback, vs Flower.

Every agent is a separate process running the real uplink; its train task returns the
global parameters plus a fixed seeded noise vector (trivial local work, as in the
Flower harness), so a round's time is the framework's: task fan-out, codec, transport,
validation, aggregation, checkpoint and commit. The model is a one-hidden-layer MLP
sized to exactly D float32 parameters; statistics and evaluate rounds are off. The
global model goes down with the same codec as the updates go up (f32 or q8).

Measured per configuration (N agents x D params, codec, CURVE on/off): the median
train-round wall time from the server's history (task sent -> round aggregated), the
median round period (start to start, includes checkpoint and commit), the server's
peak RSS and the largest agent peak RSS. Round 1 is a warm-up (it also waits for every
agent to connect) and is not counted.

``--floor`` also runs, on each point, the least any Python + ZeroMQ design can do: a bare
pyzmq ROUTER and N bare DEALER processes exchanging payloads of the same sizes (the
agent adds a vector, the server sums the replies), with no protocol, no checks, no
history, no checkpoint and no outbox; ``fedgate/floor`` says how far above that we are.

``--vs-flower PYTHON`` runs ``shared/anchors/flower/bench_flower.py`` with that
interpreter (a venv with flwr 1.41.0) on the same (N, D) points in the same run and
prints Flower/fedgate ratios (insecure vs insecure; Flower's harness has no TLS).

Run it alone on the machine (``flock /tmp/fedgate-bench.lock python benchmarks/bench_round.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fedtools  # noqa: E402  (the agent process rig, shared with the integration tests)

DEFAULT_CONFIGS = "10x10000,10x1000000,50x10000,20x100000,100x10000"
QUICK_CONFIGS = "10x10000,20x100000"
FLOWER_DIR = REPO.parent / "shared" / "anchors" / "flower"
if not FLOWER_DIR.exists():
    FLOWER_DIR = Path("/work/shared/anchors/flower")


def mlp_for(d: int) -> tuple[dict[str, Any], int]:
    """A 1-hidden-layer MLP spec with exactly ``d`` params when possible: h * (f + 2) + 1 = d."""
    target = d - 1
    best = None
    for f in range(1, 4096):
        if target % (f + 2) == 0 and target // (f + 2) <= 4096:
            best = (f, target // (f + 2))
            break
    if best is None:  # nearest below
        f = max(1, target // 4096 - 1)
        best = (f, target // (f + 2))
    f, h = best
    spec = {"kind": "mlp", "n_features": f, "n_outputs": 1, "hidden": [h], "activation": "relu", "loss": "squared"}
    return spec, h * (f + 2) + 1


def proc_kb(pid: int, field: str = "VmHWM") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
        fields = raw[raw.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def train_rounds(history: Path) -> list[tuple[int, float, float]]:
    if not history.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{history}?mode=ro", uri=True, timeout=5)
        try:
            rows = db.execute("SELECT round, started, finished FROM rounds WHERE kind = 'train' "
                              "AND finished IS NOT NULL ORDER BY round").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    return [(int(r), float(s), float(f)) for r, s, f in rows]


def run_point(n: int, d: int, codec: str, curve: bool, rounds: int, workdir: Path, timeout_s: float,
              state_dir: Path | None = None, profile: bool = False,
              profile_server: bool = False) -> dict[str, Any]:
    tag = f"n{n}_d{d}_{codec}_{'curve' if curve else 'plain'}"
    wd = workdir / tag
    wd.mkdir(parents=True, exist_ok=True)
    sd = wd if state_dir is None else state_dir / tag
    sd.mkdir(parents=True, exist_ok=True)
    spec, d_exact = mlp_for(d)
    names = [f"gw{i:03d}" for i in range(n)]
    keys = fedtools.make_keys(wd, "server", names) if curve else None
    port = fedtools.free_port()
    server_cfg: dict[str, Any] = {
        "bind": f"tcp://127.0.0.1:{port}", "data_dir": str(wd / "server"), "metrics": "",
        "heartbeat": "5s", "dead_after": "15s", "queue_depth": max(64, 2 * n),
    }
    if curve:
        server_cfg.update(secret_key=str(keys["server_secret"]), agents_dir=str(keys["agents_dir"]))
    else:
        server_cfg["insecure"] = True
    fed = {"name": "bench", "model": spec, "features": [f"f{i}" for i in range(spec["n_features"])],
           "label": "y", "rounds": rounds, "min_agents": n, "fraction": 1.0, "round_timeout": "120s",
           "local_epochs": 1, "batch_size": 32, "lr": 0.01, "codec": codec,
           "download_codec": codec if codec in ("f32", "f16", "q8") else "f32", "evaluate": False,
           "statistics": False, "seed": 0}
    cfg = fedtools.write_toml(wd / "server.toml", {"server": server_cfg, "federation": fed,
                                                   "strategy": {"name": "fedavg", "max_update_norm": 1e9}})
    result: dict[str, Any] = {"n": n, "d": d, "d_exact": d_exact, "codec": codec, "curve": curve, "status": "ok"}
    server_cmd = fedtools.server_command(cfg)
    if profile_server:  # the same daemon under cProfile (written when it exits on SIGTERM)
        server_cmd = [sys.executable, "-m", "cProfile", "-o", str(wd / "server.prof"), "-m", "fedgate.server.cli",
                      *server_cmd[-3:]]
    server = fedtools.spawn(server_cmd, wd / "server.log")
    agents = []
    t0 = time.perf_counter()
    try:
        for i, name in enumerate(names):
            agents.append(fedtools.spawn(
                fedtools.agent_command(name, server=f"tcp://127.0.0.1:{port}", db=sd / f"{name}.db", keys=keys,
                                       seed=i, mode="bench", n_features=spec["n_features"],
                                       report=wd / f"{name}.json", heartbeat="5s", dead_after="15s",
                                       log_level="warning",
                                       profile=wd / f"{name}.prof" if profile and i == 0 else None),
                wd / f"{name}.log"))
        history = wd / "server" / "history.db"
        done: list[tuple[int, float, float]] = []
        cpu_warm: tuple[int, float | None, list[float | None]] | None = None  # after the warm-up round
        while time.perf_counter() - t0 < timeout_s:
            if server.poll() is not None:
                break
            done = train_rounds(history)
            if cpu_warm is None and done:
                cpu_warm = (len(done), proc_cpu_s(server.pid), [proc_cpu_s(a.pid) for a in agents])
            if len(done) >= rounds:
                break
            time.sleep(0.05)
        result["server_vm_hwm_kb"] = proc_kb(server.pid)
        cpu_end = (proc_cpu_s(server.pid), [proc_cpu_s(a.pid) for a in agents])
        done = train_rounds(history)
        if cpu_warm is not None and len(done) > cpu_warm[0]:
            # CPU per round after the warm-up (start-up and connecting excluded); the sample
            # lags a round end by up to 50 ms, so this is a mean over the later rounds
            k = len(done) - cpu_warm[0]
            if cpu_warm[1] is not None and cpu_end[0] is not None:
                result["server_cpu_ms_per_round"] = 1000 * (cpu_end[0] - cpu_warm[1]) / k
            per = [1000 * (b - a) / k for a, b in zip(cpu_warm[2], cpu_end[1]) if a is not None and b is not None]
            result["agent_cpu_ms_per_round_median"] = statistics.median(per) if per else None
            result["agent_cpu_ms_per_round_total"] = sum(per) if per else None
        done = train_rounds(history)
        if len(done) < rounds:
            result["status"] = f"only {len(done)}/{rounds} rounds (server rc {server.poll()})"
    finally:
        fedtools.stop(server)
        for a in agents:
            if a.poll() is None:
                a.terminate()
        for a in agents:
            fedtools.stop(a)
    result["wall_s"] = time.perf_counter() - t0
    measured = done[1:]
    walls = [f - s for _, s, f in measured]
    periods = [b[1] - a[1] for a, b in zip(done[1:], done[2:])]
    result["rounds_measured"] = len(measured)
    result["round_s_median"] = statistics.median(walls) if walls else None
    result["round_s_min"] = min(walls) if walls else None
    result["round_s_max"] = max(walls) if walls else None
    result["period_s_median"] = statistics.median(periods) if periods else None
    reports = []
    for name in names:
        p = wd / f"{name}.json"
        if p.exists():
            reports.append(json.loads(p.read_text()))
    rss = [r["vm_hwm_kb"] for r in reports if r.get("vm_hwm_kb")]
    result["agents_reported"] = len(reports)
    result["agent_vm_hwm_kb_max"] = max(rss) if rss else None
    result["agent_vm_hwm_kb_median"] = statistics.median(rss) if rss else None
    return result


def payload_bytes(d: int, codec: str) -> int:
    """Bytes of one encoded vector of ``d`` values (codec header included)."""
    if codec == "q8":
        return 24 + d + 4 * -(-d // 256)
    return 24 + 4 * d


def floor_agent(port: int, nbytes: int) -> None:
    """A bare DEALER: each message in gets a same-sized vector out (numpy add, no checks)."""
    import numpy as np
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"hi")
    noise = np.ones(nbytes // 4, dtype=np.float32)
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 1:
            break
        vec = np.frombuffer(frames[1].buffer, dtype=np.float32, count=nbytes // 4) + noise
        sock.send_multipart([b"r", vec], copy=False)
    sock.close(0)
    ctx.term()


def run_floor(n: int, d: int, codec: str, rounds: int) -> float | None:
    """Median round (ms) of the bare pyzmq exchange on this point (see the module docstring)."""
    import numpy as np
    import zmq

    nbytes = payload_bytes(d, codec)
    nbytes -= nbytes % 4
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    procs = [subprocess.Popen([sys.executable, __file__, "floor-agent", str(port), str(nbytes)])
             for _ in range(n)]
    try:
        ids = [router.recv_multipart()[0] for _ in range(n)]
        model = np.zeros(nbytes // 4, dtype=np.float32)
        walls = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            acc = np.zeros(model.size, dtype=np.float64)
            for rid in ids:
                router.send_multipart([rid, b"t", model], copy=False)
            for _ in range(n):
                frames = router.recv_multipart(copy=False)
                acc += np.frombuffer(frames[2].buffer, dtype=np.float32)
            model = (acc / n).astype(np.float32)
            walls.append(time.perf_counter() - t0)
        for rid in ids:
            router.send_multipart([rid, b"bye"])
        for p in procs:
            p.wait(30)
        return statistics.median(walls[1:]) if len(walls) > 1 else None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        router.close(0)
        ctx.term()


def run_flower(python: str, configs: str, rounds: int, out: Path) -> dict[tuple[int, int], dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(FLOWER_DIR / "bench_flower.py"), "suite", "--configs", configs, "--rounds", str(rounds),
           "--out-dir", str(out), "--workdir", str(out / "runs"), "--suite-budget", "3000"]
    print("flower:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, FLWR_TELEMETRY_ENABLED="0"),
                   stdout=subprocess.DEVNULL)
    res = json.loads((out / "results.json").read_text())
    return {(c["n"], c["d"]): c for c in res["configs"]}


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def floor_ratio(r: dict[str, Any]) -> str:
    fl, got = r.get("floor_s"), r.get("round_s_median")
    return "-" if not fl or not got else f"{got / fl:.1f}x"


def _agent_cpu(r: dict[str, Any]) -> str:
    """Mean agent CPU per round: the agents' total over N (a /proc tick is 10 ms, so one
    agent's own figure over 20 rounds moves in 0.5 ms steps; the total does not)."""
    total = r.get("agent_cpu_ms_per_round_total")
    return "-" if total is None else f"{total / r['n']:.2f}"


def render(results: list[dict[str, Any]], flower: dict[tuple[int, int], dict[str, Any]]) -> str:
    head = ("| N | D | codec | CURVE | fedgate round ms (median) | min-max | period ms | server RSS MiB | "
            "agent RSS MiB (max) | CPU ms/round: agent (mean), server | Flower round ms | "
            "Flower server RSS MiB | Flower/fedgate | bare pyzmq floor ms | fedgate/floor | status |")
    rows = [head, "|" + "---|" * 16]
    for r in results:
        f = flower.get((r["n"], r["d"]), {})
        fl = f.get("round_wall_s_median")
        ratio = "-" if not fl or not r.get("round_s_median") else f"{fl / r['round_s_median']:.1f}x"
        rng = "-" if r.get("round_s_min") is None else f"{ms(r['round_s_min'])}-{ms(r['round_s_max'])}"
        rows.append(f"| {r['n']} | {r['d']:,} | {r['codec']} | {'on' if r['curve'] else 'off'} | "
                    f"{ms(r.get('round_s_median'))} | {rng} | {ms(r.get('period_s_median'))} | "
                    f"{mib(r.get('server_vm_hwm_kb'))} | {mib(r.get('agent_vm_hwm_kb_max'))} | "
                    f"{_agent_cpu(r)}, {_num(r.get('server_cpu_ms_per_round'))} | "
                    f"{ms(fl)} | "
                    f"{mib(f.get('server_vm_hwm_kb'))} | {ratio} | {ms(r.get('floor_s'))} | {floor_ratio(r)} | "
                    f"{r['status']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help=f"comma list of NxD (default {DEFAULT_CONFIGS})")
    ap.add_argument("--codecs", default="f32,q8")
    ap.add_argument("--curve", default="off,on", help="off, on or off,on")
    ap.add_argument("--rounds", type=int, default=11, help="train rounds per point; the first is warm-up")
    ap.add_argument("--timeout", type=float, default=300.0, help="per point, seconds")
    ap.add_argument("--vs-flower", metavar="PYTHON", help="interpreter with flwr installed")
    ap.add_argument("--floor", action="store_true",
                    help="also run the bare pyzmq exchange on each point (the least a Python + ZeroMQ design costs)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_CONFIGS}, 5 rounds, insecure only")
    ap.add_argument("--json", metavar="PATH", help="write all results here")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--agent-state-dir", default=None,
                    help="where the agents' state files (outbox) go; default the work dir (disk). On one host "
                         "all agents fsync to the same disk, which real gateways do not")
    ap.add_argument("--profile-agent", action="store_true",
                    help="run the first agent of each point under cProfile (WORKDIR/POINT/gw000.prof)")
    ap.add_argument("--profile-server", action="store_true",
                    help="run the server under cProfile (WORKDIR/POINT/server.prof)")
    args = ap.parse_args(argv)
    configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    rounds = 5 if args.quick and args.rounds == 11 else args.rounds
    curves = ["off"] if args.quick and args.curve == "off,on" else args.curve.split(",")
    points = [tuple(int(x) for x in c.lower().split("x")) for c in configs.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_round_"))
    results = []
    for n, d in points:
        for codec in args.codecs.split(","):
            for curve in curves:
                print(f"fedgate N={n} D={d} codec={codec} curve={curve} ...", flush=True)
                r = run_point(n, d, codec, curve == "on", rounds, workdir, args.timeout,
                              Path(args.agent_state_dir) if args.agent_state_dir else None, args.profile_agent,
                              args.profile_server)
                r["agent_state"] = args.agent_state_dir or "disk"
                if args.floor and not r["curve"]:
                    r["floor_s"] = run_floor(n, d, codec, rounds)
                print(json.dumps(r), flush=True)
                results.append(r)
    flower: dict[tuple[int, int], dict[str, Any]] = {}
    if args.vs_flower:
        flower = run_flower(args.vs_flower, configs, rounds, workdir / "flower")
    table = render(results, flower)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"fedgate": results,
                                               "flower": [dict(v) for v in flower.values()],
                                               "rounds": rounds, "configs": configs}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "floor-agent":
        floor_agent(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
