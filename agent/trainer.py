"""The agent's side of a federated round: the uplink's :class:`TaskHandler`.

* ``statistics`` — count, mean and M2 (sum of squared deviations) of every task
  feature over the stored samples, in the task's feature order (the server merges
  them into the global scaler).
* ``train`` — the task's model, started from the global parameters, trained with the
  task's hyper-parameters on the stored samples scaled by the global scaler
  (FedProx when ``prox_mu > 0``). The most recent ``val_fraction`` of the samples
  is held out for validation, and the samples whose windows or labels reach into
  it (``window + horizon`` before its first sample) are dropped from training, so
  no look-ahead leaks from validation into training.
* ``evaluate`` — the global model scored on all stored samples.

Rows are read from the store in blocks of ``block_rows`` (training visits the blocks
in a random order per epoch and shuffles inside each), so the memory a task needs is
O(block), not O(history): a gateway with 100,000 stored samples trains in a few MiB.

Metrics: ``loss`` (on the training rows, after the update), ``n_train``, ``n_val`` and,
on the held-out part, ``val_loss`` plus ``val_accuracy``, ``val_f1``, ``val_roc_auc``
(classifiers) or ``val_mae``, ``val_r2`` (regression). Evaluate tasks report the same
names without the ``val_`` prefix. Undefined metrics (e.g. AUC with one class) are
left out rather than sent as NaN.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedgate.agent import malloc
from fedgate.agent.config import SamplesConfig
from fedgate.agent.evaluation import accuracy, f1_score, mean_absolute_error, r2_score, roc_auc
from fedgate.agent.store import Store
from fedgate.agent.uplink_types import GlobalModel, HelloInfo, Task, TaskOutcome
from fedgate.core.errors import ConfigError, TrainingError

__all__ = ["Trainer", "TrainerState", "scale_features", "split_holdout", "feature_stats", "score_model"]

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """What ``status`` shows about the federation side."""

    last_round: int | None = None
    last_kind: str | None = None
    last_task_ts: float | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    model_round: int | None = None
    model_ts: float | None = None
    tasks_done: int = 0
    tasks_failed: int = 0


def feature_stats(x: np.ndarray, *, chunk_rows: int = 8192) -> tuple[int, np.ndarray, np.ndarray]:
    """``(count, mean, m2)`` of the columns of ``x`` (n, F); mean and m2 float64 (F,).

    Two passes over row chunks in float64, so memory stays O(chunk) whatever ``n``.
    """
    n, f = int(x.shape[0]), int(x.shape[1])
    if n == 0:
        return 0, np.zeros(f), np.zeros(f)
    mean = np.zeros(f)
    for i in range(0, n, chunk_rows):
        mean += x[i:i + chunk_rows].sum(axis=0, dtype=np.float64)
    mean /= n
    m2 = np.zeros(f)
    for i in range(0, n, chunk_rows):
        dev = x[i:i + chunk_rows].astype(np.float64) - mean
        m2 += np.einsum("ij,ij->j", dev, dev)
    return n, mean, m2


def scale_features(x: np.ndarray, scaler: dict[str, Any] | None, *, inplace: bool = False) -> np.ndarray:
    """``(x - mean) / std`` with the federation's scaler; float32 (n, F).

    A standard deviation of 0 (a constant feature) divides by 1. ``inplace`` reuses
    ``x`` (float32, C-contiguous) instead of allocating a copy.
    """
    if inplace and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable:
        out = x
    else:
        out = np.array(x, dtype=np.float32, order="C")
    if scaler is None:
        return out
    mean = np.asarray(scaler.get("mean"), dtype=np.float32)
    std = np.asarray(scaler.get("std"), dtype=np.float32)
    if mean.shape != (out.shape[1],) or std.shape != (out.shape[1],):
        raise TrainingError(f"the scaler has {mean.size}/{std.size} entries for {out.shape[1]} features")
    std = np.where(np.isfinite(std) & (std > 0), std, np.float32(1.0))
    out -= mean
    out /= std
    return out


def split_holdout(ts: np.ndarray, val_fraction: float, gap_s: float, *, min_rows: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)`` of time-ordered rows: the newest ``val_fraction`` is held out.

    Training rows ending less than ``gap_s`` before the first held-out row are dropped
    (their label window or feature window overlaps the held-out period). With fewer
    than ``min_rows`` rows nothing is held out.
    """
    n = int(ts.shape[0])
    n_val = int(round(n * val_fraction)) if n >= min_rows and val_fraction > 0 else 0
    if n_val == 0:
        return np.arange(n), np.arange(0)
    first_val = n - n_val
    t_val = ts[first_val]
    train = np.flatnonzero(ts[:first_val] <= t_val - gap_s - 1e-9)
    return train, np.arange(first_val, n)


def _targets(spec: Any, y: np.ndarray) -> np.ndarray | None:
    from fedgate.core.model import ModelKind

    if spec.kind is ModelKind.AUTOENCODER:
        return None
    if spec.is_classifier:
        if spec.n_outputs == 1:
            return (y > 0.5).astype(np.int64)
        return np.clip(np.rint(y), 0, spec.n_outputs - 1).astype(np.int64)
    return y.astype(np.float64)


class _Scores:
    """Loss and predictions gathered block by block; metrics at the end.

    Keeps O(n) scalars (targets and scores), never the feature rows.
    """

    def __init__(self, model: Any, *, loss_only: bool = False) -> None:
        self.model = model
        self.loss_only = loss_only
        self.loss_sum = 0.0
        self.n = 0
        self.ys: list[np.ndarray] = []
        self.outs: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        from fedgate.core.model import ModelKind

        if x.shape[0] == 0:
            return
        m = self.model
        self.loss_sum += m.loss(x, y) * x.shape[0]
        self.n += x.shape[0]
        if m.spec.kind is ModelKind.AUTOENCODER or y is None or self.loss_only:
            return
        if m.spec.is_classifier:  # compact copies: these live until the end of the task
            self.ys.append(np.asarray(y, dtype=np.int32))
            proba = m.predict_proba(x)
            self.outs.append(proba[:, 1].copy() if proba.shape[1] == 2 else proba.argmax(axis=1).astype(np.int32))
            return
        self.ys.append(np.asarray(y))
        self.outs.append(np.asarray(m.predict(x), dtype=np.float64).reshape(x.shape[0], -1)[:, 0])

    def metrics(self, prefix: str = "") -> dict[str, float]:
        if self.n == 0:
            return {}
        spec = self.model.spec
        out = {f"{prefix}loss": self.loss_sum / self.n}
        if self.ys:
            y = np.concatenate(self.ys)
            o = np.concatenate(self.outs)
            if spec.is_classifier and spec.n_outputs == 1:
                pred = (o >= 0.5).astype(np.int64)
                out[f"{prefix}accuracy"] = accuracy(y, pred)
                out[f"{prefix}f1"] = f1_score(y, pred)
                out[f"{prefix}roc_auc"] = roc_auc(y, o)
            elif spec.is_classifier:
                out[f"{prefix}accuracy"] = accuracy(y, o)
                out[f"{prefix}f1"] = f1_score(y, o, n_classes=spec.n_outputs)
            else:
                yy = y.reshape(y.shape[0], -1)[:, 0]
                out[f"{prefix}mae"] = mean_absolute_error(yy, o)
                out[f"{prefix}r2"] = r2_score(yy, o)
        return {k: float(v) for k, v in out.items() if np.isfinite(v)}


def score_model(model: Any, x: np.ndarray, y: np.ndarray | None, *, prefix: str = "") -> dict[str, float]:
    """Loss and the kind's metrics of ``model`` on scaled ``x`` (n, F) and targets ``y``."""
    sc = _Scores(model)
    sc.add(x, y)
    return sc.metrics(prefix)


def _blocks(ids: np.ndarray, lo: int, hi: int, block_rows: int) -> list[tuple[int, int]]:
    """Inclusive id ranges covering rows ``lo:hi`` of the index, ``block_rows`` rows each."""
    return [(int(ids[i]), int(ids[min(i + block_rows, hi) - 1])) for i in range(lo, hi, block_rows)]


class Trainer:
    """Runs the server's tasks on the local store (implements the uplink's TaskHandler).

    ``on_global_model`` is called with every global model once it is persisted (the
    predictor switches to it).
    """

    def __init__(self, store: Store, samples: SamplesConfig, *, val_fraction: float = 0.2,
                 on_global_model: Callable[[Any], None] | None = None, seed: int = 0,
                 block_rows: int = 2048) -> None:
        self.block_rows = block_rows
        self.store = store
        self.samples = samples
        self.val_fraction = val_fraction
        self.on_global_model = on_global_model
        self.seed = seed
        self.state = TrainerState()
        self._lock = threading.Lock()

    def reconfigure(self, samples: SamplesConfig) -> None:
        """Take a new ``[samples]`` section (after a reload)."""
        self.samples = samples

    # ------------------------------------------------------------------ TaskHandler
    def hello_info(self) -> HelloInfo:
        return HelloInfo(features=list(self.samples.feature_names), n_samples=self.store.count())

    def on_model(self, model: GlobalModel) -> None:
        """Persist the global model first, then hand it to the predictor."""
        params = np.asarray(model.params, dtype=np.float32)
        self.store.save_model(round=model.round, spec=dict(model.spec), features=list(model.features),
                              label=model.label, scaler=model.scaler, params=params)
        self.state.model_round = int(model.round)
        self.state.model_ts = time.time()
        log.info("global model of round %d stored (%d parameters)", model.round, params.size)
        if self.on_global_model is not None:
            self.on_global_model(model)

    def run_task(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
        """Run one task (blocking; called in the uplink's worker thread)."""
        t0 = time.perf_counter()
        with self._lock:
            try:
                self._check_features(task.features)
                if task.kind == "statistics":
                    outcome = self._statistics(task)
                elif task.kind == "train":
                    outcome = self._train(task, global_params)
                elif task.kind == "evaluate":
                    outcome = self._evaluate(task, global_params)
                else:
                    raise TrainingError(f"unknown task kind {task.kind!r}")
            except Exception:
                self.state.tasks_failed += 1
                raise
            finally:
                malloc.trim()  # the blocks are gone: hand their pages back before the next task
            self.state.tasks_done += 1
            self.state.last_round = int(task.round)
            self.state.last_kind = str(task.kind)
            self.state.last_task_ts = time.time()
            self.state.last_metrics = dict(outcome.metrics)
        log.info("%s task of round %d done in %.2fs on %d samples: %s", task.kind, task.round,
                 time.perf_counter() - t0, outcome.n_samples,
                 ", ".join(f"{k}={v:.4g}" for k, v in sorted(outcome.metrics.items())))
        return outcome

    # ------------------------------------------------------------------ internals
    def _check_features(self, features: Sequence[str]) -> None:
        have = set(self.samples.feature_names)
        missing = [f for f in features if f not in have]
        if missing:
            raise TrainingError(f"this agent cannot produce the features {', '.join(missing)} "
                                f"(it has {', '.join(self.samples.feature_names)})")

    def _model(self, task: Any, global_params: np.ndarray | None) -> Any:
        from fedgate.core.model import Model, ModelSpec

        try:
            spec = ModelSpec.from_dict(task.spec)
        except ConfigError as exc:
            raise TrainingError(f"the task's model spec is invalid: {exc}") from exc
        if spec.n_features != len(task.features):
            raise TrainingError(f"the spec takes {spec.n_features} features, the task lists {len(task.features)}")
        seed = (self.seed * 1_000_003 + int(task.round)) & ((1 << 63) - 1)
        model = Model(spec, seed=seed)
        if global_params is not None:
            try:
                model.params = global_params
            except ConfigError as exc:
                raise TrainingError(f"the global parameters do not fit the model: {exc}") from exc
        return model

    def _check_label(self, task: Task) -> None:
        label = self.samples.label
        if label is not None and task.label and task.label != label.name:
            raise TrainingError(f"the task's label {task.label!r} is not this agent's label {label.name!r}")

    def _block(self, task: Task, rng: tuple[int, int], spec: Any) -> tuple[np.ndarray, np.ndarray | None]:
        data = self.store.load_samples(task.features, labelled=True, id_range=rng)
        return scale_features(data.x, task.scaler, inplace=True), _targets(spec, data.y)

    def _plan(self, features: Sequence[str], gap_s: float) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int, int]:
        """``(train_blocks, val_blocks, n_train, n_val)``: :func:`split_holdout` in streaming passes.

        The index is scanned chunk by chunk (O(block) memory) instead of being held as
        O(n) arrays: one pass counts, one finds the first held-out time, one counts the
        training rows before it and one cuts the blocks.
        """
        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            return self.store.index_chunks(features, labelled=True, chunk_rows=self.block_rows)

        n = sum(int(ids.size) for ids, _ in chunks())
        if n == 0:
            raise TrainingError("no labelled samples stored yet")
        n_val = int(round(n * self.val_fraction)) if n >= 10 and self.val_fraction > 0 else 0
        first_val = n - n_val
        n_train = n
        if n_val:
            pos, cutoff = 0, None
            for _, ts in chunks():
                if pos + ts.size > first_val:
                    cutoff = float(ts[first_val - pos]) - gap_s - 1e-9
                    break
                pos += int(ts.size)
            n_train, pos = 0, 0
            for _, ts in chunks():
                k = min(int(ts.size), first_val - pos)
                if k <= 0:
                    break
                n_train += int(np.count_nonzero(ts[:k] <= cutoff))
                pos += k
        if n_train == 0:
            raise TrainingError(f"too few samples to train ({n} stored)")
        train_blocks: list[tuple[int, int]] = []
        val_blocks: list[tuple[int, int]] = []
        pos = 0
        for ids, _ in chunks():  # chunks are block_rows long, so blocks are cut inside a chunk
            for lo, hi, out in ((0, n_train, train_blocks), (first_val, n, val_blocks)):
                a, b = max(lo, pos), min(hi, pos + int(ids.size))
                if a < b:
                    out.extend(_blocks(ids, a - pos, b - pos, self.block_rows))
            pos += int(ids.size)
        return train_blocks, val_blocks, n_train, n_val

    def _score(self, model: Any, task: Task, blocks: list[tuple[int, int]], prefix: str = "",
               loss_only: bool = False) -> dict[str, float]:
        sc = _Scores(model, loss_only=loss_only)
        for rng in blocks:
            x, y = self._block(task, rng, model.spec)
            sc.add(x, y)
        return sc.metrics(prefix)

    def _train(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
        """Block-wise SGD: the rows are read from the store ``block_rows`` at a time.

        Each epoch visits the training blocks in a fresh random order and shuffles the
        rows inside each block, so memory stays O(block) whatever the history size.
        """
        self._check_label(task)
        model = self._model(task, global_params)
        gap = self.samples.window_s + (self.samples.label.horizon_s if self.samples.label else 0.0)
        train_blocks, val_blocks, n_train, n_val = self._plan(task.features, gap)
        hyper = dict(task.hyper)
        prox_mu = float(hyper.get("prox_mu", 0.0) or 0.0)
        reference = None
        if prox_mu > 0:
            if global_params is None:
                raise TrainingError("FedProx (prox_mu > 0) needs the global parameters")
            reference = np.asarray(global_params, dtype=np.float32)
        epochs = int(hyper.get("epochs", 1))
        if epochs < 1:
            raise TrainingError(f"epochs must be >= 1, not {epochs}")
        order_rng = np.random.default_rng((self.seed, int(task.round)))
        kw = dict(epochs=1, batch_size=int(hyper.get("batch_size", 32)), lr=float(hyper.get("lr", 0.01)),
                  lr_schedule=str(hyper.get("lr_schedule", "constant")), l2=float(hyper.get("l2", 0.0)),
                  prox_mu=prox_mu, reference=reference)
        try:
            for _ in range(epochs):
                for b in order_rng.permutation(len(train_blocks)):
                    x, y = self._block(task, train_blocks[b], model.spec)
                    if x.shape[0]:
                        model.fit(x, y, **kw)
        except ConfigError as exc:
            raise TrainingError(f"the task's hyper-parameters are invalid: {exc}") from exc
        metrics = self._score(model, task, train_blocks, loss_only=True)
        metrics.update(self._score(model, task, val_blocks, prefix="val_"))
        metrics["n_train"] = float(n_train)
        metrics["n_val"] = float(n_val)
        return TaskOutcome(n_samples=n_train, metrics=metrics, params=model.params)

    def _evaluate(self, task: Task, global_params: np.ndarray | None) -> TaskOutcome:
        self._check_label(task)
        if global_params is None:
            stored = self.store.load_model()
            if stored is None:
                raise TrainingError("no global model to evaluate")
            global_params = stored.params
        model = self._model(task, global_params)
        blocks = self.store.block_ranges(task.features, labelled=True, block_rows=self.block_rows)
        if not blocks:
            raise TrainingError("no labelled samples stored yet")
        sc = _Scores(model)
        for rng in blocks:
            x, y = self._block(task, rng, model.spec)
            sc.add(x, y)
        return TaskOutcome(n_samples=sc.n, metrics=sc.metrics())

    def _statistics(self, task: Task) -> TaskOutcome:
        """Chan's parallel merge of per-block count/mean/M2, in float64."""
        f = len(task.features)
        count, mean, m2 = 0, np.zeros(f), np.zeros(f)
        for rng in self.store.block_ranges(task.features, labelled=False, block_rows=self.block_rows):
            data = self.store.load_samples(task.features, labelled=False, id_range=rng)
            nb, mb, m2b = feature_stats(data.x)
            if nb == 0:
                continue
            delta = mb - mean
            total = count + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta * delta * (count * nb / total)
            count = total
        return TaskOutcome(n_samples=count, metrics={"n_samples": float(count)}, stats=(count, mean, m2))
