"""Modbus acquisition: merged request plan vs one request per tag, over TCP.

100 tags spread over the input and holding registers of two machines of the
simulated plant (``fedgate-sim`` in its own process on 127.0.0.1, so its CPU is not
ours). For each plan it measures requests per cycle, the wall time of one polling
cycle of both devices, and the process CPU time the agent side spends while
polling at 10 Hz (percent of one core). It also times the register decoding alone:
our ``struct`` codec against NumPy views.

    flock /tmp/fedgate-bench.lock .venv/bin/python benchmarks/bench_modbus.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from fedgate.drivers import Acquisition, Quality, load_config, plan_device
from fedgate.drivers.decode import codec_for
from fedgate.drivers.sim.regmap import HOLDING_FIELDS, INPUT_FIELDS

TAGS_PER_MACHINE = 50


def machine_tags() -> list[dict[str, Any]]:
    """50 tags of one machine: every input field, the prediction area, holding scratch registers."""
    tags: list[dict[str, Any]] = []
    for f in INPUT_FIELDS:
        tag: dict[str, Any] = {"name": f.name, "register": "input", "address": f.address, "type": f.type,
                               "byte_order": f.order}
        if f.type == "string":
            tag["length"] = f.length
        elif f.scale != 1.0:
            tag["scale"] = f.scale
        tags.append(tag)
    for f in HOLDING_FIELDS:
        tags.append({"name": f.name, "register": "holding", "address": f.address, "type": f.type,
                     "byte_order": f.order, **({"scale": f.scale} if f.scale != 1.0 else {})})
    address = 10
    while len(tags) < TAGS_PER_MACHINE:
        tags.append({"name": f"scratch{address}", "register": "holding", "address": address, "type": "uint16"})
        address += 1
    return tags[:TAGS_PER_MACHINE]


def make_doc(port: int, units: list[int], *, per_tag: bool, poll: str) -> dict[str, Any]:
    return {
        "transports": [{"name": "plant", "kind": "modbus-tcp", "host": "127.0.0.1", "port": port,
                        "timeout": "2s"}],
        "devices": [{"name": f"m{u}", "transport": "plant", "unit_id": u, "poll": poll,
                     "one_request_per_tag": per_tag, "tags": machine_tags()} for u in units],
    }


async def measure(port: int, units: list[int], *, per_tag: bool, cycles: int, cpu_s: float,
                  repeats: int) -> dict[str, Any]:
    cfg = load_config(make_doc(port, units, per_tag=per_tag, poll="100ms"), file="<bench>")
    tags = sum(len(d.tags) for d in cfg.devices)
    requests = sum(len(plan_device(d).requests) for d in cfg.devices)  # type: ignore[arg-type]
    # cycle time: both devices polled once (their loops would share the one TCP link)
    acq = Acquisition(cfg)
    devices = list(cfg.devices)
    bad = 0
    cycle_ms: list[float] = []
    for i in range(cycles + 5):
        t0 = time.perf_counter()
        results = await asyncio.gather(*(acq.poll_device(d) for d in devices))  # type: ignore[arg-type]
        dt = (time.perf_counter() - t0) * 1e3
        if i >= 5:
            cycle_ms.append(dt)
        if i % 10 == 0:
            print(f"  [{'per-tag' if per_tag else 'merged'}] cycle {i}: {dt:.1f} ms", file=sys.stderr, flush=True)
        bad += sum(v.quality is not Quality.GOOD for vals, _ in results for v in vals)
    await acq.stop()
    # CPU while the real poll loops run at 10 Hz
    cpu_pct: list[float] = []
    rate_hz: list[float] = []
    for _ in range(repeats):
        acq = Acquisition(cfg)
        await acq.start()
        await asyncio.sleep(0.3)
        c0, w0 = time.process_time(), time.perf_counter()
        n0 = sum(s["cycles"] for s in acq.status().values())
        await asyncio.sleep(cpu_s)
        c1, w1 = time.process_time(), time.perf_counter()
        n1 = sum(s["cycles"] for s in acq.status().values())
        await acq.stop()
        cpu_pct.append(100.0 * (c1 - c0) / (w1 - w0))
        rate_hz.append((n1 - n0) / len(devices) / (w1 - w0))
    return {
        "plan": "one request per tag" if per_tag else "merged",
        "tags": tags,
        "requests_per_cycle": requests,
        "cycle_ms_median": statistics.median(cycle_ms),
        "cycle_ms_p90": float(np.percentile(cycle_ms, 90)),
        "cpu_pct_at_10hz_median": statistics.median(cpu_pct),
        "achieved_hz_median": statistics.median(rate_hz),
        "cpu_ms_per_cycle": statistics.median(cpu_pct) * 10.0 / max(statistics.median(rate_hz), 1e-9),
        "non_good_values": bad,
    }


def decode_bench(repeats: int, loops: int) -> dict[str, float]:
    """Decode 100 float32 CDAB values from 200 registers: struct codec vs NumPy views."""
    rng = np.random.default_rng(0)
    regs = [int(x) for x in rng.integers(0, 65536, 200)]
    codec = codec_for("float32", "CDAB", scale=0.5)

    def ours() -> None:
        for i in range(0, 200, 2):
            codec.decode(regs[i:i + 2])

    def numpy_views() -> None:
        a = np.array(regs, dtype=">u2").reshape(-1, 2)[:, ::-1]
        vals = np.ascontiguousarray(a).view(">f4").ravel() * 0.5
        vals.tolist()

    def per_tag_numpy() -> None:
        for i in range(0, 200, 2):
            float(np.array(regs[i:i + 2][::-1], dtype=">u2").view(">f4")[0]) * 0.5

    out = {}
    for name, fn in (("struct codec, per tag", ours), ("numpy, one batch", numpy_views),
                     ("numpy, per tag", per_tag_numpy)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            times.append((time.perf_counter() - t0) / loops * 1e6)
        out[name] = statistics.median(times)
    return out


def start_sim(tmp: str) -> tuple[subprocess.Popen[bytes], int, list[int]]:
    ready = os.path.join(tmp, "sim.json")
    proc = subprocess.Popen([sys.executable, "-m", "fedgate.drivers.sim.cli", "--tcp", "127.0.0.1:0",
                             "--ready-file", ready, "--profile", "standard,heavy", "--seed", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("fedgate-sim did not start")
        time.sleep(0.05)
    with open(ready) as fh:
        info = json.load(fh)
    return proc, int(info["port"]), list(info["unit_ids"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run")
    ap.add_argument("--json", metavar="PATH", help="write results here")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    cycles = 30 if args.quick else 200
    cpu_s = 1.0 if args.quick else 4.0
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, units = start_sim(tmp)
        try:
            merged = asyncio.run(measure(port, units, per_tag=False, cycles=cycles, cpu_s=cpu_s, repeats=repeats))
            baseline = asyncio.run(measure(port, units, per_tag=True, cycles=cycles, cpu_s=cpu_s, repeats=repeats))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    decode = decode_bench(repeats, 200 if args.quick else 2000)

    rows = [
        ("requests per cycle", "requests_per_cycle", "{:.0f}"),
        ("cycle time, median (ms)", "cycle_ms_median", "{:.2f}"),
        ("cycle time, p90 (ms)", "cycle_ms_p90", "{:.2f}"),
        ("CPU at 10 Hz, median (% of one core)", "cpu_pct_at_10hz_median", "{:.2f}"),
        ("achieved rate, median (Hz)", "achieved_hz_median", "{:.2f}"),
        ("CPU per cycle (ms)", "cpu_ms_per_cycle", "{:.3f}"),
        ("values not good", "non_good_values", "{:.0f}"),
    ]
    print(f"bench_modbus: {merged['tags']} tags, 2 units of fedgate-sim over TCP on 127.0.0.1, "
          f"{repeats} repeats, {cycles} cycles")
    print(f"{'metric':40s} {'merged plan':>14s} {'per-tag (base)':>15s} {'base/ours':>10s}")
    for label, key, fmt in rows:
        a, b = merged[key], baseline[key]
        ratio = f"{b / a:.1f}x" if a else "-"
        print(f"{label:40s} {fmt.format(a):>14s} {fmt.format(b):>15s} {ratio:>10s}")
    print()
    print(f"{'decode 100 float32 CDAB tags':40s} {'us/cycle':>14s}")
    ref = decode["struct codec, per tag"]
    for name, us in decode.items():
        print(f"  {name:38s} {us:14.1f} {us / ref:9.2f}x")
    target = merged["cpu_pct_at_10hz_median"] < 5.0 and merged["achieved_hz_median"] > 9.0
    print(f"\ntarget 100 tags at 10 Hz under 5% of one core: {'met' if target else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"merged": merged, "baseline": baseline, "decode_us": decode, "target_met": target},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
