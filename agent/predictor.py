"""Live prediction: every new window scored with the current global model.

The score is the positive-class probability of a binary classifier, the class id of a
multi-class one, the first output of a regression model and the reconstruction error
of an autoencoder. It is kept for the metrics and the state file, written to
``[predict] write_tag`` when configured, and drives an alarm with hysteresis: raised
when the score reaches ``alarm_threshold``, cleared when it falls below
``alarm_threshold - hysteresis`` (``alarm_tag`` follows it).

Write failures are counted and retried with the next score; they never stop the loop.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgate.agent.config import PredictConfig
from fedgate.core.errors import ConfigError, FedgateError, TrainingError

__all__ = ["Predictor", "PredictionState", "Alarm"]

log = logging.getLogger(__name__)

WriteFn = Callable[[str, Any], Awaitable[None]]


class Alarm:
    """A threshold with hysteresis.

    >>> a = Alarm(0.7, 0.1)
    >>> [a.update(s) for s in (0.5, 0.7, 0.65, 0.61, 0.59, 0.69)]
    [False, True, True, True, False, False]
    """

    def __init__(self, threshold: float, hysteresis: float) -> None:
        self.threshold = threshold
        self.hysteresis = hysteresis
        self.active = False

    def update(self, score: float) -> bool:
        if not self.active and score >= self.threshold:
            self.active = True
        elif self.active and score < self.threshold - self.hysteresis:
            self.active = False
        return self.active


@dataclass
class PredictionState:
    """The latest prediction, for metrics and ``status``."""

    score: float | None = None
    ts: float | None = None
    alarm: bool = False
    model_round: int | None = None
    predictions: int = 0
    no_model: int = 0
    errors: int = 0
    write_errors: int = 0


class Predictor:
    """Scores feature windows with the latest global model.

    Parameters
    ----------
    cfg : PredictConfig
    feature_names : the agent's feature names, the order of ``Window.features``
    write : ``async write(tag, value)`` (``Acquisition.write``) or None
    """

    def __init__(self, cfg: PredictConfig, feature_names: Sequence[str], *, write: WriteFn | None = None) -> None:
        self.cfg = cfg
        self.feature_names = list(feature_names)
        self.write = write
        self.state = PredictionState()
        self._model: Any = None
        self._cols: np.ndarray | None = None
        self._mean: np.ndarray | None = None
        self._std: np.ndarray | None = None
        self._alarm = Alarm(cfg.alarm_threshold, cfg.hysteresis) if cfg.alarm_threshold is not None else None
        self._alarm_written: bool | None = None
        self._warned: set[str] = set()

    def reconfigure(self, cfg: PredictConfig, feature_names: Sequence[str]) -> None:
        """Take a reloaded ``[predict]``/feature list; the model mapping is rebuilt."""
        self.cfg = cfg
        self._alarm = Alarm(cfg.alarm_threshold, cfg.hysteresis) if cfg.alarm_threshold is not None else None
        self._alarm_written = None
        if list(feature_names) != self.feature_names:
            self.feature_names = list(feature_names)
            if self._model is not None:
                self._map_columns(self._model_features)

    @property
    def has_model(self) -> bool:
        return self._model is not None and self._cols is not None

    def set_model(self, model: Any) -> bool:
        """Switch to a global model (``GlobalModel`` or ``StoredModel``); False keeps the old one."""
        from fedgate.core.model import Model, ModelSpec

        try:
            spec = ModelSpec.from_dict(model.spec)
            m = Model(spec)
            m.params = np.asarray(model.params, dtype=np.float32)
            features = list(model.features)
            if spec.n_features != len(features):
                raise ConfigError("the spec does not match the feature list", key="features", value=len(features))
            mean = std = None
            if model.scaler is not None:
                mean = np.asarray(model.scaler["mean"], dtype=np.float32)
                std = np.asarray(model.scaler["std"], dtype=np.float32)
                if mean.shape != (len(features),) or std.shape != (len(features),):
                    raise ConfigError("the scaler does not match the feature list", key="scaler")
                std = np.where(np.isfinite(std) & (std > 0), std, np.float32(1.0))
        except (FedgateError, KeyError, TypeError, ValueError) as exc:
            log.error("the global model of round %s is unusable, keeping the previous one: %s",
                      getattr(model, "round", "?"), exc)
            self.state.errors += 1
            return False
        self._model, self._mean, self._std = m, mean, std
        self._model_features = features
        self.state.model_round = int(model.round)
        self._map_columns(features)
        log.info("predicting with the global model of round %d (%s)", model.round, spec.kind.value)
        return True

    def _map_columns(self, features: list[str]) -> None:
        missing = [f for f in features if f not in self.feature_names]
        if missing:
            self._cols = None
            log.error("the global model needs features this agent does not produce: %s", ", ".join(missing))
            return
        self._cols = np.array([self.feature_names.index(f) for f in features], dtype=np.intp)

    def score(self, features: np.ndarray) -> float | None:
        """The model's score for one window's features (float (F,)); None without a model."""
        if not self.has_model:
            self.state.no_model += 1
            return None
        from fedgate.core.model import ModelKind

        assert self._cols is not None
        x = np.asarray(features, dtype=np.float32)[self._cols][None, :]
        if self._mean is not None:
            x = (x - self._mean) / self._std
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = self._model
        try:
            if m.spec.kind is ModelKind.AUTOENCODER:
                return float(m.score_samples(x)[0])
            if m.spec.is_classifier:
                proba = m.predict_proba(x)[0]
                return float(proba[1]) if proba.shape[0] == 2 else float(np.argmax(proba))
            return float(np.ravel(m.predict(x))[0])
        except TrainingError as exc:
            self.state.errors += 1
            self._warn_once("score", "cannot score a window: %s", exc)
            return None

    async def handle(self, t_end: float, features: np.ndarray) -> float | None:
        """Score a window, then write the score and the alarm to the PLC as configured."""
        if not self.cfg.enabled:
            return None
        s = self.score(features)
        if s is None:
            return None
        st = self.state
        st.score, st.ts = s, t_end
        st.predictions += 1
        if self._alarm is not None:
            before = self._alarm.active
            st.alarm = self._alarm.update(s)
            if st.alarm != before:
                log.warning("alarm %s: score %.4g (threshold %.4g)", "raised" if st.alarm else "cleared",
                            s, self._alarm.threshold)
        if self.write is not None:
            if self.cfg.write_tag:
                await self._write(self.cfg.write_tag, s)
            if self.cfg.alarm_tag and self._alarm is not None and self._alarm_written is not st.alarm:
                if await self._write(self.cfg.alarm_tag, st.alarm):
                    self._alarm_written = st.alarm
        return s

    async def _write(self, tag: str, value: Any) -> bool:
        assert self.write is not None
        try:
            await self.write(tag, value)
        except (FedgateError, OSError) as exc:
            self.state.write_errors += 1
            self._warn_once(f"write:{tag}", "cannot write %s: %s (will retry)", tag, exc)
            return False
        self._warned.discard(f"write:{tag}")
        return True

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    def model_age_s(self, saved_ts: float | None) -> float | None:
        return None if saved_ts is None else max(0.0, time.time() - saved_ts)
