"""Models: a :class:`ModelSpec` plus ONE contiguous float32 parameter vector.

Parameter layout
----------------
Every kind is a chain of dense layers with sizes ``(n_features, *hidden, n_outputs)``.
The flat vector holds, layer after layer, the weight matrix ``W_l`` of shape
``(fan_out, fan_in)`` in row-major order followed by the bias ``b_l`` of shape
``(fan_out,)`` (the orientation of scikit-learn's ``coef_``).  ``ModelSpec.layout()``
gives the offsets; ``Model.layer(i)`` gives read-only views into the vector.

Losses and links
----------------
- ``linear``: identity output, ``squared`` (0.5 r^2) or ``huber`` (delta 1.0) loss.
- ``logistic``: one sigmoid output, log loss, ``y`` in {0, 1}.
- ``softmax``: ``n_outputs`` >= 2 classes, cross-entropy, ``y`` integer class ids.
- ``mlp``: 1-2 hidden layers (``relu``/``tanh``); loss ``log`` is classification
  (sigmoid when ``n_outputs == 1``, softmax otherwise), ``squared``/``huber`` regression.
- ``autoencoder``: an identity-output MLP trained to reproduce its input
  (``n_outputs == n_features``); ``score_samples`` is the reconstruction error.

The per-sample loss sums over outputs; a mini-batch step uses the gradient averaged
over the batch rows (weighted by ``sample_weight``/``class_weight``), plus ``l2 * W``
(weights only, not biases) and the FedProx term ``prox_mu * (w - reference)``.
``lr_schedule="invscaling"`` uses ``lr / (t + 1) ** 0.25`` where ``t`` counts the
model's optimisation steps (mini-batches) over all ``fit`` calls (:attr:`Model.steps`).

Precision and failures
----------------------
The dtype of ``X`` sets the working precision: float32 input trains in float32,
anything else in float64 (the stored vector is float32 either way). The compiled
loop is fused over both, because converting float64 input to float32 first costs a
full copy of ``X`` per call (``benchmarks/bench_sgd.py``, column ``f64->f32+fit``).
Training runs on a work copy that is written back only on success: NaN/Inf in ``X``
or ``y``, invalid labels and divergence raise :class:`TrainingError` and leave the
model as it was.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from enum import Enum
from typing import Any

import numpy as np

from fedgate.core.errors import ConfigError, TrainingError

try:
    from fedgate.core import _sgd
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "fedgate.core._sgd is not compiled; build it with "
        "`python setup.py build_ext --inplace` (or `pip install -e .`) in the fedgate checkout"
    ) from exc

__all__ = ["ModelKind", "Activation", "Loss", "LrSchedule", "LayerSlice", "ModelSpec", "FitReport", "Model"]

MAX_FEATURES = 1 << 16
MAX_WIDTH = 1 << 12
MAX_PARAMS = 1 << 24
POWER_T = 0.25

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_EMPTY_F32 = np.empty(0, np.float32)
_EMPTY_F64 = np.empty(0, np.float64)


class ModelKind(str, Enum):
    LINEAR = "linear"
    LOGISTIC = "logistic"
    SOFTMAX = "softmax"
    MLP = "mlp"
    AUTOENCODER = "autoencoder"


class Activation(str, Enum):
    RELU = "relu"
    TANH = "tanh"


class Loss(str, Enum):
    SQUARED = "squared"
    HUBER = "huber"
    LOG = "log"


class LrSchedule(str, Enum):
    CONSTANT = "constant"
    INVSCALING = "invscaling"


_LOSSES_OF: dict[ModelKind, tuple[Loss, ...]] = {
    ModelKind.LINEAR: (Loss.SQUARED, Loss.HUBER),
    ModelKind.LOGISTIC: (Loss.LOG,),
    ModelKind.SOFTMAX: (Loss.LOG,),
    ModelKind.MLP: (Loss.LOG, Loss.SQUARED, Loss.HUBER),
    ModelKind.AUTOENCODER: (Loss.SQUARED, Loss.HUBER),
}
_FIELDS = ("kind", "n_features", "n_outputs", "hidden", "activation", "loss")


def _enum(cls: type[Enum], value: Any, key: str) -> Any:
    try:
        return cls(value)
    except (ValueError, TypeError):
        choices = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise ConfigError(f"must be one of {choices}", key=key, value=value) from None


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError("must be an integer", key=key, value=value)
    if not lo <= value <= hi:
        raise ConfigError(f"must be in [{lo}, {hi}]", key=key, value=value)
    return int(value)


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """Where one dense layer lives in the flat vector: ``W`` then ``b``."""

    weight_offset: int
    weight_shape: tuple[int, int]
    bias_offset: int
    bias_size: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model is: kind, sizes, activation and loss (no parameters).

    ``loss=None`` takes the kind's default (``squared`` for linear/autoencoder,
    ``log`` otherwise); an autoencoder's ``n_outputs`` is always ``n_features``.
    Invalid values raise :class:`ConfigError` naming the field.

    >>> spec = ModelSpec("mlp", n_features=4, hidden=(8,), activation="tanh")
    >>> spec.n_params, spec.loss.value
    (49, 'log')
    >>> ModelSpec.from_dict(spec.to_dict()) == spec
    True
    """

    kind: ModelKind
    n_features: int
    n_outputs: int = 1
    hidden: tuple[int, ...] = ()
    activation: Activation = Activation.RELU
    loss: Loss | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        kind = _enum(ModelKind, self.kind, "kind")
        put(self, "kind", kind)
        put(self, "n_features", _int(self.n_features, "n_features", 1, MAX_FEATURES))
        put(self, "activation", _enum(Activation, self.activation, "activation"))
        hidden = self.hidden
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (tuple, list)):
            raise ConfigError("must be a list of layer widths", key="hidden", value=hidden)
        put(self, "hidden", tuple(_int(h, f"hidden[{i}]", 1, MAX_WIDTH) for i, h in enumerate(hidden)))
        if kind in (ModelKind.MLP, ModelKind.AUTOENCODER):
            if not 1 <= len(self.hidden) <= 2:
                raise ConfigError(f"a {kind.value} needs 1 or 2 hidden layers", key="hidden", value=list(self.hidden))
        elif self.hidden:
            raise ConfigError(f"a {kind.value} model has no hidden layers", key="hidden", value=list(self.hidden))
        # an autoencoder's output layer is its input (up to MAX_FEATURES wide): the n_outputs
        # it was given (to_dict writes n_features there) is checked as such, then replaced
        n_out = _int(self.n_outputs, "n_outputs", 1, MAX_FEATURES if kind is ModelKind.AUTOENCODER else MAX_WIDTH)
        if kind is ModelKind.AUTOENCODER:
            n_out = self.n_features
        elif kind is ModelKind.LOGISTIC and n_out != 1:
            raise ConfigError("a logistic model has exactly 1 output (use softmax)", key="n_outputs", value=n_out)
        elif kind is ModelKind.SOFTMAX and n_out < 2:
            raise ConfigError("a softmax model needs at least 2 classes", key="n_outputs", value=n_out)
        put(self, "n_outputs", n_out)
        allowed = _LOSSES_OF[kind]
        loss = allowed[0] if self.loss is None else _enum(Loss, self.loss, "loss")
        if loss not in allowed:
            names = ", ".join(repr(a.value) for a in allowed)
            raise ConfigError(f"a {kind.value} model takes loss {names}", key="loss", value=loss.value)
        put(self, "loss", loss)
        if self.n_params > MAX_PARAMS:
            raise ConfigError(f"{self.n_params} parameters, more than {MAX_PARAMS}", key="hidden", value=list(self.hidden))

    # -- derived -------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        """Layer widths ``(n_features, *hidden, n_outputs)``."""
        return (self.n_features, *self.hidden, self.n_outputs)

    @property
    def n_params(self) -> int:
        """Length of the flat parameter vector."""
        s = self.sizes
        return sum(s[i] * s[i + 1] + s[i + 1] for i in range(len(s) - 1))

    @property
    def output(self) -> str:
        """Output link: ``"identity"``, ``"sigmoid"`` or ``"softmax"``."""
        if self.loss is not Loss.LOG:
            return "identity"
        return "sigmoid" if self.n_outputs == 1 else "softmax"

    @property
    def is_classifier(self) -> bool:
        return self.loss is Loss.LOG

    def layout(self) -> list[LayerSlice]:
        """Offsets of each layer's ``W`` (fan_out x fan_in) and ``b`` in the flat vector."""
        out, off, s = [], 0, self.sizes
        for i in range(len(s) - 1):
            w_size = s[i] * s[i + 1]
            out.append(LayerSlice(off, (s[i + 1], s[i]), off + w_size, s[i + 1]))
            off += w_size + s[i + 1]
        return out

    # -- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-friendly dict; ``from_dict`` gives back an equal spec."""
        return {
            "kind": self.kind.value,
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "hidden": list(self.hidden),
            "activation": self.activation.value,
            "loss": self.loss.value,  # type: ignore[union-attr]
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, file: str | None = None, key: str | None = None) -> ModelSpec:
        """Build and validate a spec from a dict (network message or TOML table).

        Unknown keys are refused; errors name ``file`` and ``key.field``.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("must be a table/object", file=file, key=key, value=data)
        unknown = sorted(str(k) for k in data if k not in _FIELDS)
        if unknown:
            raise ConfigError(f"unknown model field(s) {unknown}; known: {list(_FIELDS)}", file=file, key=key)
        for required in ("kind", "n_features"):
            if required not in data:
                where = f"{key}.{required}" if key else required
                raise ConfigError("is required", file=file, key=where)
        try:
            return cls(**dict(data))
        except ConfigError as exc:
            where = f"{key}.{exc.key}" if key else exc.key
            if exc.has_value:
                raise ConfigError(exc.reason, file=file, key=where, value=exc.value) from None
            raise ConfigError(exc.reason, file=file, key=where) from None


@dataclasses.dataclass(frozen=True, slots=True)
class FitReport:
    """What one :meth:`Model.fit` call did.

    ``mean_loss`` is the mean per-sample training loss (before each batch's
    update, unweighted, without the L2/FedProx terms) over ``samples_seen``.
    """

    samples_seen: int
    mean_loss: float
    seconds: float
    steps: int = 0


def _settings(epochs: int, batch_size: int, lr: float, schedule: Any, l2: float, mu: float,
              shuffle: bool) -> _sgd.Settings:
    """Validate the hyper-parameters of :meth:`Model.fit`; ConfigError names the argument."""
    _int(epochs, "epochs", 1, 1_000_000)
    _int(batch_size, "batch_size", 1, 1 << 20)
    for name, v, positive in (("lr", lr, True), ("l2", l2, False), ("prox_mu", mu, False)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise ConfigError("must be a number", key=name, value=v)
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise ConfigError("must be finite and " + ("> 0" if positive else ">= 0"), key=name, value=v)
    sched = _enum(LrSchedule, schedule, "lr_schedule")
    power_t = POWER_T if sched is LrSchedule.INVSCALING else 0.0
    return _sgd.Settings(int(epochs), int(batch_size), float(lr), power_t, float(l2), float(mu), bool(shuffle))


class Model:
    """A trainable model: ``spec`` plus a flat float32 parameter vector.

    Linear kinds start at zero, MLP weights with Glorot-uniform draws;
    initialisation and shuffling are deterministic for a ``seed``. Not thread-safe: one thread trains a model at a time.

    >>> import numpy as np
    >>> X = np.array([[0.0, 1.0], [1.0, 0.0]] * 50)
    >>> y = np.array([1, 0] * 50)
    >>> model = Model(ModelSpec("logistic", n_features=2))
    >>> report = model.fit(X, y, epochs=5, lr=0.5)
    >>> model.predict(X[:2]).tolist(), report.samples_seen
    ([1, 0], 500)
    """

    def __init__(self, spec: ModelSpec, seed: int = 0) -> None:
        if not isinstance(spec, ModelSpec):
            raise ConfigError("must be a ModelSpec", key="spec", value=type(spec).__name__)
        seed = _int(seed, "seed", 0, (1 << 63) - 1)
        self._spec = spec
        self._kernel = _sgd.Kernel(spec.sizes, spec.activation.value, spec.output, spec.loss.value)
        self._params = _init_params(spec, seed)
        state = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
        self._rng_state = state or 0x9E3779B97F4A7C15
        self._steps = 0
        self._params64: np.ndarray | None = None
        self._settings_key: tuple | None = None
        self._settings: _sgd.Settings | None = None
        self._target = "class" if spec.output == "softmax" else "binary" if spec.output == "sigmoid" else "values"

    # -- parameters ----------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def n_params(self) -> int:
        return self._spec.n_params

    @property
    def steps(self) -> int:
        """Optimisation steps (mini-batches) taken so far; drives ``invscaling``."""
        return self._steps

    @property
    def params(self) -> np.ndarray:
        """A copy of the flat parameter vector (float32, shape ``(n_params,)``).

        Assigning an array of the right size replaces it; wrong sizes and
        non-finite values raise :class:`ConfigError` and change nothing.
        """
        return self._params.copy()

    @params.setter
    def params(self, value: Any) -> None:
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                arr = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"not a numeric vector ({exc})", key="params") from None
        if arr.shape != (self.n_params,):
            raise ConfigError(
                f"expected a vector of {self.n_params} values for this {self._spec.kind.value} model",
                key="params", value=f"shape {arr.shape}")
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise ConfigError(f"non-finite value at index {bad}", key="params", value=float(arr[bad]))
        self._params[:] = arr
        self._params64 = None

    def layer(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Read-only views ``(W, b)`` of layer ``index`` (W is fan_out x fan_in)."""
        sl = self._spec.layout()[index]
        w = self._params[sl.weight_offset:sl.bias_offset].reshape(sl.weight_shape)
        b = self._params[sl.bias_offset:sl.bias_offset + sl.bias_size]
        w.flags.writeable = False
        b.flags.writeable = False
        return w, b

    def clone(self) -> Model:
        """An independent copy (parameters, step count and shuffling state)."""
        other = object.__new__(Model)
        other.__dict__.update(self.__dict__)
        other._params = self._params.copy()
        other._params64 = None
        return other

    # -- training ------------------------------------------------------------------
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray | None = None,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.01,
        lr_schedule: LrSchedule | str = "constant",
        l2: float = 0.0,
        prox_mu: float = 0.0,
        reference: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
        class_weight: str | None = None,
        shuffle: bool = True,
    ) -> FitReport:
        """Mini-batch SGD over ``X`` (n x n_features, float32 or float64).

        ``y``: (n,) 0/1 for logistic (or a 1-output log mlp), (n,) class ids for
        softmax, (n,) or (n, n_outputs) values for regression, ``None`` for an
        autoencoder. ``reference`` (n_params,) is required when ``prox_mu > 0``.
        NaN/Inf in ``X``/``y``, bad labels and divergence raise
        :class:`TrainingError` and leave the model unchanged.
        """
        t0 = time.perf_counter()
        key = (epochs, batch_size, lr, lr_schedule, l2, prox_mu, shuffle)
        if key != self._settings_key:  # validate once per distinct set of hyper-parameters
            self._settings = _settings(*key)
            self._settings_key = key
        settings = self._settings
        X = self._check_X(X)
        Y, ty = self._targets(X, y)
        ref = _EMPTY_F32 if settings.prox_mu == 0.0 else self._reference(reference)
        sw = _EMPTY_F64
        if sample_weight is not None or class_weight is not None:
            sw = self._weights(X.shape[0], Y, sample_weight, class_weight)
        status, row, epoch, loss_sum, seen, steps, rng = self._kernel.train(
            X, Y, ty, sw, self._params, ref, settings, self._steps, self._rng_state)
        if status:
            self._raise(status, row, epoch, y, settings.lr)
        self._steps += steps
        self._rng_state = rng
        self._params64 = None
        return FitReport(seen, loss_sum / seen, time.perf_counter() - t0, steps)

    # -- inference -----------------------------------------------------------------
    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class ids (int64, (n,)) for classifiers; values (n,) or (n, n_outputs)
        for regression; the reconstruction (n, n_features) for an autoencoder."""
        out = self._outputs(X)
        if self._target == "binary":
            return (out[:, 0] >= 0.5).astype(np.int64)
        if self._target == "class":
            return out.argmax(axis=1)
        return out[:, 0] if out.shape[1] == 1 and self._spec.kind is not ModelKind.AUTOENCODER else out

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (n, n_classes) in X's dtype; classifiers only
        (a binary model gives the two columns ``[1 - p, p]``)."""
        if not self._spec.is_classifier:
            raise TrainingError(f"predict_proba needs a classifier; this is a {self._spec.kind.value} model "
                                f"with {self._spec.loss.value} loss")  # type: ignore[union-attr]
        out = self._outputs(X)
        if self._target == "binary":
            return np.column_stack((1.0 - out[:, 0], out[:, 0]))
        return out

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score of an autoencoder: mean squared reconstruction error
        per row (float64, (n,)); higher is more anomalous."""
        if self._spec.kind is not ModelKind.AUTOENCODER:
            raise TrainingError(f"score_samples needs an autoencoder; this is a {self._spec.kind.value} model")
        X = self._check_X(X)
        err = self._outputs(X).astype(np.float64) - X
        return np.einsum("ij,ij->i", err, err) / X.shape[1]

    def loss(self, X: np.ndarray, y: np.ndarray | None = None) -> float:
        """Mean per-sample loss on ``(X, y)`` (no L2/FedProx terms)."""
        X = self._check_X(X)
        Y, ty = self._targets(X, y)
        losses = np.empty(X.shape[0], np.float64)
        status, row = self._kernel.sample_losses(X, self._work_params(X), Y, ty, losses)
        if status:
            self._raise(status, row, 0, y, 0.0)
        return float(losses.mean())

    # -- internals -----------------------------------------------------------------
    def _work_params(self, X: np.ndarray) -> np.ndarray:
        if X.dtype is _F32:
            return self._params
        if self._params64 is None:  # cached until the parameters change
            self._params64 = self._params.astype(np.float64)
        return self._params64

    def _outputs(self, X: np.ndarray) -> np.ndarray:
        X = self._check_X(X)
        out = np.empty((X.shape[0], self._spec.n_outputs), X.dtype)
        status, row = self._kernel.infer(X, self._work_params(X), out)
        if status:
            self._raise(status, row, 0, None, 0.0)
        return out

    def _check_X(self, X: Any) -> np.ndarray:
        if not (type(X) is np.ndarray and (X.dtype is _F32 or X.dtype is _F64) and X.ndim == 2
                and X.flags.c_contiguous):
            try:
                X = np.asarray(X)
                X = np.ascontiguousarray(X, dtype=_F32 if X.dtype == _F32 else _F64)
            except (TypeError, ValueError) as exc:
                raise TrainingError(f"X must be a numeric 2-D array ({exc})") from None
            if X.ndim != 2:
                raise TrainingError(f"X must be 2-D (n_samples, {self._spec.n_features}), got shape {X.shape}")
        if X.shape[1] != self._spec.n_features or X.shape[0] == 0:
            raise TrainingError(f"X has shape {X.shape}; expected (n >= 1, {self._spec.n_features})")
        return X

    def _targets(self, X: np.ndarray, y: Any) -> tuple[np.ndarray, int]:
        n = X.shape[0]
        if self._spec.kind is ModelKind.AUTOENCODER:
            if y is not None:
                raise TrainingError("an autoencoder learns to reproduce X: pass y=None")
            return X.reshape(-1), self._spec.n_features
        if y is None:
            raise TrainingError(f"a {self._spec.kind.value} model needs targets y")
        k = self._spec.n_outputs if self._target == "values" else 1
        if not (type(y) is np.ndarray and y.dtype is X.dtype and y.flags.c_contiguous):
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    y = np.ascontiguousarray(y, dtype=X.dtype)
            except (TypeError, ValueError) as exc:
                raise TrainingError(f"y must be numeric ({exc})") from None
        if y.size != n * k or not (y.ndim == 1 or (y.ndim == 2 and y.shape == (n, k))):
            want = f"({n},)" if k == 1 else f"({n}, {k})"
            raise TrainingError(f"y has shape {y.shape}; expected {want}")
        return y.reshape(-1), k

    def _reference(self, reference: Any) -> np.ndarray:
        if reference is None:
            raise ConfigError("prox_mu > 0 needs the reference (global) parameters", key="reference")
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                ref = np.ascontiguousarray(reference, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"not a numeric vector ({exc})", key="reference") from None
        if ref.shape != (self.n_params,) or not np.isfinite(ref).all():
            raise ConfigError(f"must be {self.n_params} finite values", key="reference", value=f"shape {ref.shape}")
        return ref

    def _weights(self, n: int, Y: np.ndarray, sample_weight: Any, class_weight: Any) -> np.ndarray:
        sw = np.ones(n, np.float64)
        if sample_weight is not None:
            try:
                sw = np.array(sample_weight, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise TrainingError(f"sample_weight must be numeric ({exc})") from None
            if sw.shape != (n,) or not np.isfinite(sw).all() or (sw < 0).any():
                raise TrainingError(f"sample_weight must be {n} finite values >= 0 (shape {sw.shape})")
        if class_weight is not None:
            if class_weight != "balanced" or not self._spec.is_classifier:
                raise ConfigError("must be None or 'balanced' (classifiers only)", key="class_weight",
                                  value=class_weight)
            n_classes = max(self._spec.n_outputs, 2)
            ok = bool(np.isfinite(Y).all() and Y.min() >= 0 and Y.max() < n_classes)
            labels = Y.astype(np.int64) if ok else Y
            if not (ok and np.array_equal(labels, Y)):
                raise TrainingError(f"class labels must be integers in [0, {n_classes}) for class_weight='balanced'")
            counts = np.bincount(labels, minlength=n_classes)
            present = np.count_nonzero(counts)
            per_class = np.where(counts > 0, n / (present * np.maximum(counts, 1)), 0.0)
            sw = sw * per_class[labels]
        return sw

    def _raise(self, status: int, row: int, epoch: int, y: Any, lr: float) -> None:
        if status == _sgd.BAD_X:
            raise TrainingError(f"X row {row} holds NaN or Inf; refused (model unchanged)")
        if status == _sgd.BAD_Y:
            value = np.asarray(y, dtype=np.float64).reshape(len(np.asarray(y)), -1)[row]
            shown = value.tolist() if value.size > 1 else float(value[0])
            what = {"binary": "must be 0 or 1", "class": f"must be an integer class id in [0, {self._spec.n_outputs})",
                    "values": "must be finite"}[self._target]
            raise TrainingError(f"y[{row}] = {shown!r}: {what} (model unchanged)")
        if status == _sgd.DIVERGED:
            raise TrainingError(f"training diverged in epoch {epoch + 1} (non-finite weights or loss) with "
                                f"lr={lr}; lower lr or scale the features (model unchanged)")
        raise MemoryError("not enough memory for the training buffers")


def _init_params(spec: ModelSpec, seed: int) -> np.ndarray:
    """Zeros for the linear kinds; Glorot-uniform weights and zero biases for MLPs.

    Glorot for relu layers too (as scikit-learn's MLP does): He's wider draws
    learned measurably slower in the first epochs on our benchmarks.
    """
    params = np.zeros(spec.n_params, np.float32)
    if spec.kind in (ModelKind.MLP, ModelKind.AUTOENCODER):
        rng = np.random.default_rng(seed)
        for sl in spec.layout():
            fan_out, fan_in = sl.weight_shape
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            size = fan_in * fan_out
            params[sl.weight_offset:sl.weight_offset + size] = rng.uniform(-limit, limit, size)
    return params
