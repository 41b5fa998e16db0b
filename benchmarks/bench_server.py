#!/usr/bin/env python3
"""Server round cost alone: the fedgate daemon vs a bare pyzmq ROUTER loop, same fake agents.

``bench_round.py`` measures whole rounds with N agent processes; on a small machine
their CPU hides the server's. Here N agents are DEALER sockets in this process that
answer every train task at once with a prepared update (f32 or q8, the model's
parameters plus seeded noise), so what is measured is the server: its CPU per round
(all threads, and split into the round loop, libzmq's I/O thread and the rest), the
round period (task to next task, seen by the agents) and its peak RSS.

The baseline, measured in the same run with the same agents, is a bare loop on one
pyzmq ROUTER (``--bare``: this script in a subprocess): it receives each update,
decodes it (q8: dequantised), folds it into a float64 sum, answers, and when every
agent answered sends the new mean to all of them as the next task. No validation, no
history, no checkpoint: the floor a Python server on pyzmq starts from.

Run it alone on the machine (``flock /tmp/fedgate-bench.lock python benchmarks/bench_server.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from fedgate.core import codec

DEFAULT_CONFIGS = "10x10000,100x10000,10x1000000"
QUICK_CONFIGS = "10x10000,10x100000"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mlp_for(d: int) -> tuple[dict[str, Any], int]:
    """A one-hidden-layer MLP spec of ``d`` params where possible: h * (f + 2) + 1, h <= 4096."""
    target = d - 1
    f = next((f for f in range(1, 4096) if target % (f + 2) == 0 and target // (f + 2) <= 4096),
             max(1, target // 4096 - 1))
    h = target // (f + 2)
    return ({"kind": "mlp", "n_features": f, "n_outputs": 1, "hidden": [h], "activation": "relu",
             "loss": "squared"}, h * (f + 2) + 1)


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed ``tid:name``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1: raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def fedgate_server(wd: Path, port: int, n: int, spec: dict[str, Any], codec_name: str,
                   rounds: int) -> subprocess.Popen[bytes]:
    tables = {
        "server": {"bind": f"tcp://127.0.0.1:{port}", "data_dir": str(wd / "server"), "metrics": "",
                   "heartbeat": "5s", "dead_after": "30s", "queue_depth": max(64, 2 * n), "insecure": True,
                   "log_level": "warning"},
        "federation": {"name": "bench", "model": spec, "features": [f"f{i}" for i in range(spec["n_features"])],
                       "label": "y", "rounds": rounds, "min_agents": n, "fraction": 1.0, "round_timeout": "120s",
                       "local_epochs": 1, "batch_size": 32, "lr": 0.01, "codec": codec_name,
                       "download_codec": codec_name, "evaluate": False, "statistics": False, "seed": 0},
        "strategy": {"name": "fedavg", "max_update_norm": 1e9},
    }
    path = wd / "server.toml"
    path.write_text("".join(f"[{t}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items()) + "\n"
                            for t, body in tables.items()))
    return subprocess.Popen([sys.executable, "-m", "fedgate.server.cli", "run", "--config", str(path)],
                            stdout=open(wd / "server.log", "wb"), stderr=subprocess.STDOUT)


def bare_server(port: int, n: int, d: int, codec_name: str) -> None:
    """The baseline: a ROUTER loop with numpy accumulation and nothing else (``--bare``)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(f"tcp://127.0.0.1:{port}")
    params = np.zeros(d, dtype=np.float32)
    payload = codec.encode(params, codec_name)
    peers: list[bytes] = []
    acc = np.zeros(d, dtype=np.float64)
    answered = 0
    rnd = 1
    while True:
        rid, head, *rest = sock.recv_multipart(copy=False)
        msg = json.loads(head.bytes)
        if msg["type"] == "hello":
            peers.append(rid.bytes)
            if len(peers) == n:
                for p in peers:
                    sock.send_multipart([p, json.dumps({"type": "task", "round": rnd}).encode(), payload],
                                        copy=False)
            continue
        if msg["type"] == "stop":
            return
        buf = rest[0].buffer
        vec = codec.decode(buf, check_crc=False) if codec_name != "f32" else \
            np.frombuffer(buf, dtype="<f4", offset=codec.HEADER_SIZE)
        acc += vec
        sock.send_multipart([rid.bytes, b'{"type":"ack"}'])
        answered += 1
        if answered == n:
            params = (acc / n).astype(np.float32)
            payload = codec.encode(params, codec_name)
            acc.fill(0.0)
            answered = 0
            rnd += 1
            for p in peers:
                sock.send_multipart([p, json.dumps({"type": "task", "round": rnd}).encode(), payload], copy=False)


def drive(port: int, n: int, d: int, codec_name: str, rounds: int, min_s: float, pid: int, fedgate: bool,
          spec: dict[str, Any]) -> dict[str, Any]:
    """Connect n fake agents, answer every train task at once; measure from round 2 on, for at
    least ``rounds`` rounds and ``min_s`` seconds (CPU times come in 10 ms ticks)."""
    ctx = zmq.Context()
    ctx.max_sockets = max(ctx.max_sockets, n + 16)  # libzmq's default is 1023 sockets per context
    socks = []
    rng = np.random.default_rng(0)
    try:
        for i in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{port}")
            socks.append(s)
        for i, s in enumerate(socks):
            s.send(json.dumps({"v": 1, "type": "hello", "agent": f"gw{i:03d}", "software": "bench",
                               "features": [f"f{j}" for j in range(spec["n_features"])], "n_samples": 100,
                               "task_models": 1}).encode())
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        index = {s: i for i, s in enumerate(socks)}
        updates: dict[int, bytes] = {}
        starts: dict[int, float] = {}
        cpu: dict[int, dict[str, float]] = {}
        deadline = time.monotonic() + 600

        def enough() -> bool:
            return len(starts) >= rounds and time.perf_counter() - starts[2] >= min_s

        while time.monotonic() < deadline and not enough():
            for s, _ in poller.poll(1000):
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    head = json.loads(frames[0].bytes)
                    if head["type"] != "task" or head.get("kind", "train") != "train":
                        continue
                    rnd = head["round"]
                    if rnd not in starts:
                        starts[rnd] = time.perf_counter()
                        cpu[rnd] = thread_cpu(pid)
                    i = index[s]
                    if i not in updates:
                        glob = codec.decode(frames[1].buffer)
                        updates[i] = codec.encode(glob + rng.normal(0, 0.01, glob.shape).astype(np.float32),
                                                  codec_name, seed=i)
                    if fedgate:
                        reply = {"v": 1, "type": "result", "agent": f"gw{i:03d}", "task_id": head["task_id"],
                                 "round": rnd, "kind": "train", "n_samples": 100, "metrics": {"loss": 0.5}}
                    else:
                        reply = {"type": "result", "round": rnd}
                    s.send_multipart([json.dumps(reply).encode(), updates[i]], copy=False)
        if not enough():
            raise RuntimeError(f"only {len(starts)} of {rounds} rounds")
        first, last = 2, max(starts)
        periods = [1000 * (starts[r + 1] - starts[r]) for r in range(first, last)]
        k = last - first
        before, after = cpu[first], cpu[last]
        per_thread = {name: 1000 * (after[name] - before.get(name, 0.0)) / k for name in after}
        main = max((v for name, v in per_thread.items() if name.split(":", 1)[0] == str(pid)), default=0.0)
        io = sum(v for name, v in per_thread.items() if "ZMQbg/IO" in name)
        total = sum(per_thread.values())
        if not fedgate:
            socks[0].send(json.dumps({"type": "stop"}).encode())
        return {"period_ms": statistics.median(periods), "cpu_ms": total, "loop_ms": main, "io_ms": io,
                "other_ms": total - main - io, "rss_mib": vm_hwm_mib(pid)}
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def run_point(which: str, n: int, d: int, codec_name: str, rounds: int, min_s: float,
              workdir: Path) -> dict[str, Any]:
    spec, d_exact = mlp_for(d)
    port = free_port()
    wd = workdir / f"{which}_n{n}_d{d}_{codec_name}"
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir(parents=True)
    if which == "fedgate":
        proc = fedgate_server(wd, port, n, spec, codec_name, 1_000_000)
    else:
        proc = subprocess.Popen([sys.executable, __file__, "--bare", f"{port},{n},{d_exact},{codec_name}"])
    try:
        time.sleep(0.2)
        return drive(port, n, d_exact, codec_name, rounds, min_s, proc.pid, which == "fedgate", spec)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma list of NxD (default {DEFAULT_CONFIGS})")
    ap.add_argument("--codecs", default="f32,q8")
    ap.add_argument("--rounds", type=int, default=31, help="rounds per run at least; the first two are not measured")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="measured seconds per run at least")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point and server (medians reported)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_CONFIGS}, f32, 12 rounds or 0.5 s, 1 repeat")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--workdir", help="keep server files here (default: a temporary directory)")
    ap.add_argument("--bare", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare:
        port, n, d, codec_name = args.bare.split(",")
        bare_server(int(port), int(n), int(d), codec_name)
        return 0
    if args.quick:
        args.configs, args.codecs, args.rounds, args.repeats, args.min_seconds = QUICK_CONFIGS, "f32", 12, 1, 0.5
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-server-"))
    rows = []
    for point in args.configs.split(","):
        n, d = (int(float(x)) for x in point.lower().split("x"))
        for codec_name in args.codecs.split(","):
            runs: dict[str, list[dict[str, Any]]] = {"fedgate": [], "bare": []}
            for _ in range(args.repeats):
                for which in ("bare", "fedgate"):
                    runs[which].append(run_point(which, n, d, codec_name, args.rounds, args.min_seconds,
                                                 workdir))
            med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
            rows.append({"n": n, "d": d, "codec": codec_name, "runs": runs, "median": med})
            print(json.dumps({"n": n, "d": d, "codec": codec_name, "median": med}), flush=True)
    print("\n| N | D | codec | server | round period ms | CPU ms/round: total (loop, libzmq I/O, other) "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for which in ("fedgate", "bare"):
            m = r["median"][which]
            print(f"| {r['n']} | {r['d']:,} | {r['codec']} | {which} | {m['period_ms']:.1f} | {m['cpu_ms']:.1f} "
                  f"({m['loop_ms']:.1f}, {m['io_ms']:.1f}, {m['other_ms']:.1f}) | {m['rss_mib']:.0f} |")
        f, b = r["median"]["fedgate"], r["median"]["bare"]
        print(f"| | | | fedgate/bare | {_ratio(f['period_ms'], b['period_ms'])} | {_ratio(f['cpu_ms'], b['cpu_ms'])} | |")
    print(f"\nmedians of {args.repeats} runs, each >= {args.rounds - 2} measured rounds and >= {args.min_seconds:g} s; "
          "CPU from /proc (10 ms ticks)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
