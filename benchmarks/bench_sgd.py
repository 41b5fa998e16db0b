"""Benchmark fedgate's compiled SGD against scikit-learn's SGDClassifier.

Two paths that matter on a gateway:

1. one epoch over a large table: ``Model.fit(epochs=1)`` vs
   ``SGDClassifier(loss="log_loss", max_iter=1, tol=None, shuffle=True).fit`` on the
   same float64 array (n = 1e6, d in {8, 32, 128}); fedgate is also timed on a
   float32 copy (its native storage dtype, prepared outside the timing);
2. many small calls (64 rows each, the agent's incremental training): ``Model.fit``
   vs ``SGDClassifier.partial_fit``;
3. (context) a few MLP epochs vs ``MLPClassifier(solver="sgd", momentum=0)``.

Each timing is the median of several repeats; the table gives samples/s, the ratio
(fedgate / scikit-learn throughput) and both models' test accuracy.

Run under the shared lock on a busy machine::

    flock /tmp/fedgate-bench.lock .venv/bin/python benchmarks/bench_sgd.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from typing import Any, Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import SGDClassifier
from sklearn.neural_network import MLPClassifier

from fedgate.core import Model, ModelSpec

CHUNK = 64
POOL = 256
MLP_EPOCHS = 3


def make_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standardised features, labels from a noisy linear rule (Bayes accuracy ~ 93 %)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d) / np.sqrt(d)
    y = (X @ w + 0.25 * rng.standard_normal(n) > 0).astype(np.int64)
    return X, y


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, Any]]:
    """Median wall time of each function over ``repeats`` rounds, and its last result.

    The functions take turns within each round, so a load change on this shared
    machine hits the baseline and fedgate alike.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    out: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), out[name]) for name in fns}


def bench_epoch(n: int, d: int, repeats: int, lr: float, batch_size: int) -> dict[str, Any]:
    X, y = make_data(n + n // 10, d, seed=d)
    X_train, y_train, X_test, y_test = X[:n], y[:n], X[n:], y[n:]
    X32 = X_train.astype(np.float32)
    seeds = iter(range(10_000))

    def sklearn_fit() -> SGDClassifier:
        clf = SGDClassifier(loss="log_loss", max_iter=1, tol=None, shuffle=True, random_state=next(seeds))
        return clf.fit(X_train, y_train)

    def fedgate_fit(data: np.ndarray) -> Callable[[], Model]:
        def run() -> Model:
            model = Model(ModelSpec("logistic", d), seed=next(seeds))
            model.fit(data, y_train, epochs=1, batch_size=batch_size, lr=lr)
            return model
        return run

    def convert_then_fit() -> Model:
        # the alternative design: one float32 kernel, float64 input converted per call
        return fedgate_fit(X_train.astype(np.float32))()

    res = timed({"sk": sklearn_fit, "f64": fedgate_fit(X_train), "f32": fedgate_fit(X32),
                 "convert": convert_then_fit}, repeats)
    (t_sk, clf), (t_64, m64), (t_32, m32), (t_cv, _) = res["sk"], res["f64"], res["f32"], res["convert"]
    return {
        "n": n, "d": d,
        "sklearn_s": t_sk, "fedgate_f64_s": t_64, "fedgate_f32_s": t_32, "convert_then_f32_s": t_cv,
        "ratio_f64": t_sk / t_64, "ratio_f32": t_sk / t_32,
        "acc_sklearn": float(clf.score(X_test, y_test)),
        "acc_fedgate_f64": float((m64.predict(X_test) == y_test).mean()),
        "acc_fedgate_f32": float((m32.predict(X_test.astype(np.float32)) == y_test).mean()),
    }


def bench_small_calls(d: int, calls: int, sk_calls: int, repeats: int) -> dict[str, Any]:
    # a pool of distinct 64-row chunks, cycled: the agent trains on rows it just read,
    # so they are cache-warm, and a 1e6-chunk array would only measure DRAM
    X, y = make_data(CHUNK * POOL, d, seed=100 + d)
    pool = [(X[i:i + CHUNK], y[i:i + CHUNK]) for i in range(0, len(X), CHUNK)]
    classes = np.array([0, 1])

    def sklearn_calls() -> None:
        clf = SGDClassifier(loss="log_loss", random_state=0)
        for i in range(sk_calls):
            xb, yb = pool[i % POOL]
            clf.partial_fit(xb, yb, classes=classes)

    def fedgate_calls() -> None:
        model = Model(ModelSpec("logistic", d))
        for i in range(calls):
            xb, yb = pool[i % POOL]
            model.fit(xb, yb, lr=0.05)

    res = timed({"sk": sklearn_calls, "fedgate": fedgate_calls}, repeats)
    t_sk, t_fg = res["sk"][0], res["fedgate"][0]
    us_sk = t_sk / sk_calls * 1e6
    us_fg = t_fg / calls * 1e6
    return {"d": d, "rows_per_call": CHUNK, "sklearn_us_per_call": us_sk, "fedgate_us_per_call": us_fg,
            "ratio": us_sk / us_fg}


def bench_mlp(n: int, d: int, hidden: tuple[int, ...], activation: str, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    X = rng.standard_normal((n + n // 5, d))
    y = (np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] > 0).astype(np.int64)  # not linearly separable
    X_train, y_train, X_test, y_test = X[:n], y[:n], X[n:], y[n:]

    def sklearn_fit() -> MLPClassifier:
        clf = MLPClassifier(hidden, activation=activation, solver="sgd", batch_size=32, learning_rate_init=0.05,
                            momentum=0.0, max_iter=MLP_EPOCHS, shuffle=True, random_state=0)
        return clf.fit(X_train, y_train)

    def fedgate_fit() -> Model:
        model = Model(ModelSpec("mlp", d, hidden=hidden, activation=activation), seed=0)
        model.fit(X_train, y_train, epochs=MLP_EPOCHS, batch_size=32, lr=0.05)
        return model

    res = timed({"sk": sklearn_fit, "fedgate": fedgate_fit}, repeats)
    (t_sk, clf), (t_fg, model) = res["sk"], res["fedgate"]
    return {"n": n, "d": d, "hidden": list(hidden), "activation": activation, "sklearn_s": t_sk,
            "fedgate_s": t_fg, "ratio": t_sk / t_fg, "acc_sklearn": float(clf.score(X_test, y_test)),
            "acc_fedgate": float((model.predict(X_test) == y_test).mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 2e5, fewer repeats")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.05, help="fedgate learning rate (default 0.05)")
    parser.add_argument("--batch-size", type=int, default=32, help="fedgate mini-batch (default 32)")
    args = parser.parse_args(argv)
    n = 200_000 if args.quick else 1_000_000
    repeats = args.repeats or (3 if args.quick else 5)
    calls, sk_calls = (2_000, 300) if args.quick else (20_000, 2_000)
    warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=1 is the point

    epoch_rows = [bench_epoch(n, d, repeats, args.lr, args.batch_size) for d in (8, 32, 128)]
    print(f"one epoch, logistic, n={n:.0e}, median of {repeats}; fedgate batch={args.batch_size} lr={args.lr}")
    print(f"{'d':>4} {'sklearn Ms/s':>12} {'ours f64 Ms/s':>13} {'ratio':>6} {'ours f32 Ms/s':>13} {'ratio':>6}"
          f" {'f64->f32+fit':>12} {'acc sk':>7} {'acc f64':>7} {'acc f32':>7}")
    for r in epoch_rows:
        print(f"{r['d']:>4} {n / r['sklearn_s'] / 1e6:>12.2f} {n / r['fedgate_f64_s'] / 1e6:>13.2f}"
              f" {r['ratio_f64']:>5.1f}x {n / r['fedgate_f32_s'] / 1e6:>13.2f} {r['ratio_f32']:>5.1f}x"
              f" {n / r['convert_then_f32_s'] / 1e6:>12.2f}"
              f" {100 * r['acc_sklearn']:>6.2f}% {100 * r['acc_fedgate_f64']:>6.2f}% {100 * r['acc_fedgate_f32']:>6.2f}%")
    print("(Ms/s = million samples per second; ratio = sklearn time / ours; f64->f32+fit = converting the\n"
          " float64 input to float32 first, the alternative to our fused float32/float64 kernels)")

    small_rows = [bench_small_calls(d, calls, sk_calls, repeats) for d in (8, 32, 128)]
    print(f"\n{CHUNK}-row calls: Model.fit vs SGDClassifier.partial_fit, median of {repeats}")
    print(f"{'d':>4} {'sklearn us/call':>15} {'ours us/call':>12} {'ratio':>7}")
    for r in small_rows:
        print(f"{r['d']:>4} {r['sklearn_us_per_call']:>15.1f} {r['fedgate_us_per_call']:>12.2f} {r['ratio']:>6.1f}x")

    mlp_rows = [bench_mlp(n // 20, 32, hidden, act, repeats) for hidden, act in (((32,), "relu"), ((64, 32), "tanh"))]
    print(f"\nMLP, {MLP_EPOCHS} epochs, n={n // 20:.0e}, d=32, batch 32: Model(mlp) vs MLPClassifier(solver='sgd',"
          f" momentum=0), median of {repeats}")
    print(f"{'hidden':>8} {'act':>5} {'sklearn Ms/s':>12} {'ours Ms/s':>10} {'ratio':>6} {'acc sk':>7} {'acc ours':>8}")
    for r in mlp_rows:
        seen = r["n"] * MLP_EPOCHS
        print(f"{str(r['hidden']):>8} {r['activation']:>5} {seen / r['sklearn_s'] / 1e6:>12.3f}"
              f" {seen / r['fedgate_s'] / 1e6:>10.3f} {r['ratio']:>5.1f}x {100 * r['acc_sklearn']:>6.2f}%"
              f" {100 * r['acc_fedgate']:>7.2f}%")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": platform.platform(), "quick": args.quick, "repeats": repeats,
                       "epoch": epoch_rows, "small_calls": small_rows, "mlp": mlp_rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
