"""ModelSpec: defaults, validation naming the field, exact dict round trips, layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgate.core import ConfigError, Model, ModelKind, ModelSpec
from fedgate.core.model import MAX_PARAMS, Activation, Loss

SPECS = [
    ModelSpec("linear", 5),
    ModelSpec("linear", 5, n_outputs=3, loss="huber"),
    ModelSpec("logistic", 7),
    ModelSpec("softmax", 4, n_outputs=6),
    ModelSpec("mlp", 3, hidden=(8,)),
    ModelSpec("mlp", 3, n_outputs=4, hidden=(8, 5), activation="tanh"),
    ModelSpec("mlp", 3, n_outputs=2, hidden=[6], loss="squared"),
    ModelSpec("mlp", 3, hidden=(6, 2), loss="huber", activation="tanh"),
    ModelSpec("autoencoder", 9, hidden=(4,)),
    ModelSpec("autoencoder", 9, hidden=(6, 3), activation="tanh", loss="huber"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind.value}-{s.loss.value}-{len(s.hidden)}")
def test_dict_round_trip_is_exact_through_json(spec):
    data = json.loads(json.dumps(spec.to_dict()))

    again = ModelSpec.from_dict(data)

    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert hash(again) == hash(spec)


def test_strings_become_str_enums_and_defaults_resolve():
    spec = ModelSpec("mlp", 4, hidden=[3])

    assert spec.kind is ModelKind.MLP and isinstance(spec.kind, str)
    assert spec.activation is Activation.RELU
    assert spec.loss is Loss.LOG
    assert spec.hidden == (3,)
    assert ModelSpec("linear", 2).loss is Loss.SQUARED
    assert ModelSpec("autoencoder", 6, hidden=(2,)).loss is Loss.SQUARED
    assert ModelSpec("autoencoder", 6, hidden=(2,)).n_outputs == 6


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"kind": "svm", "n_features": 3}, "kind", "one of"),
        ({"kind": "linear", "n_features": 0}, "n_features", "in [1"),
        ({"kind": "linear", "n_features": True}, "n_features", "integer"),
        ({"kind": "linear", "n_features": 2.0}, "n_features", "integer"),
        ({"kind": "linear", "n_features": 2, "n_outputs": 0}, "n_outputs", "in [1"),
        ({"kind": "logistic", "n_features": 2, "n_outputs": 2}, "n_outputs", "exactly 1"),
        ({"kind": "softmax", "n_features": 2, "n_outputs": 1}, "n_outputs", "2 classes"),
        ({"kind": "linear", "n_features": 2, "hidden": [4]}, "hidden", "no hidden"),
        ({"kind": "mlp", "n_features": 2}, "hidden", "1 or 2"),
        ({"kind": "mlp", "n_features": 2, "hidden": [4, 4, 4]}, "hidden", "1 or 2"),
        ({"kind": "mlp", "n_features": 2, "hidden": [4, 0]}, "hidden[1]", "in [1"),
        ({"kind": "mlp", "n_features": 2, "hidden": "8"}, "hidden", "list"),
        ({"kind": "mlp", "n_features": 2, "hidden": [4], "activation": "sigmoid"}, "activation", "one of"),
        ({"kind": "linear", "n_features": 2, "loss": "log"}, "loss", "takes loss"),
        ({"kind": "logistic", "n_features": 2, "loss": "squared"}, "loss", "takes loss"),
        ({"kind": "linear", "n_features": 2, "loss": "hinge"}, "loss", "one of"),
        ({"kind": "autoencoder", "n_features": 2, "hidden": [3], "loss": "log"}, "loss", "takes loss"),
        ({"kind": "mlp", "n_features": 60000, "hidden": [4000, 4000]}, "hidden", "parameters"),
        ({"n_features": 2}, "kind", "required"),
        ({"kind": "linear"}, "n_features", "required"),
    ],
)
def test_invalid_specs_name_the_field(data, key, words):
    with pytest.raises(ConfigError) as info:
        ModelSpec.from_dict(data, file="server.toml", key="model")

    assert info.value.key == f"model.{key}"
    assert info.value.file == "server.toml"
    assert words in str(info.value)
    assert str(info.value).startswith(f"server.toml: model.{key}")


def test_unknown_keys_and_non_tables_are_refused():
    with pytest.raises(ConfigError, match=r"unknown model field\(s\) \['layers'\]"):
        ModelSpec.from_dict({"kind": "linear", "n_features": 2, "layers": 3})
    with pytest.raises(ConfigError, match="must be a table"):
        ModelSpec.from_dict(["linear", 2])  # type: ignore[arg-type]


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError) as info:
        ModelSpec("mlp", 3, hidden=(2,), activation="gelu")
    assert info.value.key == "activation"
    assert info.value.value == "gelu"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind.value}-{len(s.hidden)}")
def test_layout_tiles_the_flat_vector(spec):
    layout = spec.layout()
    sizes = spec.sizes

    covered = 0
    for i, sl in enumerate(layout):
        assert sl.weight_offset == covered
        assert sl.weight_shape == (sizes[i + 1], sizes[i])
        assert sl.bias_offset == sl.weight_offset + sizes[i] * sizes[i + 1]
        covered = sl.bias_offset + sl.bias_size
    assert covered == spec.n_params


def test_layer_views_share_memory_with_the_vector_and_are_read_only():
    model = Model(ModelSpec("mlp", 3, n_outputs=2, hidden=(4,)), seed=1)
    flat = np.arange(model.n_params, dtype=np.float32)
    model.params = flat

    w0, b0 = model.layer(0)
    w1, b1 = model.layer(1)

    assert w0.shape == (4, 3) and b0.shape == (4,) and w1.shape == (2, 4) and b1.shape == (2,)
    np.testing.assert_array_equal(np.concatenate([w0.ravel(), b0, w1.ravel(), b1]), flat)
    with pytest.raises(ValueError):
        w0[0, 0] = 1.0
    model.params = flat + 1
    assert w0[0, 0] == 1.0  # a view, not a copy


def test_docstring_examples_run():
    import doctest

    import fedgate.core.model as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)

    assert result.attempted >= 4
    assert result.failed == 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70_000) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_field_values = {
    "kind": st.sampled_from([k.value for k in ModelKind]) | _json_values,
    "n_features": st.integers(-2, 70_000) | _json_values,
    "n_outputs": st.integers(-2, 5_000) | _json_values,
    "hidden": st.lists(st.integers(-1, 5_000), max_size=3) | _json_values,
    "activation": st.sampled_from(["relu", "tanh"]) | _json_values,
    "loss": st.sampled_from(["squared", "huber", "log", None]) | _json_values,
}


def test_a_wide_autoencoder_survives_its_own_round_trip():
    spec = ModelSpec.from_dict({"kind": "autoencoder", "n_features": 4097, "hidden": [1]})
    assert spec.n_outputs == 4097 and spec.to_dict()["n_outputs"] == 4097
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries({}, optional=_field_values),
    st.dictionaries(st.text(min_size=1, max_size=6), _json_values, max_size=1),
)
def test_from_dict_on_hostile_input_returns_a_valid_spec_or_a_config_error(data, extra):
    if extra and not set(extra) & set(_field_values):
        data = {**data, **extra}
    try:
        spec = ModelSpec.from_dict(data)
    except ConfigError as exc:
        assert exc.key or "unknown model field" in str(exc)
        return
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert 1 <= spec.n_params <= MAX_PARAMS
