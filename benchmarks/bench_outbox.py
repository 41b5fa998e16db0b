"""The agent's durable outbox per round: get (a miss, then a hit), put, drop_through.

A round of one agent as the uplink drives it: a task arrives (``get`` of its id: a
miss), the result is stored (``put``) and, later, its round is committed
(``drop_through``). Payloads are codec buffers (f32) of ``--sizes`` bytes. Two
paces: ``hot`` (rounds back to back) and ``paced`` (``--pace-ms`` between the calls,
as on a real link: the background fsync pass runs between them and caches cool).

Baselines, in the same run:

* ``blob`` -- the plain design: each result a SQLite blob row (WAL,
  ``synchronous=NORMAL``), one autocommit ``INSERT``/``DELETE``/``SELECT`` per call,
  no background fsync at all (so it is *not* power-cut safe: a lower bound for it);
* ``git:REV`` (``--baseline-rev REV``) -- the outbox modules as of a git revision of
  this repository, loaded from ``git show``.

Reported per op: the median wall time of a call; per round: the process CPU time
(background fsync thread included) divided by the rounds, and the fsync passes.
Run it alone: ``flock /tmp/fedgate-bench.lock python benchmarks/bench_outbox.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

import numpy as np

from fedgate.agent.outbox import Outbox, OutboxEntry
from fedgate.core import codec

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIELDS = {"n_samples": 100, "metrics": {"loss": 0.5}, "codec": "f32", "agent": "gw000", "kind": "train"}


class BlobOutbox:
    """The plain design: a blob row per result, one statement per call, no fsync."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS results (task_id TEXT PRIMARY KEY, round INTEGER, "
                        "kind TEXT, fields TEXT, payload BLOB, created_ts REAL)")
        self.fsyncs = 0

    def put(self, e: OutboxEntry) -> None:
        self.db.execute("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?)",
                        (e.task_id, e.round, e.kind, json.dumps(e.fields), e.payload, e.created_ts))

    def get(self, task_id: str) -> OutboxEntry | None:
        row = self.db.execute("SELECT task_id, round, kind, fields, payload, created_ts FROM results "
                              "WHERE task_id = ?", (task_id,)).fetchone()
        if row is None:
            return None
        return OutboxEntry(task_id=row[0], round=row[1], kind=row[2], fields=json.loads(row[3]),
                           payload=row[4], created_ts=row[5])

    def drop_through(self, round_: int) -> int:
        return int(self.db.execute("DELETE FROM results WHERE round <= ?", (round_,)).rowcount)

    def close(self) -> None:
        self.db.close()


def load_git_outbox(rev: str) -> Any:
    """The ``Outbox`` class of ``agent/outbox.py`` (and its ``outbox_*`` siblings) at ``rev``."""
    names = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", rev, "agent/"], check=True,
                           capture_output=True, text=True).stdout.split()
    pkg = f"_outbox_at_{rev.replace('/', '_').replace('~', '_')}"
    sys.modules[pkg] = types.ModuleType(pkg)
    sys.modules[pkg].__path__ = []  # type: ignore[attr-defined]
    mods = sorted(n.split("/")[1][:-3] for n in names if n.startswith("agent/outbox") and n.endswith(".py"))
    sources = {}
    for mod in mods:
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:agent/{mod}.py"], check=True,
                             capture_output=True, text=True).stdout
        for other in mods:
            src = src.replace(f"fedgate.agent.{other}", f"{pkg}.{other}")
        sources[mod] = src
    order = sorted(mods, key=lambda m: m == "outbox")  # the siblings first
    for mod in order:
        spec = importlib.util.spec_from_loader(f"{pkg}.{mod}", loader=None)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[f"{pkg}.{mod}"] = module
        exec(compile(sources[mod], f"{rev}:agent/{mod}.py", "exec"), module.__dict__)
    return sys.modules[f"{pkg}.outbox"].Outbox


def run(factory: Any, nbytes: int, rounds: int, pace_s: float) -> dict[str, float]:
    """One run: ``rounds`` rounds on a fresh state file; medians in microseconds."""
    vec = np.random.default_rng(0).standard_normal(max(1, (nbytes - codec.HEADER_SIZE) // 4)).astype(np.float32)
    payload = codec.encode(vec, "f32")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
        box = factory(os.path.join(tmp, "agent.db"))
        times: dict[str, list[float]] = {"get_miss": [], "put": [], "get": [], "drop": []}
        pc = time.perf_counter
        warm = max(3, rounds // 10)
        cpu0 = 0.0
        for r in range(rounds + warm):
            if r == warm:
                cpu0 = time.process_time()
                for v in times.values():
                    v.clear()
            tid = f"{r:032x}"
            entry = OutboxEntry(task_id=tid, round=r, kind="train", fields=FIELDS, payload=payload)
            t0 = pc()
            box.get(tid)
            t1 = pc()
            box.put(entry)
            t2 = pc()
            box.get(tid)
            t3 = pc()
            if pace_s:
                time.sleep(pace_s)
            t4 = pc()
            box.drop_through(r)
            t5 = pc()
            if pace_s:
                time.sleep(pace_s)
            times["get_miss"].append(t1 - t0)
            times["put"].append(t2 - t1)
            times["get"].append(t3 - t2)
            times["drop"].append(t5 - t4)
        cpu = (time.process_time() - cpu0) / rounds
        passes = getattr(box, "fsyncs", 0)
        box.close()
    out = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    out["cpu_per_round"] = cpu * 1e6
    out["fsync_passes_per_round"] = passes / (rounds + warm)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="40024,4000024", help="payload bytes, comma-separated")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run")
    p.add_argument("--repeats", type=int, default=None, help="runs per figure (median of their medians)")
    p.add_argument("--pace-ms", type=float, default=20.0, help="sleep between calls in the paced runs")
    p.add_argument("--baseline-rev", metavar="REV", help="also measure the outbox modules of this git revision")
    p.add_argument("--quick", action="store_true", help="few rounds and repeats")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args()
    rounds = args.rounds or (40 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = [int(s) for s in args.sizes.split(",")]
    impls: dict[str, Any] = {"blob": BlobOutbox}
    if args.baseline_rev:
        impls[f"git:{args.baseline_rev}"] = load_git_outbox(args.baseline_rev)
    impls["outbox"] = Outbox
    rows = []
    for pace in ("hot", "paced"):
        pace_s = 0.0 if pace == "hot" else args.pace_ms / 1000
        for nbytes in sizes:
            n = rounds if nbytes < 1 << 20 or pace == "paced" else max(20, rounds // 3)
            for name, factory in impls.items():
                runs = [run(factory, nbytes, n, pace_s) for _ in range(repeats)]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append({"pace": pace, "bytes": nbytes, "impl": name, **med})
    base_names = [n for n in impls if n != "outbox"]
    cols = ["get_miss", "put", "get", "drop", "cpu_per_round"]
    print(f"{'pace':6} {'bytes':>8} {'impl':>14} " + " ".join(f"{c + ' us':>16}" for c in cols) + "  passes/round")
    for row in rows:
        print(f"{row['pace']:6} {row['bytes']:>8} {row['impl']:>14} "
              + " ".join(f"{row[c]:>16.1f}" for c in cols) + f"  {row['fsync_passes_per_round']:.2f}")
    print("\nratio baseline / outbox (higher is better for the outbox)")
    for row in rows:
        if row["impl"] == "outbox":
            continue
        ours = next(r for r in rows if r["impl"] == "outbox" and r["pace"] == row["pace"]
                    and r["bytes"] == row["bytes"])
        print(f"{row['pace']:6} {row['bytes']:>8} {row['impl']:>14} "
              + " ".join(f"{row[c] / max(ours[c], 1e-9):>15.2f}x" for c in cols))
    if args.json:
        meta = {"python": platform.python_version(), "machine": platform.machine(), "rounds": rounds,
                "repeats": repeats, "pace_ms": args.pace_ms, "baselines": base_names}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
