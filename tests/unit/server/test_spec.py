"""The federation model: size from the spec, seeded initial parameters built on demand."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedgate.core.errors import ConfigError
from fedgate.core.model import Model, ModelSpec
from fedgate.server.spec import load_model_spec

SPEC = {"kind": "mlp", "n_features": 6, "n_outputs": 1, "hidden": [5], "activation": "relu", "loss": "squared"}


def test_initial_params_are_the_seeded_model_and_a_new_array_each_time():
    model = load_model_spec(SPEC, seed=7)
    expected = Model(ModelSpec.from_dict(dict(SPEC)), seed=7).params
    a, b = model.initial_params(), model.initial_params()
    assert model.n_params == expected.size == 6 * 5 + 5 + 5 + 1
    assert a.dtype == np.float32 and a.shape == (model.n_params,) and a.flags.c_contiguous
    np.testing.assert_array_equal(a, expected)
    np.testing.assert_array_equal(b, expected)
    a[:] = 0.0  # the caller owns it: the next one is untouched
    assert a is not b and np.array_equal(model.initial_params(), expected)
    assert not np.array_equal(load_model_spec(SPEC, seed=8).initial_params(), expected)


def test_the_model_keeps_no_parameter_vector():
    model = load_model_spec(SPEC, seed=0)
    held = [getattr(model, f.name) for f in dataclasses.fields(model)]
    assert not any(isinstance(v, np.ndarray) for v in held)


def test_a_bad_spec_is_refused_when_loaded():
    with pytest.raises(ConfigError, match="federation.model"):
        load_model_spec({**SPEC, "hidden": [0]}, seed=0, file="server.toml")
