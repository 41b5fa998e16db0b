"""The plant supports the fault-warning story the demo tells.

Windows are built the way the agent builds them (grid, window aggregates, a label that
looks ahead over the horizon). A model pooled from three sites warns of faults at those
sites and at the new line, whose own early history holds no fault to learn from.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from fedgate.drivers.sim.plant import PROFILES, Plant, fault_within

GRID, WINDOW, HORIZON = 30, 10, 10  # steps per sample; samples per window; samples looked ahead


def _samples(trace, machine: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    sl = slice(lo, hi, GRID)
    vib = trace.signals["vibration_mm_s"][sl, machine]
    temp = trace.signals["temperature_c"][sl, machine]
    load = trace.signals["load_pct"][sl, machine]
    fault = trace.fault[sl, machine][:, None]
    soon = fault_within(fault, HORIZON)[:, 0]
    wv, wt, wl = (sliding_window_view(a, WINDOW) for a in (vib, temp, load))
    x = np.arange(WINDOW) - (WINDOW - 1) / 2
    slope = lambda w: (w * x).sum(axis=1) / (x * x).sum()  # noqa: E731
    feats = np.column_stack([wv.mean(1), wv.max(1), slope(wv), wt.mean(1), slope(wt), wl.mean(1)])
    labels = soon[WINDOW - 1 :]  # the window ending at sample t is labelled over (t, t + horizon]
    n = len(labels) - HORIZON  # the last windows' horizons run past the data
    return feats[:n], labels[:n]


def test_pooled_model_warns_at_every_site_including_the_new_line():
    names = ["standard", "heavy", "light", "new-line"]
    trace = Plant([PROFILES[n] for n in names], seed=1).run(36000)
    split = 24000
    fault_free = int(PROFILES["new-line"].fault_free_s)

    _, y_new_early = _samples(trace, 3, 0, fault_free)
    assert not y_new_early.any(), "the new line's own early history has no positive label"

    train = [_samples(trace, m, 0, split) for m in range(3)]
    x_tr = np.vstack([t[0] for t in train])
    y_tr = np.concatenate([t[1] for t in train])
    scaler = StandardScaler().fit(x_tr)
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(x_tr), y_tr)

    for m, name in enumerate(names):
        x_te, y_te = _samples(trace, m, split, len(trace.step))
        assert y_te.any() and not y_te.all(), name
        auc = roc_auc_score(y_te, model.predict_proba(scaler.transform(x_te))[:, 1])
        assert auc > 0.9, f"{name}: AUC {auc:.3f}"
