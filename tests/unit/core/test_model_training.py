"""Model.fit behaviour: determinism, refusals, divergence, params setter, FedProx, weights."""
from __future__ import annotations

import numpy as np
import pytest

from fedgate.core import ConfigError, Model, ModelSpec, TrainingError


def blobs(n: int = 400, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X @ np.arange(1, d + 1) + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return X, y


def test_same_seed_same_model_different_seed_different_model():
    X, y = blobs()
    spec = ModelSpec("mlp", 4, hidden=(5,))
    a, b, c = Model(spec, seed=7), Model(spec, seed=7), Model(spec, seed=8)

    for m in (a, b, c):
        m.fit(X, y, epochs=2, batch_size=16, lr=0.1)
        m.fit(X[:50], y[:50], batch_size=8, lr=0.1)

    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)


def test_shuffling_depends_on_the_seed_even_for_zero_initialised_models():
    X, y = blobs()
    spec = ModelSpec("logistic", 4)
    a, b = Model(spec, seed=1), Model(spec, seed=2)
    a.fit(X, y, batch_size=8, lr=0.1)
    b.fit(X, y, batch_size=8, lr=0.1)
    unshuffled = Model(spec, seed=1)
    unshuffled.fit(X, y, batch_size=8, lr=0.1, shuffle=False)

    assert not np.array_equal(a.params, b.params)
    assert not np.array_equal(a.params, unshuffled.params)


def test_report_counts_samples_and_steps():
    X, y = blobs(n=100)
    model = Model(ModelSpec("logistic", 4))

    report = model.fit(X, y, epochs=3, batch_size=32, lr=0.1)

    assert report.samples_seen == 300
    assert report.steps == 3 * 4
    assert model.steps == 12
    assert 0 < report.mean_loss < np.log(2) + 1e-9  # starts at log 2 (w = 0) and improves
    assert report.seconds >= 0


def test_float32_and_float64_inputs_train_alike():
    X, y = blobs()
    m32, m64 = Model(ModelSpec("logistic", 4)), Model(ModelSpec("logistic", 4))

    m32.fit(X.astype(np.float32), y, epochs=3, lr=0.1)
    m64.fit(X, y, epochs=3, lr=0.1)

    np.testing.assert_allclose(m32.params, m64.params, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", ["logistic", "mlp", "autoencoder"])
def test_non_finite_x_is_refused_and_model_unchanged(kind, bad):
    X, y = blobs()
    spec = ModelSpec(kind, 4, hidden=(3,) if kind != "logistic" else ())
    model = Model(spec, seed=0)
    model.fit(X, None if kind == "autoencoder" else y, lr=0.05)
    before, steps = model.params, model.steps
    X[123, 2] = bad

    with pytest.raises(TrainingError, match="X row 123 holds NaN or Inf"):
        model.fit(X, None if kind == "autoencoder" else y, epochs=3, lr=0.05)

    np.testing.assert_array_equal(model.params, before)
    assert model.steps == steps
    with pytest.raises(TrainingError, match="row 123"):
        model.predict(X)


@pytest.mark.parametrize(
    ("spec", "y_bad", "words"),
    [
        (ModelSpec("logistic", 4), 2, "must be 0 or 1"),
        (ModelSpec("logistic", 4), 0.5, "must be 0 or 1"),
        (ModelSpec("softmax", 4, n_outputs=3), 3, r"class id in \[0, 3\)"),
        (ModelSpec("softmax", 4, n_outputs=3), -1, r"class id in \[0, 3\)"),
        (ModelSpec("softmax", 4, n_outputs=3), 1.5, r"class id in \[0, 3\)"),
        (ModelSpec("linear", 4), np.nan, "must be finite"),
        (ModelSpec("mlp", 4, hidden=(3,), loss="huber"), np.inf, "must be finite"),
    ],
)
def test_bad_targets_are_refused_naming_the_row(spec, y_bad, words):
    X, y = blobs()
    y = y.astype(np.float64)
    y[77] = y_bad
    model = Model(spec)
    before = model.params

    with pytest.raises(TrainingError, match=rf"y\[77\] = {float(y_bad)!r}: .*{words}"):
        model.fit(X, y, lr=0.01)

    np.testing.assert_array_equal(model.params, before)


def test_divergence_stops_with_an_error_and_keeps_the_old_params():
    X, _ = blobs()
    y = X @ np.array([1e3, -2e3, 5e2, 1e3])
    model = Model(ModelSpec("linear", 4))
    before = model.params

    with pytest.raises(TrainingError, match="diverged in epoch"):
        model.fit(X * 1e3, y, epochs=50, lr=10.0)

    np.testing.assert_array_equal(model.params, before)
    assert np.isfinite(model.params).all()


def test_params_setter_refuses_wrong_size_and_non_finite_values():
    model = Model(ModelSpec("linear", 3))
    good = np.array([1.0, 2.0, 3.0, 4.0])

    model.params = good
    returned = model.params
    returned[0] = 99.0  # a copy: the model is unaffected

    np.testing.assert_array_equal(model.params, good.astype(np.float32))
    assert model.params.dtype == np.float32 and model.params.flags.c_contiguous
    with pytest.raises(ConfigError, match="expected a vector of 4 values") as info:
        model.params = np.zeros(5)
    assert info.value.key == "params"
    with pytest.raises(ConfigError, match="non-finite value at index 2"):
        model.params = np.array([0.0, 1.0, np.nan, 0.0])
    with pytest.raises(ConfigError, match="non-finite value at index 0"):
        model.params = np.array([1e39, 0.0, 0.0, 0.0])  # overflows float32
    with pytest.raises(ConfigError, match="not a numeric vector"):
        model.params = ["a", "b", "c", "d"]
    np.testing.assert_array_equal(model.params, good.astype(np.float32))


def test_fedprox_pulls_the_local_model_towards_the_reference():
    X, y = blobs(seed=3)
    reference = np.full(5, 0.25, np.float32)
    plain, prox = Model(ModelSpec("logistic", 4)), Model(ModelSpec("logistic", 4))
    plain.params = reference
    prox.params = reference

    plain.fit(X, y, epochs=5, lr=0.1)
    prox.fit(X, y, epochs=5, lr=0.1, prox_mu=1.0, reference=reference)

    assert np.linalg.norm(prox.params - reference) < 0.5 * np.linalg.norm(plain.params - reference)


def test_fedprox_needs_a_valid_reference():
    X, y = blobs()
    model = Model(ModelSpec("logistic", 4))
    with pytest.raises(ConfigError, match="needs the reference"):
        model.fit(X, y, prox_mu=0.1)
    with pytest.raises(ConfigError, match="5 finite values"):
        model.fit(X, y, prox_mu=0.1, reference=np.zeros(4))


def test_l2_shrinks_weights_but_not_the_bias():
    X, y = blobs()
    free, ridge = Model(ModelSpec("logistic", 4)), Model(ModelSpec("logistic", 4))
    free.fit(X, y, epochs=5, lr=0.1)
    ridge.fit(X, y, epochs=5, lr=0.1, l2=0.5)
    w_free, _ = free.layer(0)
    w_ridge, _ = ridge.layer(0)

    assert np.linalg.norm(w_ridge) < 0.6 * np.linalg.norm(w_free)


def test_balanced_class_weight_raises_minority_recall():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(2000, 2))
    y = (X[:, 0] + 0.8 * rng.normal(size=2000) > 1.6).astype(np.int64)  # about 8 % positives
    plain, balanced = Model(ModelSpec("logistic", 2)), Model(ModelSpec("logistic", 2))
    plain.fit(X, y, epochs=5, lr=0.1)
    balanced.fit(X, y, epochs=5, lr=0.1, class_weight="balanced")

    def recall(m: Model) -> float:
        return float(m.predict(X)[y == 1].mean())

    assert recall(balanced) > recall(plain) + 0.2


def test_sample_weight_scales_the_step():
    X, y = blobs()
    a, b = Model(ModelSpec("logistic", 4)), Model(ModelSpec("logistic", 4))
    a.fit(X, y, lr=0.1, sample_weight=np.full(len(y), 2.0), shuffle=False)
    b.fit(X, y, lr=0.2, shuffle=False)

    np.testing.assert_allclose(a.params, b.params, rtol=1e-5, atol=1e-6)
    with pytest.raises(TrainingError, match="sample_weight"):
        a.fit(X, y, sample_weight=-np.ones(len(y)))
    with pytest.raises(ConfigError, match="class_weight"):
        Model(ModelSpec("linear", 4)).fit(X, y.astype(float), class_weight="balanced")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"l2": -1.0}, "l2"),
        ({"prox_mu": float("inf")}, "prox_mu"),
        ({"lr_schedule": "optimal"}, "lr_schedule"),
        ({"epochs": 2.5}, "epochs"),
    ],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, key):
    X, y = blobs()
    with pytest.raises(ConfigError) as info:
        Model(ModelSpec("logistic", 4)).fit(X, y, **kwargs)
    assert info.value.key == key


def test_shape_and_kind_misuse_gets_clear_errors():
    X, y = blobs()
    model = Model(ModelSpec("logistic", 4))
    with pytest.raises(TrainingError, match=r"expected \(n >= 1, 4\)"):
        model.fit(X[:, :3], y)
    with pytest.raises(TrainingError, match="2-D"):
        model.fit(X[0], y[:1])
    with pytest.raises(TrainingError, match=r"y has shape \(399,\)"):
        model.fit(X, y[:-1])
    with pytest.raises(TrainingError, match="needs targets"):
        model.fit(X)
    with pytest.raises(TrainingError, match="score_samples needs an autoencoder"):
        model.score_samples(X)
    with pytest.raises(TrainingError, match="predict_proba needs a classifier"):
        Model(ModelSpec("linear", 4)).predict_proba(X)
    with pytest.raises(TrainingError, match="pass y=None"):
        Model(ModelSpec("autoencoder", 4, hidden=(2,))).fit(X, y)
    with pytest.raises(ConfigError, match="ModelSpec"):
        Model({"kind": "linear", "n_features": 4})  # type: ignore[arg-type]


def test_non_contiguous_lists_and_int_inputs_are_accepted():
    X, y = blobs()
    model = Model(ModelSpec("logistic", 4))
    Xf = np.asfortranarray(X)
    report = model.fit(Xf, y.tolist(), lr=0.1)
    assert report.samples_seen == len(y)
    assert model.predict(X.tolist()).shape == (len(y),)
    assert model.predict((X * 10).astype(np.int32)).dtype == np.int64


def test_clone_is_independent():
    X, y = blobs()
    model = Model(ModelSpec("mlp", 4, hidden=(3,)), seed=5)
    twin = model.clone()
    twin.fit(X, y, lr=0.1)
    model.fit(X, y, lr=0.1)
    np.testing.assert_array_equal(model.params, twin.params)  # same state, same result
    twin.fit(X, y, lr=0.1)
    assert not np.array_equal(model.params, twin.params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_predictions_follow_new_params_and_training(dtype):
    X, y = blobs()
    X = X.astype(dtype)
    model = Model(ModelSpec("logistic", 4))
    first = model.predict_proba(X)[:, 1]
    model.params = np.array([1.0, 2.0, 3.0, 4.0, 0.5])
    second = model.predict_proba(X)[:, 1]
    model.fit(X, y, lr=0.5)
    third = model.predict_proba(X)[:, 1]

    np.testing.assert_allclose(first, 0.5)
    np.testing.assert_allclose(second, 1 / (1 + np.exp(-(X.astype(np.float64) @ [1, 2, 3, 4] + 0.5))), rtol=1e-5)
    assert not np.allclose(second, third)


def test_changed_hyper_parameters_take_effect_between_calls():
    X, y = blobs()
    same, changed, direct = (Model(ModelSpec("logistic", 4), seed=2) for _ in range(3))
    same.fit(X, y, lr=0.1)
    same.fit(X, y, lr=0.1)
    changed.fit(X, y, lr=0.1)
    with pytest.raises(ConfigError):
        changed.fit(X, y, lr=-1.0)  # refused and not remembered
    changed.fit(X, y, lr=0.3, l2=0.01)
    direct.fit(X, y, lr=0.1)
    direct.fit(X, y, lr=0.3, l2=0.01)

    assert not np.array_equal(same.params, changed.params)
    np.testing.assert_array_equal(changed.params, direct.params)


def test_weighting_and_reference_inputs_are_validated():
    X, y = blobs()
    model = Model(ModelSpec("softmax", 4, n_outputs=3))
    bad = y.astype(np.float64)
    bad[5] = np.nan
    with pytest.raises(TrainingError, match="class labels must be integers"):
        model.fit(X, bad, class_weight="balanced")
    bad[5] = 7
    with pytest.raises(TrainingError, match=r"in \[0, 3\)"):
        model.fit(X, bad, class_weight="balanced")
    with pytest.raises(TrainingError, match="sample_weight must be numeric"):
        model.fit(X, y, sample_weight=["a"] * len(y))
    with pytest.raises(ConfigError, match="not a numeric vector"):
        model.fit(X, y, prox_mu=0.1, reference=["x"] * model.n_params)
    with pytest.raises(ConfigError, match="finite values"):
        model.fit(X, y, prox_mu=0.1, reference=np.full(model.n_params, 1e300))


def test_invscaling_counts_steps_across_calls():
    X, y = blobs(n=64)
    model = Model(ModelSpec("logistic", 4))
    model.fit(X, y, batch_size=64, lr=0.4, lr_schedule="invscaling", shuffle=False)
    before = model.params
    probe = Model(ModelSpec("logistic", 4))
    probe.params = before
    probe.fit(X, y, batch_size=64, lr=0.4 / 2**0.25, shuffle=False)

    model.fit(X, y, batch_size=64, lr=0.4, lr_schedule="invscaling", shuffle=False)

    assert model.steps == 2
    np.testing.assert_allclose(model.params, probe.params, rtol=1e-6, atol=1e-7)


def test_models_train_in_parallel_threads_like_in_sequence():
    import threading

    X, y = blobs(n=20_000)
    spec = ModelSpec("mlp", 4, hidden=(8,))
    sequential = [Model(spec, seed=s) for s in range(2)]
    for m in sequential:
        m.fit(X, y, epochs=2, lr=0.05)
    parallel = [Model(spec, seed=s) for s in range(2)]
    threads = [threading.Thread(target=m.fit, args=(X, y), kwargs={"epochs": 2, "lr": 0.05}) for m in parallel]

    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert not any(t.is_alive() for t in threads)
    for a, b in zip(sequential, parallel):
        np.testing.assert_array_equal(a.params, b.params)
