"""Plain NumPy references for the aggregation kernels and codecs (tests and benchmarks).

Written for clarity, not speed: each follows the textbook definition, so a kernel
that agrees with it is right.
"""
from __future__ import annotations

import math

import numpy as np


def weighted_mean(stack: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """np.average in float64."""
    return np.average(stack.astype(np.float64), axis=0, weights=weights)


def median(stack: np.ndarray) -> np.ndarray:
    return np.median(stack.astype(np.float64), axis=0)


def trimmed_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """Sort each coordinate, drop floor(beta n) at each end, average the rest."""
    n = stack.shape[0]
    t = int(beta * n)
    return np.sort(stack.astype(np.float64), axis=0)[t : n - t].mean(axis=0)


def trimmed_mean_partition(stack: np.ndarray, beta: float) -> np.ndarray:
    """The scipy/Flower algorithm: np.partition at both cut points, mean of the middle."""
    n = stack.shape[0]
    t = int(beta * n)
    part = np.partition(stack, (t, n - t - 1), axis=0)
    return part[t : n - t].mean(axis=0)


def pairwise_sq_dists(stack: np.ndarray) -> np.ndarray:
    """Double loop of squared norms of differences (the Flower formulation)."""
    n = stack.shape[0]
    x = stack.astype(np.float64)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = float(np.sum((x[i] - x[j]) ** 2))
    return out


def krum_scores(stack: np.ndarray, f: int) -> np.ndarray:
    dist = pairwise_sq_dists(stack)
    n = stack.shape[0]
    k = n - f - 2
    return np.array([np.sort(np.delete(dist[i], i))[:k].sum() for i in range(n)])


def krum(stack: np.ndarray, f: int, m: int = 1) -> tuple[np.ndarray, np.ndarray]:
    scores = krum_scores(stack, f)
    sel = np.argsort(scores, kind="stable")[:m]
    return stack[sel].astype(np.float64).mean(axis=0), sel


def pooled_stats(chunks: list[np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """(count, mean, M2) of the concatenated data, two-pass in float64."""
    data = np.concatenate(chunks).astype(np.float64)
    mean = data.mean(axis=0)
    return data.shape[0], mean, ((data - mean) ** 2).sum(axis=0)


def fedopt(rule: str, params, delta, m, v, lr, beta1, beta2, tau):
    """Reddi et al. (2021) server step in float64; returns new (params, m, v)."""
    p, d, m, v = (np.asarray(a, dtype=np.float64) for a in (params, delta, m, v))
    m = beta1 * m + (1 - beta1) * d
    if rule == "fedadagrad":
        v = v + d * d
    elif rule == "fedadam":
        v = beta2 * v + (1 - beta2) * d * d
    else:
        v = v - (1 - beta2) * d * d * np.sign(v - d * d)
    return p + lr * m / (np.sqrt(v) + tau), m, v


# ----------------------------------------------------------------------------- codecs


def f16_roundtrip(vec: np.ndarray) -> np.ndarray:
    return vec.astype(np.float16).astype(np.float32)


def q8_encode(vec: np.ndarray, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scale max|x|/127, stochastic rounding with NumPy's generator."""
    n = vec.shape[0]
    nb = math.ceil(n / block)
    padded = np.zeros(nb * block, dtype=np.float32)
    padded[:n] = vec
    blocks = padded.reshape(nb, block)
    peak = np.abs(blocks).max(axis=1)
    scales = (peak / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(peak > 0, np.float32(127) / peak, np.float32(0)).astype(np.float32)
    t = blocks * inv[:, None] + rng.random(blocks.shape, dtype=np.float32)
    q = np.clip(np.floor(t), -127, 127).astype(np.int8).reshape(-1)[:n]
    return scales, q


def q8_decode(scales: np.ndarray, q: np.ndarray, block: int) -> np.ndarray:
    n = q.shape[0]
    return (q.astype(np.float32) * np.repeat(scales, block)[:n]).astype(np.float32)


def topk_encode(vec: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (increasing) and values of the k largest |x| via argpartition."""
    idx = np.argpartition(np.abs(vec), vec.shape[0] - k)[vec.shape[0] - k :]
    idx.sort()
    return idx.astype(np.uint32), vec[idx]


def topk_decode(idx: np.ndarray, val: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[idx] = val
    return out
