#!/usr/bin/env python3
"""What a relay tier costs a round: N gateways behind R relays vs the same N flat at headquarters.

Every gateway is a real agent process in ``bench`` mode (its train task returns the
global parameters plus fixed noise), headquarters and each relay are real
``fedgate-server run`` processes on loopback; statistics and evaluate rounds are off.
The baseline, measured in the same run, is the flat federation: the same N gateways
connected straight to headquarters. A tier round is two rounds in series (headquarters
-> relays, each relay -> its gateways -> back up), so it cannot be faster than flat on
one machine; the point is how much the extra hop adds.

Reported per point (N gateways x D params, R relays): the median train-round wall time
at headquarters (task sent -> round aggregated) and the median round period (start to
start, includes checkpoint and commit), each the median over ``--repeats`` runs of the
per-run medians (round 1, the warm-up, is not counted), and tier/flat ratios.

Run it alone: ``flock /tmp/fedgate-bench.lock .venv/bin/python benchmarks/bench_relay.py``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import fedtools  # noqa: E402  (the agent process rig, shared with the integration tests)
from bench_round import mlp_for, train_rounds  # noqa: E402

DEFAULT_POINTS = "8x10000x2,8x100000x2,16x10000x4"
QUICK_POINTS = "4x10000x2"


def _server_table(port: int, data: Path, n: int) -> dict[str, Any]:
    return {"bind": f"tcp://127.0.0.1:{port}", "data_dir": str(data), "metrics": "", "insecure": True,
            "heartbeat": "5s", "dead_after": "15s", "queue_depth": max(64, 2 * n)}


def _federation(spec: dict[str, Any], min_agents: int, rounds: int | None, codec: str) -> dict[str, Any]:
    fed: dict[str, Any] = {"name": "bench", "model": spec, "features": [f"f{i}" for i in range(spec["n_features"])],
                           "label": "y", "min_agents": min_agents, "fraction": 1.0, "round_timeout": "120s",
                           "local_epochs": 1, "batch_size": 32, "lr": 0.01, "codec": codec,
                           "download_codec": "f32", "seed": 0}
    if rounds is not None:
        fed.update(rounds=rounds, evaluate=False, statistics=False)
    return fed


def run_once(n: int, d: int, relays: int, rounds: int, codec: str, wd: Path, timeout_s: float) -> dict[str, Any]:
    """One federation (``relays`` = 0: flat); the medians of its rounds after the first."""
    wd.mkdir(parents=True)
    spec, _ = mlp_for(d)
    gateways = [f"gw{i:03d}" for i in range(n)]
    hq_port = fedtools.free_port()
    direct = len(gateways) if relays == 0 else relays
    hq_cfg = fedtools.write_toml(wd / "hq.toml", {
        "server": _server_table(hq_port, wd / "hq", n), "federation": _federation(spec, direct, rounds, codec),
        "strategy": {"name": "fedavg", "max_update_norm": 1e9}})
    procs = [fedtools.spawn(fedtools.server_command(hq_cfg), wd / "hq.log")]
    endpoints = [f"tcp://127.0.0.1:{hq_port}"] * n
    for r in range(relays):
        port = fedtools.free_port()
        mine = gateways[r::relays]
        cfg = fedtools.write_toml(wd / f"relay{r}.toml", {
            "server": _server_table(port, wd / f"relay{r}", len(mine)),
            "federation": _federation(spec, len(mine), None, codec),
            "strategy": {"name": "fedavg", "max_update_norm": 1e9},
            "relay": {"name": f"relay{r}", "server": f"tcp://127.0.0.1:{hq_port}", "insecure": True,
                      "heartbeat": "5s", "reconnect_delay": "100ms", "reconnect_delay_max": "1s"}})
        procs.append(fedtools.spawn(fedtools.server_command(cfg), wd / f"relay{r}.log"))
        for gw in mine:
            endpoints[gateways.index(gw)] = f"tcp://127.0.0.1:{port}"
    for i, gw in enumerate(gateways):
        procs.append(fedtools.spawn(fedtools.agent_command(
            gw, server=endpoints[i], db=wd / f"{gw}.db", keys=None, seed=i, mode="bench",
            n_features=spec["n_features"], heartbeat="5s", dead_after="15s", log_level="warning"),
            wd / f"{gw}.log"))
    t0 = time.perf_counter()
    done: list[tuple[int, float, float]] = []
    try:
        while time.perf_counter() - t0 < timeout_s:
            done = train_rounds(wd / "hq" / "history.db")
            if len(done) >= rounds or procs[0].poll() is not None:
                break
            time.sleep(0.05)
    finally:
        for p in reversed(procs):
            fedtools.stop(p)
    measured = done[1:]
    walls = [f - s for _, s, f in measured]
    periods = [b[1] - a[1] for a, b in zip(measured, measured[1:])]
    return {"rounds": len(done), "round_s": statistics.median(walls) if walls else None,
            "period_s": statistics.median(periods) if periods else None}


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=DEFAULT_POINTS, help="NxDxR,... (gateways x params x relays)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--codec", default="f32", choices=("f32", "f16", "q8"))
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per federation")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_POINTS}, 6 rounds, 2 repeats")
    ap.add_argument("--json", metavar="PATH", help="write all results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.points, args.rounds, args.repeats = QUICK_POINTS, 6, 2
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_relay_") as tmp:
        for point in args.points.split(","):
            n, d, r = (int(float(x)) for x in point.split("x"))
            runs: dict[str, list[dict[str, Any]]] = {"flat": [], "tier": []}
            for rep in range(args.repeats):
                for label, relays in (("flat", 0), ("tier", r)):
                    runs[label].append(run_once(n, d, relays, args.rounds, args.codec,
                                                Path(tmp) / f"{point}_{label}_{rep}", args.timeout))
            row: dict[str, Any] = {"n": n, "d": d, "relays": r, "codec": args.codec, "runs": runs}
            for label in runs:
                row[f"{label}_round_s"] = _median([x["round_s"] for x in runs[label]])
                row[f"{label}_period_s"] = _median([x["period_s"] for x in runs[label]])
            for what in ("round_s", "period_s"):
                flat, tier = row[f"flat_{what}"], row[f"tier_{what}"]
                row[f"ratio_{what}"] = tier / flat if flat and tier else None
            results.append(row)
    print(f"{'gateways x params':>18} {'relays':>6} | {'flat round':>10} {'tier round':>10} {'ratio':>6} | "
          f"{'flat period':>11} {'tier period':>11} {'ratio':>6}")

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.1f} ms"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    for row in results:
        print(f"{row['n']:>7} x {row['d']:>8} {row['relays']:>6} | {ms(row['flat_round_s']):>10} "
              f"{ms(row['tier_round_s']):>10} {x(row['ratio_round_s']):>6} | {ms(row['flat_period_s']):>11} "
              f"{ms(row['tier_period_s']):>11} {x(row['ratio_period_s']):>6}")
    print(f"medians over {args.repeats} runs of the per-run medians of rounds 2..{args.rounds} ({args.codec})")
    if args.json:
        Path(args.json).write_text(json.dumps({"points": results, "rounds": args.rounds, "repeats": args.repeats},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
