"""Aggregation kernels and update codecs against NumPy, measured in the same run.

For each (N updates, D parameters):

* streaming mean (``StreamingMean.add`` per update) vs ``np.tensordot`` on the
  stacked updates and ``np.average``; a plain copy of the same bytes
  (``np.copyto``) is the physical limit; peak traced memory shows O(D);
* coordinate median vs ``np.median(axis=0)``; trimmed mean vs the partition
  algorithm of scipy/Flower and a sort-based one;
* Krum vs NumPy (row-wise squared distances, ``np.partition`` scores);
* f16 / q8 / top-k encode and decode vs equivalent NumPy code producing the same
  format (header and CRC32 included).

Every figure is the median of ``--repeats`` runs. Run it alone:
``flock /tmp/fedgate-bench.lock python benchmarks/bench_aggregate.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import struct
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import agg_reference as ref  # noqa: E402

from fedgate.core import aggregate as agg  # noqa: E402
from fedgate.core import codec  # noqa: E402

SHAPES = [(10, 1_000_000), (100, 100_000), (1000, 10_000), (50, 1_000_000)]
QUICK_SHAPES = [(10, 100_000), (100, 10_000)]


def timeit(fn: Callable[[], Any], repeats: int, min_time_s: float = 0.0) -> float:
    """Median seconds of one call (a warm-up call first)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


# ------------------------------------------------------------ NumPy codec equivalents

_HEAD = struct.Struct("<4sBBHIII")


def _np_seal(head: bytes, payload: list[bytes]) -> bytes:
    crc = zlib.crc32(head)
    for part in payload:
        crc = zlib.crc32(part, crc)
    return b"".join([head, struct.pack("<I", crc & 0xFFFFFFFF), *payload])


def np_encode_f16(vec: np.ndarray) -> bytes:
    return _np_seal(_HEAD.pack(b"FGVC", 1, 2, 0, vec.size, 0, 0), [vec.astype(np.float16).tobytes()])


def np_encode_q8(vec: np.ndarray, block: int, seed: int) -> bytes:
    scales, q = ref.q8_encode(vec, block, np.random.default_rng(seed))
    return _np_seal(_HEAD.pack(b"FGVC", 1, 3, 0, vec.size, block, 0), [scales.tobytes(), q.tobytes()])


def np_encode_topk(vec: np.ndarray, k: int) -> bytes:
    idx, val = ref.topk_encode(vec, k)
    return _np_seal(_HEAD.pack(b"FGVC", 1, 4, 0, vec.size, k, 0), [idx.tobytes(), val.tobytes()])


def _np_check(buf: bytes) -> tuple[int, int, int]:
    _, _, cid, _, count, param, _ = _HEAD.unpack_from(buf, 0)
    (crc,) = struct.unpack_from("<I", buf, 20)
    mv = memoryview(buf)
    if zlib.crc32(mv[24:], zlib.crc32(mv[:20])) & 0xFFFFFFFF != crc:
        raise ValueError("crc")
    return cid, count, param


def np_decode(buf: bytes) -> np.ndarray:
    cid, n, param = _np_check(buf)
    if cid == 2:
        return np.frombuffer(buf, dtype="<f2", count=n, offset=24).astype(np.float32)
    if cid == 3:
        nb = math.ceil(n / param)
        scales = np.frombuffer(buf, dtype="<f4", count=nb, offset=24)
        q = np.frombuffer(buf, dtype=np.int8, count=n, offset=24 + 4 * nb)
        return ref.q8_decode(scales, q, param)
    idx = np.frombuffer(buf, dtype="<u4", count=param, offset=24)
    if np.any(np.diff(idx.astype(np.int64)) <= 0) or idx[-1] >= n:
        raise ValueError("indices")
    val = np.frombuffer(buf, dtype="<f4", count=param, offset=24 + 4 * param)
    return ref.topk_decode(idx, val, n)


# ---------------------------------------------------------------------- the runs


def bench_shape(n: int, d: int, repeats: int, krum_baseline: bool) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((n, d), dtype=np.float32)
    weights = rng.uniform(1, 100, n)
    nbytes = stack.nbytes
    rows: list[dict[str, Any]] = []

    def row(op: str, ours: float, base: float | None, base_name: str, moved: int = nbytes) -> None:
        rows.append({
            "N": n, "D": d, "op": op, "ours_ms": ours * 1e3,
            "baseline": base_name, "baseline_ms": None if base is None else base * 1e3,
            "ratio": None if base is None else base / ours, "ours_GBps": moved / ours / 1e9,
        })

    dst = np.empty_like(stack)
    t_copy = timeit(lambda: np.copyto(dst, stack), repeats)
    del dst

    def streaming(check: bool) -> np.ndarray:
        acc = agg.StreamingMean(d)
        for i in range(n):
            acc.add(stack[i], weights[i], check_finite=check)
        return acc.result()

    def stacked() -> np.ndarray:
        acc = agg.StreamingMean(d)
        acc.add_stack(stack, weights, check_finite=False)
        return acc.result()

    w32 = (weights / weights.sum()).astype(np.float32)
    t_stream = timeit(lambda: streaming(False), repeats)
    t_stream_chk = timeit(lambda: streaming(True), repeats)
    t_stack = timeit(stacked, repeats)
    t_tdot = timeit(lambda: np.tensordot(w32, stack, axes=1), repeats)
    t_avg = timeit(lambda: np.average(stack, axis=0, weights=weights), repeats)
    row("copy (limit)", t_copy, None, "")
    row("streaming mean", t_stream, t_copy, "copy")
    row("streaming mean", t_stream, t_tdot, "np.tensordot")
    row("streaming mean", t_stream, t_avg, "np.average")
    row("streaming mean+finite", t_stream_chk, t_copy, "copy")
    row("mean add_stack", t_stack, t_copy, "copy")
    mem_ours = peak_bytes(lambda: streaming(False))
    mem_avg = peak_bytes(lambda: np.average(stack, axis=0, weights=weights))
    rows.append({"N": n, "D": d, "op": "peak memory (MB)", "ours_ms": None, "baseline": "np.average",
                 "baseline_ms": None, "ratio": mem_avg / mem_ours, "ours_GBps": None,
                 "ours_MB": mem_ours / 1e6, "baseline_MB": mem_avg / 1e6, "acc_MB": 8 * d / 1e6})

    rep = max(1, repeats // 2) if n * d >= 5e7 else repeats
    t_med = timeit(lambda: agg.median(stack), rep)
    t_np_med = timeit(lambda: np.median(stack, axis=0), rep)
    row("median", t_med, t_np_med, "np.median")
    beta = 0.1
    t_tm = timeit(lambda: agg.trimmed_mean(stack, beta), rep)
    t_np_tm = timeit(lambda: ref.trimmed_mean_partition(stack, beta), rep)
    row("trimmed mean 0.1", t_tm, t_np_tm, "np.partition")
    if n * d <= 2e7:
        t_np_sort = timeit(lambda: ref.trimmed_mean(stack, beta), max(1, rep // 2))
        row("trimmed mean 0.1", t_tm, t_np_sort, "np.sort")

    f = max(1, (n - 3) // 4)
    t_krum = timeit(lambda: agg.krum(stack, f, m=max(1, n - 2 * f)), max(1, rep // 2))
    if krum_baseline:
        def np_krum() -> np.ndarray:
            dist = np.empty((n, n))
            for i in range(n):
                diff = stack - stack[i]
                dist[i] = np.einsum("ij,ij->i", diff, diff)
            k = n - f - 2
            scores = np.partition(dist, k, axis=1)[:, : k + 1].sum(axis=1)
            sel = np.argsort(scores, kind="stable")[: max(1, n - 2 * f)]
            return stack[sel].mean(axis=0)
        t_np_krum = timeit(np_krum, 1)
        row(f"multi-krum f={f}", t_krum, t_np_krum, "numpy rows")
    else:
        row(f"multi-krum f={f}", t_krum, None, "")
    return rows


def bench_codecs(d: int, repeats: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    vec = rng.standard_normal(d, dtype=np.float32)
    rows = []
    kept = codec.topk_count(d, 0.01)
    cases = [
        ("f16", lambda: codec.encode(vec, "f16"), lambda: np_encode_f16(vec)),
        ("q8", lambda: codec.encode(vec, "q8", block=256, seed=3), lambda: np_encode_q8(vec, 256, 3)),
        ("topk 1%", lambda: codec.encode(vec, "topk", k=0.01), lambda: np_encode_topk(vec, kept)),
    ]
    for name, ours, base in cases:
        buf = ours()
        t_enc = timeit(ours, repeats, 0.2)
        t_np_enc = timeit(base, repeats, 0.2)
        t_dec = timeit(lambda: codec.decode(buf), repeats, 0.2)
        t_np_dec = timeit(lambda: np_decode(buf), repeats, 0.2)
        for op, a, b in ((f"{name} encode", t_enc, t_np_enc), (f"{name} decode", t_dec, t_np_dec)):
            rows.append({"N": 1, "D": d, "op": op, "ours_ms": a * 1e3, "baseline": "numpy",
                         "baseline_ms": b * 1e3, "ratio": b / a, "ours_GBps": vec.nbytes / a / 1e9})
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'N':>5} {'D':>9} {'op':<24} {'ours ms':>10} {'GB/s':>7} {'baseline':<14} {'base ms':>10} {'ratio':>8}")
    for r in rows:
        if r["op"].startswith("peak memory"):
            print(f"{r['N']:>5} {r['D']:>9} {'peak MB (streaming)':<24} {r['ours_MB']:>10.1f} {'':>7} "
                  f"{'np.average':<14} {r['baseline_MB']:>10.1f} {r['ratio']:>7.1f}x  (acc {r['acc_MB']:.1f} MB)")
            continue
        print(f"{r['N']:>5} {r['D']:>9} {r['op']:<24} {_fmt(r['ours_ms'], '10.2f')} {_fmt(r['ours_GBps'], '7.2f')} "
              f"{r['baseline']:<14} {_fmt(r['baseline_ms'], '10.2f'):>10} "
              f"{(_fmt(r['ratio'], '7.2f') + 'x') if r['ratio'] is not None else '-':>8}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median reported)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--only", choices=["aggregate", "codec"], help="run one half")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 7)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows: list[dict[str, Any]] = []
    if args.only != "codec":
        for n, d in shapes:
            rows += bench_shape(n, d, repeats, krum_baseline=n * n * d <= 1e10)
    if args.only != "aggregate":
        for d in sorted({d for _, d in shapes}):
            rows += bench_codecs(d, repeats)
    print_table(rows)
    if args.json:
        meta = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
                "cpus": os.cpu_count(), "repeats": repeats, "quick": args.quick}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
