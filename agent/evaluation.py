"""Small, exact evaluation metrics (the definitions scikit-learn uses).

>>> import numpy as np
>>> y = np.array([0, 0, 1, 1]); p = np.array([0.1, 0.4, 0.35, 0.8])
>>> roc_auc(y, p)
0.75
>>> accuracy(y, p >= 0.5), f1_score(y, p >= 0.5)
(0.75, 0.6666666666666666)
"""
from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "f1_score", "roc_auc", "mean_absolute_error", "r2_score"]


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of equal entries; ``y_true``/``y_pred`` (n,) class ids."""
    y_true = np.asarray(y_true).astype(np.int64)
    y_pred = np.asarray(y_pred).astype(np.int64)
    if y_true.size == 0:
        return float("nan")
    return float((y_true == y_pred).mean())


def f1_score(y_true: np.ndarray, y_pred: np.ndarray, *, n_classes: int = 2) -> float:
    """Binary F1 of class 1 (``n_classes == 2``), else the macro average over classes.

    A class with no true and no predicted member scores 0 (scikit-learn's
    ``zero_division=0``), so binary F1 without any positive is 0.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    y_pred = np.asarray(y_pred).astype(np.int64)

    def one(c: int) -> float:
        tp = float(np.sum((y_true == c) & (y_pred == c)))
        fp = float(np.sum((y_true != c) & (y_pred == c)))
        fn = float(np.sum((y_true == c) & (y_pred != c)))
        denom = 2 * tp + fp + fn
        return 0.0 if denom == 0 else 2 * tp / denom

    if n_classes == 2:
        return one(1)
    present = np.union1d(y_true, y_pred)
    return float(np.mean([one(int(c)) for c in present])) if present.size else 0.0


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of a binary problem (ties count one half).

    NaN when only one class is present (the area is undefined).
    """
    y = np.asarray(y_true).astype(np.int64) == 1
    s = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average ranks of tied groups (1-based)
    bounds = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [s.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def mean_absolute_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of ``|y_true - y_pred|`` over (n,) or (n, k) arrays."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(y_true.shape)
    return float(np.abs(y_true - y_pred).mean()) if y_true.size else float("nan")


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination, ``1 - SS_res / SS_tot`` ((n,) arrays).

    With a constant ``y_true`` it is 1.0 for a perfect fit and 0.0 otherwise
    (scikit-learn's ``force_finite``).
    """
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.float64).ravel()
    if y_true.size == 0:
        return float("nan")
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    if ss_tot == 0:
        return 1.0 if ss_res == 0 else 0.0
    return 1.0 - ss_res / ss_tot
