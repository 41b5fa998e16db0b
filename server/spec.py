"""The federation's model: its spec (``ModelSpec`` dict), parameter count, initial vector.

Uses :class:`fedgate.core.model.ModelSpec` / ``Model`` for validation, size and the
seeded initial parameters when that module is available; otherwise a validated
dict with the same layout rules (one flat float32 vector: each layer's weights
then its biases).

The initial vector is built from the spec and the seed when asked for, not kept: the
server takes it once at start, and a model-sized copy held for the daemon's lifetime
would only add to its resident set.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedgate.core.errors import ConfigError

__all__ = ["FederationModel", "load_model_spec"]

_KINDS = ("linear", "logistic", "softmax", "mlp", "autoencoder")


@dataclass(frozen=True)
class FederationModel:
    """The model every agent trains.

    Attributes
    ----------
    spec : dict
        ``ModelSpec.to_dict()``, sent in welcome, task and model messages.
    n_params : int
        Length D of the flat float32 parameter vector.
    """

    spec: dict[str, Any]
    n_params: int
    _build: Callable[[], np.ndarray] = field(repr=False, compare=False)

    def initial_params(self) -> np.ndarray:
        """The seeded initial parameters, float32 of shape (D,): a new array, built from the
        spec and the seed at each call (the same values every time)."""
        params = self._build()
        if params.shape != (self.n_params,):  # the builders below keep to the spec's size
            raise ConfigError(f"the initial parameters have shape {params.shape}, expected ({self.n_params},)",
                              key="federation.model", value=self.spec)
        return params


def _layer_dims(spec: dict[str, Any], file: str | None) -> list[int]:
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"must be one of {', '.join(_KINDS)}", file=file, key="federation.model.kind", value=kind)

    def _pos_int(name: str, default: int | None) -> int:
        v = spec.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > 1 << 24:
            raise ConfigError("expected a positive integer", file=file, key=f"federation.model.{name}", value=v)
        return v

    n_in = _pos_int("n_features", None)
    n_out = _pos_int("n_outputs", 1)
    hidden = spec.get("hidden", [])
    if not isinstance(hidden, (list, tuple)) or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                                    for h in hidden):
        raise ConfigError("expected a list of positive integers", file=file, key="federation.model.hidden",
                          value=hidden)
    if kind in ("mlp", "autoencoder"):
        if not 1 <= len(hidden) <= 2:
            raise ConfigError("mlp and autoencoder take 1 or 2 hidden layers", file=file,
                              key="federation.model.hidden", value=hidden)
        out = n_in if kind == "autoencoder" else n_out
        return [n_in, *hidden, out]
    return [n_in, n_out]


def load_model_spec(table: dict[str, Any], *, seed: int = 0, file: str | None = None) -> FederationModel:
    """Validate the ``[federation.model]`` table; the initial parameters are built when asked for."""
    try:
        from fedgate.core.model import Model, ModelSpec  # noqa: PLC0415 - optional until the model lands
    except ImportError:
        Model = ModelSpec = None  # noqa: N806
    if ModelSpec is not None:
        try:
            spec = ModelSpec.from_dict(dict(table))
        except ConfigError as exc:
            raise ConfigError(f"invalid model spec: {exc}", file=file, key="federation.model", value=table) from exc
        model_cls = Model

        def build_model() -> np.ndarray:
            return np.ascontiguousarray(model_cls(spec, seed=seed).params, dtype=np.float32)

        return FederationModel(spec.to_dict(), int(spec.n_params), build_model)
    spec_dict = dict(table)
    dims = _layer_dims(spec_dict, file)

    def build_layers() -> np.ndarray:
        rng = np.random.default_rng(seed)
        parts = []
        for a, b in zip(dims[:-1], dims[1:]):
            if len(dims) > 2:
                parts.append((rng.standard_normal(a * b) * np.sqrt(2.0 / a)).astype(np.float32))
            else:
                parts.append(np.zeros(a * b, dtype=np.float32))
            parts.append(np.zeros(b, dtype=np.float32))
        return np.concatenate(parts).astype(np.float32, copy=False)

    return FederationModel(spec_dict, sum(a * b + b for a, b in zip(dims[:-1], dims[1:])), build_layers)
