"""NumPy reference for fedgate's models: forward pass, losses, gradients, one SGD step.

Written for clarity, not speed, in float64, straight from the definitions in
``fedgate.core.model``'s docstring; the compiled kernels are checked against it.
"""
from __future__ import annotations

import numpy as np

from fedgate.core.model import ModelSpec

HUBER_DELTA = 1.0


def unpack(spec: ModelSpec, params: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(W, b), ...]`` float64 copies; W is (fan_out, fan_in)."""
    p = np.asarray(params, dtype=np.float64)
    out = []
    for sl in spec.layout():
        w = p[sl.weight_offset:sl.bias_offset].reshape(sl.weight_shape)
        out.append((w.copy(), p[sl.bias_offset:sl.bias_offset + sl.bias_size].copy()))
    return out


def pack(layers: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.concatenate([np.concatenate([w.ravel(), b]) for w, b in layers])


def _act(spec: ModelSpec, z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0.0) if spec.activation.value == "relu" else np.tanh(z)


def _act_grad(spec: ModelSpec, a: np.ndarray) -> np.ndarray:
    return (a > 0).astype(np.float64) if spec.activation.value == "relu" else 1.0 - a * a


def forward(spec: ModelSpec, params: np.ndarray, X: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Hidden activations (inputs of each layer, X first) and output pre-activations z."""
    layers = unpack(spec, params)
    a = np.asarray(X, dtype=np.float64)
    inputs = [a]
    for i, (w, b) in enumerate(layers):
        z = a @ w.T + b
        if i < len(layers) - 1:
            a = _act(spec, z)
            inputs.append(a)
        else:
            return inputs, z
    raise AssertionError("unreachable")


def link(spec: ModelSpec, z: np.ndarray) -> np.ndarray:
    if spec.output == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if spec.output == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return z


def _targets(spec: ModelSpec, X: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    if spec.kind.value == "autoencoder":
        return np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return y.reshape(len(y), -1)


def losses_and_delta(spec: ModelSpec, z: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row loss (n,) and d loss / d z (n, K)."""
    if spec.output == "softmax":
        c = t[:, 0].astype(np.int64)
        m = z.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
        p = link(spec, z)
        delta = p.copy()
        delta[np.arange(len(c)), c] -= 1.0
        return lse - z[np.arange(len(c)), c], delta
    if spec.output == "sigmoid":
        loss = np.logaddexp(0.0, z) - t * z
        return loss.sum(axis=1), link(spec, z) - t
    r = z - t
    if spec.loss.value == "huber":
        big = np.abs(r) > HUBER_DELTA
        loss = np.where(big, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA), 0.5 * r * r)
        delta = np.where(big, np.sign(r) * HUBER_DELTA, r)
        return loss.sum(axis=1), delta
    return (0.5 * r * r).sum(axis=1), r


def sample_losses(spec: ModelSpec, params: np.ndarray, X: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    _, z = forward(spec, params, X)
    return losses_and_delta(spec, z, _targets(spec, X, y))[0]


def batch_loss(spec: ModelSpec, params: np.ndarray, X: np.ndarray, y: np.ndarray | None = None,
               sample_weight: np.ndarray | None = None) -> float:
    """(1/n) * sum_i sw_i * loss_i — the objective whose gradient one batch step follows."""
    losses = sample_losses(spec, params, X, y)
    sw = np.ones(len(losses)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    return float((sw * losses).sum() / len(losses))


def gradient(spec: ModelSpec, params: np.ndarray, X: np.ndarray, y: np.ndarray | None = None,
             sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Gradient of :func:`batch_loss` by back-propagation, flat like ``params``."""
    layers = unpack(spec, params)
    inputs, z = forward(spec, params, X)
    _, delta = losses_and_delta(spec, z, _targets(spec, X, y))
    n = len(z)
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    delta = delta * (sw / n)[:, None]
    grads: list[tuple[np.ndarray, np.ndarray]] = []
    for i in range(len(layers) - 1, -1, -1):
        a_in = inputs[i]
        grads.append((delta.T @ a_in, delta.sum(axis=0)))
        if i > 0:
            delta = (delta @ layers[i][0]) * _act_grad(spec, a_in)
    return pack(grads[::-1])


def sgd_step(spec: ModelSpec, params: np.ndarray, X: np.ndarray, y: np.ndarray | None, *, lr: float,
             l2: float = 0.0, prox_mu: float = 0.0, reference: np.ndarray | None = None,
             sample_weight: np.ndarray | None = None) -> np.ndarray:
    """One full-batch step: w - lr * (grad + l2 * W (weights only) + mu * (w - reference))."""
    w = np.asarray(params, dtype=np.float64)
    g = gradient(spec, w, X, y, sample_weight)
    mask = np.zeros_like(w)
    for sl in spec.layout():
        mask[sl.weight_offset:sl.bias_offset] = 1.0
    g = g + l2 * mask * w
    if prox_mu:
        g = g + prox_mu * (w - np.asarray(reference, dtype=np.float64))
    return w - lr * g


def numeric_gradient(spec: ModelSpec, params: np.ndarray, X: np.ndarray, y: np.ndarray | None = None,
                     sample_weight: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of :func:`batch_loss`."""
    w = np.asarray(params, dtype=np.float64).copy()
    g = np.empty_like(w)
    for i in range(len(w)):
        old = w[i]
        w[i] = old + eps
        up = batch_loss(spec, w, X, y, sample_weight)
        w[i] = old - eps
        down = batch_loss(spec, w, X, y, sample_weight)
        w[i] = old
        g[i] = (up - down) / (2 * eps)
    return g
