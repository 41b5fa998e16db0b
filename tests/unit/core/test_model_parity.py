"""Learning parity with scikit-learn, and problems a linear model cannot solve."""
from __future__ import annotations

import numpy as np
from sklearn.datasets import make_classification, make_regression
from sklearn.linear_model import LogisticRegression, SGDClassifier, SGDRegressor
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fedgate.core import Model, ModelSpec


def split(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_test), y_train, y_test


def test_logistic_accuracy_within_one_point_of_sgdclassifier():
    X, y = make_classification(n_samples=6000, n_features=20, n_informative=8, flip_y=0.05, random_state=1)
    X_train, X_test, y_train, y_test = split(X, y)
    ours = Model(ModelSpec("logistic", 20), seed=0)
    theirs = SGDClassifier(loss="log_loss", max_iter=5, tol=None, random_state=0)

    ours.fit(X_train, y_train, epochs=5, batch_size=16, lr=0.05, l2=1e-4)
    theirs.fit(X_train, y_train)

    acc_ours = (ours.predict(X_test) == y_test).mean()
    acc_theirs = theirs.score(X_test, y_test)
    assert acc_ours >= acc_theirs - 0.01, (acc_ours, acc_theirs)
    assert acc_ours > 0.8


def test_linear_r2_within_0_01_of_sgdregressor():
    X, y = make_regression(n_samples=5000, n_features=15, n_informative=10, noise=20.0, random_state=2)
    X_train, X_test, y_train, y_test = split(X, y)
    scale = y_train.std()
    ours = Model(ModelSpec("linear", 15), seed=0)
    theirs = SGDRegressor(max_iter=5, tol=None, random_state=0)

    ours.fit(X_train, y_train / scale, epochs=5, batch_size=16, lr=0.02, lr_schedule="invscaling")
    theirs.fit(X_train, y_train / scale)

    r2_ours = r2_score(y_test, ours.predict(X_test) * scale)
    r2_theirs = r2_score(y_test, theirs.predict(X_test) * scale)
    assert r2_ours >= r2_theirs - 0.01, (r2_ours, r2_theirs)
    assert r2_ours > 0.8


def test_huber_resists_outliers_better_than_squared():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(3000, 3))
    y = X @ np.array([1.0, -2.0, 0.5])
    y_dirty = y.copy()
    y_dirty[rng.choice(3000, 150, replace=False)] += 50.0
    squared, huber = Model(ModelSpec("linear", 3)), Model(ModelSpec("linear", 3, loss="huber"))

    squared.fit(X, y_dirty, epochs=10, lr=0.01)
    huber.fit(X, y_dirty, epochs=10, lr=0.01)

    def err(m: Model) -> float:
        return float(np.abs(m.predict(X) - y).mean())

    assert err(huber) < 0.5 * err(squared)


def test_softmax_accuracy_within_one_point_of_logistic_regression():
    X, y = make_classification(n_samples=6000, n_features=12, n_informative=8, n_classes=4,
                               n_clusters_per_class=1, random_state=4)
    X_train, X_test, y_train, y_test = split(X, y)
    ours = Model(ModelSpec("softmax", 12, n_outputs=4), seed=0)
    theirs = LogisticRegression(max_iter=500)

    ours.fit(X_train.astype(np.float32), y_train, epochs=20, batch_size=16, lr=0.02)
    theirs.fit(X_train, y_train)

    acc_ours = (ours.predict(X_test.astype(np.float32)) == y_test).mean()
    acc_theirs = theirs.score(X_test, y_test)
    assert acc_ours >= acc_theirs - 0.01, (acc_ours, acc_theirs)


def test_mlp_learns_xor_that_a_linear_model_cannot():
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, size=(4000, 2)).astype(np.float32)
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(np.int64)
    X_test = rng.uniform(-1, 1, size=(2000, 2)).astype(np.float32)
    y_test = ((X_test[:, 0] > 0) ^ (X_test[:, 1] > 0)).astype(np.int64)
    mlp = Model(ModelSpec("mlp", 2, hidden=(16,), activation="tanh"), seed=0)
    linear = Model(ModelSpec("logistic", 2), seed=0)

    mlp.fit(X, y, epochs=40, batch_size=16, lr=0.2)
    linear.fit(X, y, epochs=40, batch_size=16, lr=0.2)

    assert (mlp.predict(X_test) == y_test).mean() > 0.93
    assert (linear.predict(X_test) == y_test).mean() < 0.65


def test_two_hidden_layer_relu_mlp_regresses_a_nonlinear_target():
    rng = np.random.default_rng(6)
    X = rng.uniform(-2, 2, size=(4000, 2))
    y = np.sin(X[:, 0]) * X[:, 1]
    mlp = Model(ModelSpec("mlp", 2, hidden=(24, 12), loss="squared"), seed=1)
    linear = Model(ModelSpec("linear", 2))

    mlp.fit(X, y, epochs=40, batch_size=16, lr=0.05)
    linear.fit(X, y, epochs=40, batch_size=16, lr=0.05)

    assert r2_score(y, mlp.predict(X)) > 0.9
    assert r2_score(y, linear.predict(X)) < 0.2


def test_autoencoder_separates_an_anomaly_cluster():
    rng = np.random.default_rng(7)
    basis = rng.normal(size=(2, 8))
    normal = rng.normal(size=(3000, 2)) @ basis + 0.05 * rng.normal(size=(3000, 8))
    test_normal = rng.normal(size=(500, 2)) @ basis + 0.05 * rng.normal(size=(500, 8))
    # anomalies: same scale, but off the 2-D subspace the normal data lives on
    anomalies = rng.normal(size=(50, 8)) * normal.std(axis=0)
    model = Model(ModelSpec("autoencoder", 8, hidden=(6, 2), activation="tanh"), seed=0)

    model.fit(normal, epochs=30, batch_size=16, lr=0.02)

    scores = model.score_samples(np.vstack([test_normal, anomalies]))
    labels = np.r_[np.zeros(500), np.ones(50)]
    assert roc_auc_score(labels, scores) > 0.95
