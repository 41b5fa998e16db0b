"""ResultEncoder.store: what it refuses before anything reaches the outbox or the wire."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from fedgate.agent.outbox import Outbox
from fedgate.agent.uplink_types import Task, TaskOutcome
from fedgate.agent.uplink_work import ResultEncoder
from fedgate.core import codec
from fedgate.core.errors import TrainingError



def make_task(round_: int, codec_name: str) -> Task:
    return Task(task_id=uuid.uuid4().hex, round=round_, kind="train", deadline_s=30.0, spec={},
                features=["a"], label="y", scaler=None, hyper={}, codec=codec_name,
                codec_params={"k": 0.1} if codec_name == "topk" else {})


@pytest.fixture
def encoder(tmp_path):
    box = Outbox(tmp_path / "state.db")
    yield ResultEncoder("gw001", box)
    box.close()


@pytest.mark.parametrize("codec_name", ["f32", "f16", "q8", "topk"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_params_are_refused_and_nothing_is_stored(encoder, codec_name, bad):
    glob = np.zeros(300, dtype=np.float32)
    params = glob + 1
    params[137] = bad
    with pytest.raises(TrainingError, match=r"cannot encode with .*non-finite value: vec\[137\]"):
        encoder.store(make_task(3, codec_name), TaskOutcome(n_samples=5, metrics={}, params=params), glob)
    assert encoder.outbox.count() == 0


@pytest.mark.parametrize("codec_name", ["f32", "f16", "q8", "topk"])
def test_finite_params_are_stored_once_and_decode_back(encoder, codec_name):
    glob = np.zeros(300, dtype=np.float32)
    params = np.linspace(-2, 2, 300, dtype=np.float32)
    entry = encoder.store(make_task(3, codec_name), TaskOutcome(n_samples=5, metrics={"loss": 0.5}, params=params),
                          glob)
    assert encoder.outbox.count() == 1 and entry.fields["n_samples"] == 5
    got = codec.decode(entry.payload)
    tol = {"f32": 0, "f16": 2e-3, "q8": 0.02, "topk": 2.0}[codec_name]
    assert got.shape == (300,)
    if codec_name != "topk":
        np.testing.assert_allclose(got, params, atol=tol)
