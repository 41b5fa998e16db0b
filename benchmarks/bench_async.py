#!/usr/bin/env python3
"""Async vs sync rounds with one slow site: time to a good model.

Four agents (real ``tests/fedtools.py`` processes, ``synth`` mode: a seeded linear
regression per site) and a real ``fedgate-server run`` on loopback. Three sites train
in ``--fast`` seconds, one in ``--slow`` seconds. The baseline, measured in the same
run, is the synchronous federation (every round waits for all four); the contender is
``mode = "async"`` with ``buffer_size = 3``, where the slow site's results come in stale
and weighted down.

Reported per mode (median over ``--repeats`` runs): seconds from the start of train
round 1 until a round's mean training loss first falls to ``--target`` (read from the
server's history), the rounds and results that took, the L2 distance of the final
model from the pooled least-squares optimum, and the async/sync ratio of the time.

Run it alone: ``flock /tmp/fedgate-bench.lock .venv/bin/python benchmarks/bench_async.py``.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fedtools  # noqa: E402  (the agent process rig, shared with the integration tests)

N_FEATURES = 4
N_SAMPLES = 150
NAMES = ["fast-1", "fast-2", "fast-3", "slow-4"]


def _ols(seed_base: int) -> np.ndarray:
    parts = [fedtools.agent_data(seed_base + i, N_SAMPLES, N_FEATURES) for i in range(len(NAMES))]
    X = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    Xs = (X - X.mean(axis=0)) / X.std(axis=0)
    coef, *_ = np.linalg.lstsq(np.hstack([Xs, np.ones((len(Xs), 1))]), y, rcond=None)
    return coef


def _query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return []


def run_once(mode: str, rounds: int, fast_s: float, slow_s: float, target: float, wd: Path,
             timeout_s: float) -> dict[str, Any]:
    wd.mkdir(parents=True)
    port = fedtools.free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    data = wd / "server"
    fed: dict[str, Any] = {
        "name": "bench", "model": {"kind": "linear", "n_features": N_FEATURES},
        "features": [f"f{i}" for i in range(N_FEATURES)], "label": "y", "rounds": rounds,
        "min_agents": len(NAMES), "min_available": len(NAMES), "round_timeout": "120s", "local_epochs": 1,
        "batch_size": 16, "lr": 0.05, "codec": "f32", "evaluate": False, "statistics": True, "seed": 3}
    if mode == "async":
        fed.update(mode="async", min_agents=2, buffer_size=3, max_staleness=64)
    config = fedtools.write_toml(wd / "server.toml", {
        "server": {"bind": endpoint, "data_dir": str(data), "metrics": "", "insecure": True,
                   "heartbeat": "1s", "dead_after": "10s"},
        "federation": fed, "strategy": {"name": "fedavg"}})
    procs = [fedtools.spawn(fedtools.server_command(config), wd / "server.log")]
    try:
        for i, name in enumerate(NAMES):
            delay = slow_s if name.startswith("slow") else fast_s
            procs.append(fedtools.spawn(fedtools.agent_command(
                name, server=endpoint, db=wd / f"{name}.db", keys=None, seed=11 + i, n_samples=N_SAMPLES,
                n_features=N_FEATURES, heartbeat="1s", dead_after="10s", log_level="warning",
                train_delay_s=delay), wd / f"{name}.log"))
        db = data / "history.db"
        deadline = time.monotonic() + timeout_s
        while True:
            done = _query(db, "SELECT COUNT(*) FROM rounds WHERE kind = 'train'")
            if done and done[0][0] >= rounds:
                break
            if procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: the federation did not finish; see {wd / 'server.log'}")
            time.sleep(0.05)
        rows = _query(db, "SELECT round, started, finished, n_accepted, metrics FROM rounds "
                          "WHERE kind = 'train' ORDER BY round")
        from fedgate.server.store import CheckpointStore

        ckpt, _ = CheckpointStore(data / "checkpoints").load_latest()
        assert ckpt is not None
        final = ckpt.arrays["params"].astype(np.float64)
    finally:
        for p in reversed(procs):
            fedtools.stop(p)
    t0 = rows[0][1]
    hit = next((r for r in rows if json.loads(r[4]).get("loss", np.inf) <= target), None)
    results = 0
    for r in rows:
        results += r[3]
        if hit is not None and r[0] == hit[0]:
            break
    return {"mode": mode, "rounds": len(rows), "time_to_target_s": None if hit is None else hit[2] - t0,
            "rounds_to_target": None if hit is None else hit[0], "results_to_target": results if hit else None,
            "total_s": rows[-1][2] - t0, "final_error": float(np.linalg.norm(final - _ols(11)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast", type=float, default=0.05, help="train seconds of the three fast sites")
    ap.add_argument("--slow", type=float, default=1.0, help="train seconds of the slow site")
    ap.add_argument("--target", type=float, default=0.01, help="mean training loss to reach")
    ap.add_argument("--sync-rounds", type=int, default=20)
    ap.add_argument("--async-rounds", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="one repeat, fewer rounds")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.sync_rounds, args.async_rounds, args.slow = 1, 12, 50, 0.5
    runs: dict[str, list[dict[str, Any]]] = {"sync": [], "async": []}
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-async-") as tmp:
        for rep in range(args.repeats):
            for mode, rounds in (("sync", args.sync_rounds), ("async", args.async_rounds)):
                runs[mode].append(run_once(mode, rounds, args.fast, args.slow, args.target,
                                           Path(tmp) / f"{mode}-{rep}", args.timeout))

    def med(mode: str, key: str) -> float | None:
        vals = [r[key] for r in runs[mode] if r[key] is not None]
        return statistics.median(vals) if len(vals) == len(runs[mode]) else None

    summary = {mode: {k: med(mode, k) for k in ("time_to_target_s", "rounds_to_target", "results_to_target",
                                                  "total_s", "final_error")} for mode in runs}
    s, a = summary["sync"]["time_to_target_s"], summary["async"]["time_to_target_s"]
    ratio = None if not s or a is None else a / s
    print(f"4 sites: 3 train in {args.fast:g} s, 1 in {args.slow:g} s; target mean train loss {args.target:g}; "
          f"medians of {args.repeats} run(s)")
    print(f"{'mode':<6} {'time to target':>15} {'rounds':>7} {'results':>8} {'final |w - w*|':>15}")
    for mode in ("sync", "async"):
        m = summary[mode]
        t = "never" if m["time_to_target_s"] is None else f"{m['time_to_target_s']:.2f} s"
        print(f"{mode:<6} {t:>15} {m['rounds_to_target'] or '-':>7} {m['results_to_target'] or '-':>8} "
              f"{m['final_error']:>15.4f}")
    print("async/sync time to target: " + ("n/a" if ratio is None else f"{ratio:.3f}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary,
                                               "ratio_time_to_target": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
