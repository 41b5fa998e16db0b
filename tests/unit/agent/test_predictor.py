"""The predictor: scores per model kind, scaler and column mapping, writes, hysteresis."""
from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import numpy as np
import pytest

from fedgate.agent.config import PredictConfig
from fedgate.agent.predictor import Alarm, Predictor
from fedgate.core.errors import DriverError
from fedgate.core.model import Model, ModelSpec


def _model(kind: str, features: list[str], params: np.ndarray | None = None, scaler=None, **spec_kw):
    spec = ModelSpec(kind, n_features=len(features), **spec_kw)
    if params is None:
        params = Model(spec, seed=1).params
    return SimpleNamespace(round=5, spec=spec.to_dict(), features=features, label="y", scaler=scaler,
                           params=np.asarray(params, np.float32))


def test_alarm_hysteresis_sequence():
    a = Alarm(0.5, 0.2)
    seq = [0.1, 0.5, 0.31, 0.4, 0.29, 0.49, 0.5]
    assert [a.update(s) for s in seq] == [False, True, True, True, False, False, True]


def test_logistic_score_uses_the_scaler_and_maps_columns_by_name():
    # model over (b, a): p = sigmoid(2 * (b - 10) / 2 + 0 * a)
    m = _model("logistic", ["b", "a"], params=[2.0, 0.0, 0.0], scaler={"mean": [10.0, 0.0], "std": [2.0, 0.0]})
    p = Predictor(PredictConfig(), ["a", "b", "c"])
    assert p.set_model(m) and p.state.model_round == 5
    s = p.score(np.array([99.0, 12.0, -1.0]))
    assert s == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-5)


def test_regression_multiclass_and_autoencoder_scores():
    feats = ["a", "b"]
    lin = _model("linear", feats, params=[1.0, 2.0, 0.5])
    p = Predictor(PredictConfig(), feats)
    p.set_model(lin)
    assert p.score(np.array([1.0, 1.0])) == pytest.approx(3.5)
    soft = _model("softmax", feats, params=[0, 0, 0, 0, 0, 0, 0, 0, 5], n_outputs=3)
    p.set_model(soft)
    assert p.score(np.array([1.0, 1.0])) == 2.0
    ae = _model("autoencoder", feats, hidden=(2,))
    p.set_model(ae)
    x = np.array([[1.0, -1.0]], np.float32)
    ref = Model(ModelSpec.from_dict(ae.spec))
    ref.params = ae.params
    assert p.score(x[0]) == pytest.approx(float(ref.score_samples(x)[0]), rel=1e-5)


def test_an_unusable_model_keeps_the_previous_one():
    p = Predictor(PredictConfig(), ["a"])
    assert p.score(np.array([1.0])) is None and p.state.no_model == 1
    good = _model("linear", ["a"], params=[1.0, 0.0])
    assert p.set_model(good)
    bad = _model("linear", ["a"], params=[1.0, 0.0, 0.0])  # wrong size
    assert not p.set_model(bad) and p.state.errors == 1
    assert p.score(np.array([3.0])) == pytest.approx(3.0)
    missing = _model("linear", ["zz"], params=[1.0, 0.0])
    assert p.set_model(missing) and not p.has_model  # mapped to nothing: no scores
    assert p.score(np.array([3.0])) is None


def test_handle_writes_the_score_and_the_alarm_once_per_change_and_retries_failures():
    writes: list[tuple[str, object]] = []
    fail = {"n": 1}

    async def write(tag, value):
        if tag == "m.alarm" and fail["n"]:
            fail["n"] -= 1
            raise DriverError("no answer")
        writes.append((tag, value))

    cfg = PredictConfig(write_tag="m.pred", alarm_threshold=5.0, hysteresis=1.0, alarm_tag="m.alarm")
    p = Predictor(cfg, ["a"], write=write)
    p.set_model(_model("linear", ["a"], params=[1.0, 0.0]))

    async def run():
        for i, x in enumerate([1.0, 6.0, 4.5, 3.9, 4.0]):
            await p.handle(float(i), np.array([x]))

    asyncio.run(run())
    assert [w[1] for w in writes if w[0] == "m.pred"] == pytest.approx([1.0, 6.0, 4.5, 3.9, 4.0], rel=1e-6)
    # first alarm write (False) failed and was retried with the next score
    assert [w for w in writes if w[0] == "m.alarm"] == [("m.alarm", True), ("m.alarm", False)]
    assert p.state.write_errors == 1 and p.state.predictions == 5 and p.state.alarm is False
