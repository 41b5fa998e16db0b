"""From tag values to labelled samples: a time grid, windows and look-ahead labels.

Tag values (anything with ``name``, ``value``, ``ts`` and ``quality``, i.e.
:class:`fedgate.drivers.TagValue`) are fed as they arrive. :meth:`Sampler.advance`
then closes the grid points up to ``now - delay``:

* grid point ``k`` sits at ``k * grid`` seconds (Unix time); each tag takes its
  latest value at or before that instant, forward filled no further than ``max_gap``
  (older: *missing*); a latest value of quality other than ``good`` is *bad*;
* a window ends on every multiple of ``hop`` and spans the last ``window / grid``
  points; it is valid when every feature tag has at least ``min_coverage`` of its
  points and none of them is bad (stale or bad data never reaches a model);
* valid windows are returned at once (:class:`Window`, for live prediction) and held
  until ``horizon`` has passed, then returned as :class:`Sample` with the label
  aggregated over the points in ``(t, t + horizon]`` (over the window itself when the
  horizon is 0), under the same validity rules.

Aggregates are computed for all tags at once with numpy (:func:`window_aggregates`).
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgate.agent.config import Agg, SamplesConfig

__all__ = ["Window", "Sample", "Sampler", "window_aggregates", "AGG_ORDER"]

log = logging.getLogger(__name__)

AGG_ORDER: tuple[Agg, ...] = tuple(Agg)
_AGG_ROW = {agg: i for i, agg in enumerate(AGG_ORDER)}
_OK, _MISSING, _BAD = 0, 1, 2
_CLOCK_STEP_S = 60.0


@dataclass(frozen=True)
class Window:
    """A valid feature window ending at ``t_end``; ``features`` float64 (F,) in config order."""

    t_end: float
    features: np.ndarray


@dataclass(frozen=True)
class Sample:
    """A labelled window; ``label`` is the look-ahead aggregate of the label tag."""

    t_end: float
    features: np.ndarray
    label: float


def window_aggregates(x: np.ndarray, ok: np.ndarray, t_s: np.ndarray) -> np.ndarray:
    """Every aggregate of every column over the valid points.

    Parameters
    ----------
    x : float64 (W, C) values (anything where ``ok`` is False is ignored)
    ok : bool (W, C) which points are valid
    t_s : float64 (W,) the points' times in seconds (for ``slope``)

    Returns
    -------
    float64 (len(AGG_ORDER), C): rows in :data:`AGG_ORDER` order; NaN for a column
    without a valid point. ``std`` is the population deviation; ``slope`` is the
    least-squares slope per second (0 with fewer than two distinct times).
    """
    w, c = x.shape
    out = np.full((len(AGG_ORDER), c), np.nan)
    n = ok.sum(axis=0)
    has = n > 0
    if not has.any():
        return out
    nn = np.where(has, n, 1).astype(np.float64)
    xz = np.where(ok, x, 0.0)
    mean = xz.sum(axis=0) / nn
    dev = np.where(ok, x - mean, 0.0)
    var = (dev * dev).sum(axis=0) / nn
    first = np.argmax(ok, axis=0)
    last = w - 1 - np.argmax(ok[::-1], axis=0)
    cols = np.arange(c)
    tt = np.broadcast_to(t_s[:, None], (w, c))
    tmean = np.where(ok, tt, 0.0).sum(axis=0) / nn
    tdev = np.where(ok, tt - tmean, 0.0)
    tvar = (tdev * tdev).sum(axis=0)
    cov = (tdev * dev).sum(axis=0)
    slope = np.divide(cov, tvar, out=np.zeros(c), where=tvar > 0)
    rows = {
        Agg.LAST: x[last, cols],
        Agg.MEAN: mean,
        Agg.MIN: np.where(ok, x, np.inf).min(axis=0),
        Agg.MAX: np.where(ok, x, -np.inf).max(axis=0),
        Agg.STD: np.sqrt(var),
        Agg.RMS: np.sqrt((xz * xz).sum(axis=0) / nn),
        Agg.DELTA: x[last, cols] - x[first, cols],
        Agg.SLOPE: slope,
    }
    for agg, row in rows.items():
        out[_AGG_ROW[agg]] = np.where(has, row, np.nan)
    return out


class _History:
    """The recent values of one tag: times, values, quality codes (appended in order)."""

    __slots__ = ("ts", "val", "q")

    def __init__(self) -> None:
        self.ts: list[float] = []
        self.val: list[float] = []
        self.q: list[int] = []

    def prune(self, before_s: float) -> None:
        """Keep the newest entry at or before ``before_s`` and everything after it."""
        i = 0
        while i + 1 < len(self.ts) and self.ts[i + 1] <= before_s:
            i += 1
        if i:
            del self.ts[:i], self.val[:i], self.q[:i]


class Sampler:
    """Grid, windows and labels for the features of one :class:`SamplesConfig`.

    >>> from fedgate.agent.config import SamplesConfig, FeatureConfig, LabelConfig
    >>> cfg = SamplesConfig(grid_s=1, window_s=3, hop_s=3, max_gap_s=2, min_coverage=1,
    ...     features=(FeatureConfig(name="t_mean", tag="m.t", agg="mean"),),
    ...     label=LabelConfig(name="fault", tag="m.f", agg="max", horizon_s=2))
    >>> from types import SimpleNamespace as V
    >>> s = Sampler(cfg, start_s=0.0)
    >>> s.feed([V(name="m.t", value=float(i), ts=float(i), quality="good") for i in range(9)])
    >>> s.feed([V(name="m.f", value=float(i == 5), ts=float(i), quality="good") for i in range(9)])
    >>> windows, samples = s.advance(9.0)
    >>> [(w.t_end, float(w.features[0])) for w in windows]
    [(3.0, 2.0), (6.0, 5.0)]
    >>> [(x.t_end, x.label) for x in samples]
    [(3.0, 1.0), (6.0, 0.0)]
    """

    def __init__(self, cfg: SamplesConfig, *, start_s: float | None = None) -> None:
        self.cfg = cfg
        self.feature_names = cfg.feature_names
        tags = [f.tag for f in cfg.features] + ([cfg.label.tag] if cfg.label else [])
        self.tags: list[str] = list(dict.fromkeys(tags))
        self._col = {t: i for i, t in enumerate(self.tags)}
        self._feat_rows = np.array([_AGG_ROW[Agg(f.agg)] for f in cfg.features], dtype=np.intp)
        self._feat_cols = np.array([self._col[f.tag] for f in cfg.features], dtype=np.intp)
        self._feat_tag_cols = np.array(sorted({self._col[f.tag] for f in cfg.features}), dtype=np.intp)
        self._grid = float(cfg.grid_s)
        self._w = cfg.window_points
        self._h = cfg.hop_points
        self._hz = cfg.horizon_points
        self._need = max(1, math.ceil(cfg.min_coverage * self._w - 1e-9))
        self._delay = cfg.grid_s if cfg.delay_s is None else cfg.delay_s
        self._keep = self._w + self._hz + 1
        self._start = start_s
        self._hist = {t: _History() for t in self.tags}
        cap = 2 * self._keep + 64
        self._vals = np.zeros((cap, len(self.tags)))
        self._state = np.full((cap, len(self.tags)), _MISSING, dtype=np.int8)
        self._k0 = 0  # tick of row 0
        self._n = 0  # rows in use
        self._k_done: int | None = None  # last closed tick
        self._pending: deque[tuple[int, np.ndarray]] = deque()
        self.counters: dict[str, int] = dict.fromkeys(
            ("values", "values_bad", "values_out_of_order", "ticks", "ticks_skipped", "windows",
             "windows_low_coverage", "windows_bad_quality", "samples", "labels_invalid", "clock_steps"), 0)

    # ------------------------------------------------------------------ input
    def feed(self, values: Iterable[Any]) -> None:
        """Take tag values (``name``, ``value``, ``ts``, ``quality``); unknown tags are ignored."""
        for tv in values:
            hist = self._hist.get(tv.name)
            if hist is None:
                continue
            ts = float(tv.ts)
            if hist.ts and ts <= hist.ts[-1]:
                if ts < hist.ts[-1] - _CLOCK_STEP_S:
                    self._clock_step("a value went back %.0fs" % (hist.ts[-1] - ts))
                    hist = self._hist[tv.name]
                else:
                    self.counters["values_out_of_order"] += 1
                    continue
            value = tv.value
            q = _OK if tv.quality == "good" else _BAD
            if isinstance(value, (bool, int, float)) and not isinstance(value, str):
                num = float(value)
                if not math.isfinite(num):
                    num, q = math.nan, _BAD
            else:
                num, q = math.nan, _BAD
            self.counters["values"] += 1
            if q == _BAD:
                self.counters["values_bad"] += 1
            hist.ts.append(ts)
            hist.val.append(num)
            hist.q.append(q)

    # ------------------------------------------------------------------ clock
    def next_tick_s(self) -> float:
        """Wall-clock time at which :meth:`advance` has a new grid point to close."""
        if self._k_done is None:
            return 0.0
        return (self._k_done + 1) * self._grid + self._delay

    def next_due_s(self) -> float:
        """Wall-clock time at which :meth:`advance` has a window or a label to deliver.

        Waking only then (not on every grid point) lets the caller close many grid
        points in one vectorised call.
        """
        if self._k_done is None:
            return 0.0
        k = self._k_done + 1
        due = -(-k // self._h) * self._h
        if self._pending:
            due = min(due, self._pending[0][0] + self._hz)
        return max(due, k) * self._grid + self._delay

    def advance(self, now_s: float) -> tuple[list[Window], list[Sample]]:
        """Close every grid point up to ``now_s - delay``; return new windows and samples."""
        k_end = math.floor((now_s - self._delay) / self._grid + 1e-9)
        if self._k_done is None:
            if self._start is not None:
                start = self._start
            else:
                firsts = [h.ts[0] for h in self._hist.values() if h.ts]
                start = min(firsts) if firsts else now_s - self._delay
            self._k_done = math.ceil(start / self._grid - 1e-9) - 1
            self._k0 = self._k_done + 1
        if k_end < self._k_done - _CLOCK_STEP_S / self._grid:
            self._clock_step("the clock went back %.0fs" % ((self._k_done - k_end) * self._grid))
            self._k_done = k_end
            self._k0 = k_end + 1
            return [], []
        windows: list[Window] = []
        samples: list[Sample] = []
        if k_end <= self._k_done:
            return windows, samples
        n_new = k_end - self._k_done
        limit = 4 * self._keep + 1024
        if n_new > limit:  # a long stall or a clock jump: what lies between is missing anyway
            skip = n_new - self._keep
            self.counters["ticks_skipped"] += skip
            log.warning("sampler skipped %d grid points (the loop stalled or the clock jumped)", skip)
            self._n = 0
            self._pending.clear()
            self._k_done += skip
            self._k0 = self._k_done + 1
            n_new = k_end - self._k_done
        chunk = max(self._h, 64)
        k = self._k_done
        while k < k_end:
            stop = min(k + chunk, k_end)
            self._close_ticks(k + 1, stop, windows, samples)
            k = stop
            self._k_done = k
        t_done = k_end * self._grid
        for hist in self._hist.values():
            hist.prune(t_done)
        return windows, samples

    def _clock_step(self, why: str) -> None:
        log.warning("sampler restarts its grid: %s", why)
        self.counters["clock_steps"] += 1
        self._hist = {t: _History() for t in self.tags}
        self._n = 0
        self._pending.clear()
        self._k_done = None
        self._start = None

    # ------------------------------------------------------------------ grid
    def _close_ticks(self, k_first: int, k_last: int, windows: list[Window], samples: list[Sample]) -> None:
        ticks = np.arange(k_first, k_last + 1, dtype=np.float64) * self._grid
        m = ticks.size
        vals = np.full((m, len(self.tags)), np.nan)
        state = np.full((m, len(self.tags)), _MISSING, dtype=np.int8)
        for j, tag in enumerate(self.tags):
            hist = self._hist[tag]
            if not hist.ts:
                continue
            ts = np.asarray(hist.ts)
            idx = np.searchsorted(ts, ticks + 1e-9, side="right") - 1
            has = idx >= 0
            idc = np.where(has, idx, 0)
            fresh = has & (ticks - ts[idc] <= self.cfg.max_gap_s + 1e-9)
            q = np.asarray(hist.q, dtype=np.int8)[idc]
            vals[:, j] = np.where(fresh, np.asarray(hist.val)[idc], np.nan)
            state[:, j] = np.where(fresh, q, _MISSING)
        self._append(k_first, vals, state)
        self.counters["ticks"] += m
        for k in range(k_first, k_last + 1):
            if k % self._h == 0:
                self._close_window(k, windows)
            while self._pending and self._pending[0][0] + self._hz <= k:
                k_end, feats = self._pending.popleft()
                self._label(k_end, feats, samples)

    def _append(self, k_first: int, vals: np.ndarray, state: np.ndarray) -> None:
        m = vals.shape[0]
        if self._n and self._k0 + self._n != k_first:  # (only after a skip) start afresh
            self._n = 0
        if not self._n:
            self._k0 = k_first
        cap = self._vals.shape[0]
        if self._n + m > cap:
            keep = min(self._n, self._keep)
            drop = self._n - keep
            kept_vals = self._vals[drop:self._n].copy()
            kept_state = self._state[drop:self._n].copy()
            if keep + m > cap:
                self._vals = np.zeros((keep + m + 64, len(self.tags)))
                self._state = np.full((keep + m + 64, len(self.tags)), _MISSING, dtype=np.int8)
            self._vals[:keep] = kept_vals
            self._state[:keep] = kept_state
            self._k0 += drop
            self._n = keep
        self._vals[self._n:self._n + m] = vals
        self._state[self._n:self._n + m] = state
        self._n += m

    def _rows(self, k_from: int, k_to: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows for ticks ``k_from..k_to`` (inclusive); ticks not held count as missing."""
        n = k_to - k_from + 1
        vals = np.full((n, len(self.tags)), np.nan)
        state = np.full((n, len(self.tags)), _MISSING, dtype=np.int8)
        lo = max(k_from, self._k0)
        hi = min(k_to, self._k0 + self._n - 1)
        if lo <= hi:
            vals[lo - k_from:hi - k_from + 1] = self._vals[lo - self._k0:hi - self._k0 + 1]
            state[lo - k_from:hi - k_from + 1] = self._state[lo - self._k0:hi - self._k0 + 1]
        return vals, state

    def _valid(self, state: np.ndarray, cols: np.ndarray, need: int) -> str | None:
        sub = state[:, cols]
        if (sub == _BAD).any():
            return "bad"
        if ((sub == _OK).sum(axis=0) < need).any():
            return "coverage"
        return None

    def _close_window(self, k: int, windows: list[Window]) -> None:
        vals, state = self._rows(k - self._w + 1, k)
        why = self._valid(state, self._feat_tag_cols, self._need)
        if why is not None:
            self.counters["windows_bad_quality" if why == "bad" else "windows_low_coverage"] += 1
            return
        t_s = (np.arange(self._w, dtype=np.float64) - (self._w - 1)) * self._grid
        table = window_aggregates(vals, state == _OK, t_s)
        feats = table[self._feat_rows, self._feat_cols]
        t_end = k * self._grid
        self.counters["windows"] += 1
        windows.append(Window(t_end=t_end, features=feats))
        if self.cfg.label is not None:
            self._pending.append((k, feats))

    def _label(self, k: int, feats: np.ndarray, samples: list[Sample]) -> None:
        label = self.cfg.label
        assert label is not None
        if self._hz:
            vals, state = self._rows(k + 1, k + self._hz)
            need = max(1, math.ceil(self.cfg.min_coverage * self._hz - 1e-9))
        else:
            vals, state = self._rows(k - self._w + 1, k)
            need = self._need
        col = np.array([self._col[label.tag]], dtype=np.intp)
        if self._valid(state, col, need) is not None:
            self.counters["labels_invalid"] += 1
            return
        n = vals.shape[0]
        t_s = np.arange(n, dtype=np.float64) * self._grid
        table = window_aggregates(vals[:, col], state[:, col] == _OK, t_s)
        self.counters["samples"] += 1
        samples.append(Sample(t_end=k * self._grid, features=feats, label=float(table[_AGG_ROW[Agg(label.agg)], 0])))

    # ------------------------------------------------------------------ introspection
    @property
    def pending(self) -> int:
        """Valid windows waiting for their label horizon to pass."""
        return len(self._pending)
