"""The trainer: exact metrics vs scikit-learn, and every task kind on a real store."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from fedgate.agent.config import Agg, FeatureConfig, LabelConfig, SamplesConfig
from fedgate.agent.evaluation import accuracy, f1_score, mean_absolute_error, r2_score, roc_auc
from fedgate.agent.store import Store
from fedgate.agent.trainer import Trainer, feature_stats, scale_features, split_holdout
from fedgate.agent.uplink_types import GlobalModel, Task
from fedgate.core.errors import TrainingError
from fedgate.core.model import Model, ModelSpec


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    score = np.round(rng.random(n) + 0.3 * y, 1 if seed % 2 else 6)  # seeds with many ties
    pred = (score >= 0.6).astype(int)
    assert accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert f1_score(y, pred) == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-12)
    assert roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    k = 4
    yk, pk = rng.integers(0, k, n), rng.integers(0, k, n)
    assert f1_score(yk, pk, n_classes=k) == pytest.approx(
        skm.f1_score(yk, pk, average="macro", labels=np.union1d(yk, pk), zero_division=0), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_regression_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=50)
    p = y + rng.normal(scale=0.5, size=50)
    assert mean_absolute_error(y, p) == pytest.approx(skm.mean_absolute_error(y, p), abs=1e-12)
    assert r2_score(y, p) == pytest.approx(skm.r2_score(y, p), abs=1e-12)
    const = np.full(10, 2.0)
    assert r2_score(const, const) == skm.r2_score(const, const) == 1.0
    assert r2_score(const, const + 1) == skm.r2_score(const, const + 1) == 0.0


def test_degenerate_metrics():
    assert np.isnan(roc_auc(np.zeros(5), np.arange(5.0)))
    assert f1_score(np.zeros(4), np.zeros(4)) == 0.0


def test_feature_stats_and_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, (200, 4)).astype(np.float32)
    n, mean, m2 = feature_stats(x)
    assert n == 200
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(m2, x.astype(np.float64).var(0) * 200)
    z = scale_features(x, {"mean": mean.tolist(), "std": [1.0, 2.0, 0.0, 4.0]})
    np.testing.assert_allclose(z[:, 2], x[:, 2] - mean[2], rtol=1e-5)  # std 0 divides by 1
    with pytest.raises(TrainingError):
        scale_features(x, {"mean": [0.0], "std": [1.0]})


def test_holdout_is_the_most_recent_part_with_a_gap_against_leakage():
    ts = np.arange(100, dtype=float) * 10.0
    train, val = split_holdout(ts, 0.2, gap_s=35.0)
    assert val.tolist() == list(range(80, 100))
    # first held-out row at t=800: training rows must end at or before 765 -> rows <= 76
    assert train.tolist() == list(range(0, 77))
    train, val = split_holdout(ts[:5], 0.2, gap_s=35.0)
    assert val.size == 0 and train.size == 5


FEATURES = ("a", "b", "c")


def _cfg(horizon: float = 20.0) -> SamplesConfig:
    return SamplesConfig(grid_s=1, window_s=10, hop_s=10,
                         features=tuple(FeatureConfig(name=f, tag=f"m.{f}", agg=Agg.MEAN) for f in FEATURES),
                         label=LabelConfig(name="fault", tag="m.f", agg=Agg.MAX, horizon_s=horizon))


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(1)
    n = 600
    x = rng.normal(size=(n, 3)) * [1.0, 5.0, 0.1] + [0.0, 50.0, 3.0]
    logit = 2.0 * x[:, 0] + 0.4 * (x[:, 1] - 50) - 1.0
    y = (logit + rng.logistic(size=n) * 0.3 > 0).astype(float)
    st = Store(tmp_path / "agent.db")
    st.add_samples([(10.0 * i, x[i], y[i]) for i in range(n)], list(FEATURES))
    yield st
    st.close()


def _task(kind: str, *, features=("a", "b", "c"), spec=None, scaler="auto", hyper=None, store=None, label="fault"):
    if scaler == "auto":
        data = store.load_samples(list(features))
        scaler = {"mean": data.x.mean(0).tolist(), "std": data.x.std(0).tolist()}
    return Task(task_id="0" * 32, round=3, kind=kind, deadline_s=60.0,
                spec=spec or ModelSpec("logistic", n_features=len(features)).to_dict(),
                features=list(features), label=label, scaler=scaler,
                hyper=hyper or {"epochs": 5, "batch_size": 16, "lr": 0.1, "lr_schedule": "constant",
                                "l2": 0.0, "prox_mu": 0.0})


def test_statistics_task_reports_count_mean_m2_in_the_tasks_order(store):
    tr = Trainer(store, _cfg())
    out = tr.run_task(_task("statistics", features=("c", "a"), scaler=None), None)
    data = store.load_samples(["c", "a"])
    count, mean, m2 = out.stats
    assert count == out.n_samples == 600
    np.testing.assert_allclose(mean, data.x.astype(np.float64).mean(0))
    np.testing.assert_allclose(m2, data.x.astype(np.float64).var(0) * 600)
    assert tr.state.last_round == 3 and tr.state.last_kind == "statistics"


def test_train_task_learns_and_reports_validation_metrics(store):
    tr = Trainer(store, _cfg())
    init = Model(ModelSpec("logistic", n_features=3)).params
    out = tr.run_task(_task("train", store=store), init)
    m = out.metrics
    assert out.params.dtype == np.float32 and out.params.shape == init.shape
    # 600 rows, 120 held out, (10 + 20) s gap before them at 10 s spacing -> 3 rows dropped
    assert m["n_val"] == 120 and m["n_train"] == 477 and out.n_samples == 477
    assert m["val_accuracy"] > 0.85 and m["val_roc_auc"] > 0.9 and 0 < m["val_f1"] <= 1
    assert {"loss", "val_loss"} <= set(m) and "accuracy" not in m  # training rows: loss only


def test_fedprox_keeps_the_update_near_the_global_model(store):
    init = Model(ModelSpec("logistic", n_features=3)).params
    hyper = {"epochs": 3, "batch_size": 16, "lr": 0.05, "lr_schedule": "constant", "l2": 0.0}
    plain = Trainer(store, _cfg()).run_task(_task("train", store=store, hyper={**hyper, "prox_mu": 0.0}), init)
    prox = Trainer(store, _cfg()).run_task(_task("train", store=store, hyper={**hyper, "prox_mu": 5.0}), init)
    assert np.linalg.norm(prox.params - init) < 0.5 * np.linalg.norm(plain.params - init)
    with pytest.raises(TrainingError, match="FedProx"):
        Trainer(store, _cfg()).run_task(_task("train", store=store, hyper={**hyper, "prox_mu": 1.0}), None)


def test_regression_train_reports_mae_and_r2(store):
    spec = ModelSpec("linear", n_features=3).to_dict()
    out = Trainer(store, _cfg()).run_task(_task("train", store=store, spec=spec), None)
    assert {"val_mae", "val_r2", "val_loss"} <= set(out.metrics)


def test_evaluate_scores_the_global_or_the_stored_model(store):
    tr = Trainer(store, _cfg())
    trained = tr.run_task(_task("train", store=store), None).params
    ev = tr.run_task(_task("evaluate", store=store), trained)
    assert ev.params is None and ev.n_samples == 600 and ev.metrics["accuracy"] > 0.85
    with pytest.raises(TrainingError, match="no global model"):
        tr.run_task(_task("evaluate", store=store), None)
    seen = []
    tr.on_global_model = seen.append
    tr.on_model(GlobalModel(round=4, spec=ModelSpec("logistic", n_features=3).to_dict(), features=list(FEATURES),
                            label="fault", scaler=None, params=trained))
    assert seen and store.load_model().round == 4 and tr.state.model_round == 4
    assert tr.run_task(_task("evaluate", store=store), None).metrics == ev.metrics


def test_features_it_cannot_produce_are_named(store):
    tr = Trainer(store, _cfg())
    assert tr.hello_info().features == list(FEATURES) and tr.hello_info().n_samples == 600
    with pytest.raises(TrainingError, match="cannot produce the features zz"):
        tr.run_task(_task("statistics", features=("a", "zz"), scaler=None), None)
    assert tr.state.tasks_failed == 1
    with pytest.raises(TrainingError, match="label 'energy'"):
        tr.run_task(_task("train", store=store, label="energy"), None)


def test_block_wise_reading_gives_the_same_statistics_and_evaluation_and_still_learns(store):
    whole, blocks = Trainer(store, _cfg()), Trainer(store, _cfg(), block_rows=37)
    a = whole.run_task(_task("statistics", scaler=None), None)
    b = blocks.run_task(_task("statistics", scaler=None), None)
    assert a.stats[0] == b.stats[0] == 600
    np.testing.assert_allclose(a.stats[1], b.stats[1], rtol=1e-12)
    np.testing.assert_allclose(a.stats[2], b.stats[2], rtol=1e-10)
    trained = blocks.run_task(_task("train", store=store), None)
    assert trained.metrics["val_accuracy"] > 0.85 and trained.metrics["n_train"] == 477
    ea = whole.run_task(_task("evaluate", store=store), trained.params).metrics
    eb = blocks.run_task(_task("evaluate", store=store), trained.params).metrics
    assert ea.keys() == eb.keys() and all(ea[k] == pytest.approx(eb[k], rel=1e-6) for k in ea)
