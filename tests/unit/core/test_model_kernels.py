"""Compiled kernels against the NumPy reference (float32 and float64), gradients by
finite differences, for every kind and loss."""
from __future__ import annotations

import numpy as np
import pytest
import sgd_reference as ref

from fedgate.core import Model, ModelSpec

SPECS = {
    "linear-squared": ModelSpec("linear", 5),
    "linear-huber": ModelSpec("linear", 5, loss="huber"),
    "linear-multi": ModelSpec("linear", 5, n_outputs=3),
    "logistic": ModelSpec("logistic", 5),
    "softmax": ModelSpec("softmax", 5, n_outputs=4),
    "mlp-binary-relu": ModelSpec("mlp", 5, hidden=(7,)),
    "mlp-softmax-tanh2": ModelSpec("mlp", 5, n_outputs=3, hidden=(6, 4), activation="tanh"),
    "mlp-squared-relu2": ModelSpec("mlp", 5, n_outputs=2, hidden=(6, 3), loss="squared"),
    "mlp-huber-tanh": ModelSpec("mlp", 5, hidden=(6,), loss="huber", activation="tanh"),
    "autoencoder-relu": ModelSpec("autoencoder", 5, hidden=(3,)),
    "autoencoder-huber-tanh2": ModelSpec("autoencoder", 5, hidden=(4, 2), loss="huber", activation="tanh"),
}
DTYPES = [np.float32, np.float64]


def make_data(spec: ModelSpec, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, spec.n_features))
    if spec.kind.value == "autoencoder":
        return X, None
    if spec.output == "sigmoid":
        return X, rng.integers(0, 2, n)
    if spec.output == "softmax":
        return X, rng.integers(0, spec.n_outputs, n)
    y = 3.0 * rng.normal(size=(n, spec.n_outputs))  # wide, so Huber's linear part is hit
    return X, (y[:, 0] if spec.n_outputs == 1 else y)


def random_model(spec: ModelSpec, seed: int = 3) -> Model:
    model = Model(spec, seed=seed)
    model.params = np.random.default_rng(seed).normal(scale=0.5, size=model.n_params)
    return model


def tol(dtype) -> dict[str, float]:
    return {"rtol": 2e-4, "atol": 2e-4} if dtype is np.float32 else {"rtol": 1e-6, "atol": 1e-6}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SPECS)
def test_forward_outputs_and_losses_match_reference(name, dtype):
    spec = SPECS[name]
    model = random_model(spec)
    X, y = make_data(spec, 300)
    _, z = ref.forward(spec, model.params, X)
    expected = ref.link(spec, z)

    Xd = X.astype(dtype)
    if spec.is_classifier:
        proba = model.predict_proba(Xd)
        want = np.column_stack([1 - expected[:, 0], expected[:, 0]]) if spec.output == "sigmoid" else expected
        np.testing.assert_allclose(proba, want, **tol(dtype))
        assert proba.dtype == dtype
        assert (model.predict(Xd) == want.argmax(axis=1)).mean() > 0.98
    elif spec.kind.value == "autoencoder":
        np.testing.assert_allclose(model.predict(Xd), expected, **tol(dtype))
        want_score = ((expected - X) ** 2).mean(axis=1)
        np.testing.assert_allclose(model.score_samples(Xd), want_score, rtol=1e-3 if dtype is np.float32 else 1e-9)
    else:
        got = model.predict(Xd)
        np.testing.assert_allclose(got, expected[:, 0] if spec.n_outputs == 1 else expected, **tol(dtype))
    np.testing.assert_allclose(model.loss(Xd, y), ref.sample_losses(spec, model.params, X, y).mean(),
                               rtol=1e-4 if dtype is np.float32 else 1e-9)


@pytest.mark.parametrize("name", SPECS)
def test_reference_gradient_matches_finite_differences(name):
    spec = SPECS[name]
    model = random_model(spec)
    X, y = make_data(spec, 40, seed=1)
    sw = np.random.default_rng(2).uniform(0.2, 2.0, size=40)
    params = model.params.astype(np.float64)

    analytic = ref.gradient(spec, params, X, y, sw)
    numeric = ref.numeric_gradient(spec, params, X, y, sw)

    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SPECS)
def test_one_full_batch_step_matches_reference(name, dtype):
    spec = SPECS[name]
    model = random_model(spec)
    X, y = make_data(spec, 50, seed=4)
    X = X.astype(dtype)
    rng = np.random.default_rng(5)
    sw = rng.uniform(0.1, 2.0, size=50)
    reference = rng.normal(size=model.n_params).astype(np.float32)
    before = model.params

    model.fit(X, y, epochs=1, batch_size=50, lr=0.3, l2=0.05, prox_mu=0.2, reference=reference,
              sample_weight=sw, shuffle=False)

    want = ref.sgd_step(spec, before, X.astype(np.float64), y, lr=0.3, l2=0.05, prox_mu=0.2,
                        reference=reference, sample_weight=sw)
    np.testing.assert_allclose(model.params, want, rtol=1e-4, atol=5e-5 if dtype is np.float32 else 1e-6)


@pytest.mark.parametrize("name", ["linear-huber", "softmax", "mlp-softmax-tanh2", "autoencoder-relu"])
def test_kernel_gradient_matches_finite_differences_of_kernel_loss(name):
    # the compiled step and the compiled loss agree with each other, without the reference
    spec = SPECS[name]
    model = random_model(spec)
    X, y = make_data(spec, 30, seed=6)
    w0 = model.params
    model.fit(X, y, batch_size=30, lr=1.0, shuffle=False)
    kernel_grad = w0.astype(np.float64) - model.params

    probe = Model(spec)
    numeric = np.empty(len(w0))
    eps = 1e-2
    for i in range(len(w0)):
        up, down = w0.astype(np.float64).copy(), w0.astype(np.float64).copy()
        up[i] += eps
        down[i] -= eps
        probe.params = up
        hi = probe.loss(X, y)
        probe.params = down
        numeric[i] = (hi - probe.loss(X, y)) / (2 * eps)
    np.testing.assert_allclose(kernel_grad, numeric, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_minibatch_epoch_equals_sequence_of_reference_steps(dtype):
    spec = SPECS["mlp-squared-relu2"]
    model = random_model(spec)
    X, y = make_data(spec, 23, seed=7)  # 3 batches of 8, the last of 7
    w = model.params.astype(np.float64)

    model.fit(X.astype(dtype), y, batch_size=8, lr=0.05, shuffle=False, lr_schedule="invscaling")

    for step, lo in enumerate(range(0, 23, 8)):
        w = ref.sgd_step(spec, w, X[lo:lo + 8], y[lo:lo + 8], lr=0.05 / (step + 1) ** 0.25)
    np.testing.assert_allclose(model.params, w, rtol=1e-4, atol=1e-4 if dtype is np.float32 else 1e-6)
    assert model.steps == 3
