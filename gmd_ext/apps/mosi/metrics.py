"""The MMSA sentiment-regression metrics for CMU-MOSI / CMU-MOSEI.

Reimplements, with the same definitions, what thuiar/MMSA reports for MOSI/MOSEI regression
(``MetricsTop.__eval_mosei_regression`` in ``src/MMSA/utils/metricsTop.py``), so numbers are comparable with
the papers that use that toolkit (the GMD paper included):

- ``Has0_acc_2`` / ``Has0_F1_score``: binary "negative vs non-negative": ``truth >= 0`` against ``pred >= 0`` over
  every sample; accuracy and the support-weighted F1 (sklearn ``average="weighted"``).
- ``Non0_acc_2`` / ``Non0_F1_score``: "negative vs positive": samples whose truth is exactly 0 are dropped, then
  ``truth > 0`` against ``pred > 0``; accuracy and weighted F1.
- ``Mult_acc_5`` / ``Mult_acc_7``: clip both to [-2, 2] (5 classes) or [-3, 3] (7 classes), round to the nearest
  integer with ``np.round`` (half to even: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2), fraction of equal classes.
- ``MAE``: mean absolute error on the unclipped values.
- ``Corr``: Pearson correlation (``np.corrcoef``) on the unclipped values.

Differences from MMSA, deliberately:

- MMSA rounds every output to 4 decimals; here values are returned at full precision by default, because the
  recipes average over seeds and combinations and rounding first biases the mean. ``decimals=4`` reproduces MMSA's
  reported numbers exactly (Python ``round``, as MMSA does).
- Values are computed in float64 (MMSA works in the tensors' float32; only MAE can differ, in the 7th digit).
- Where MMSA would crash (no non-zero truth) the Non0 metrics are NaN; a constant prediction or truth gives a NaN
  ``Corr`` exactly as ``np.corrcoef`` does in MMSA (without its RuntimeWarning).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score

__all__ = ["sentiment_metrics", "METRIC_NAMES", "LOWER_IS_BETTER"]

METRIC_NAMES = ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7", "MAE",
                "Corr")
LOWER_IS_BETTER = frozenset({"MAE"})


def _as_vector(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"sentiment_metrics: {name} must be a 1-D array or tensor of numbers, got "
                        f"{type(x).__name__}") from e
    if arr.ndim != 1:
        raise ValueError(f"sentiment_metrics: {name} must be 1-D (N,), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"sentiment_metrics: {name} is empty; need at least one sample")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"sentiment_metrics: {name} has {int(bad.sum())} non-finite value(s) "
                         f"(first at index {int(np.flatnonzero(bad)[0])})")
    return arr


def _binary(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    if truth.size == 0:
        return math.nan, math.nan
    # zero_division=0 is sklearn's default value for an empty class, minus the warning.
    return (float(accuracy_score(truth, pred)),
            float(f1_score(truth, pred, average="weighted", zero_division=0)))


def _class_acc(pred: np.ndarray, truth: np.ndarray, bound: float) -> float:
    return float(np.mean(np.round(np.clip(pred, -bound, bound)) == np.round(np.clip(truth, -bound, bound))))


def sentiment_metrics(pred, truth, *, decimals: int | None = None) -> dict[str, float]:
    """MMSA's MOSI/MOSEI regression metrics.

    Args:
        pred: predicted sentiment, shape (N,), any real dtype (numpy array, tensor or sequence).
        truth: reference sentiment in [-3, 3], shape (N,).
        decimals: ``None`` (default) returns full precision; ``4`` rounds like MMSA's reported values.

    Returns:
        dict with exactly the keys of :data:`METRIC_NAMES` (Python floats; accuracies and F1 in [0, 1]).

    Raises:
        TypeError: an input is not numeric.
        ValueError: an input is not 1-D, is empty, holds NaN/Inf, or the lengths differ.
    """
    pred = _as_vector(pred, "pred")
    truth = _as_vector(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"sentiment_metrics: pred and truth must have the same length, got {pred.size} and "
                         f"{truth.size}")
    if decimals is not None and (isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 0):
        raise ValueError(f"sentiment_metrics: decimals must be None or an int >= 0, got {decimals!r}")

    has0_acc, has0_f1 = _binary(truth >= 0, pred >= 0)
    nz = truth != 0
    non0_acc, non0_f1 = _binary(truth[nz] > 0, pred[nz] > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = float(np.corrcoef(pred, truth)[0, 1]) if pred.size > 1 else math.nan
    out = {
        "Has0_acc_2": has0_acc,
        "Has0_F1_score": has0_f1,
        "Non0_acc_2": non0_acc,
        "Non0_F1_score": non0_f1,
        "Mult_acc_5": _class_acc(pred, truth, 2.0),
        "Mult_acc_7": _class_acc(pred, truth, 3.0),
        "MAE": float(np.mean(np.abs(pred - truth))),
        "Corr": corr,
    }
    if decimals is not None:
        out = {k: round(v, decimals) for k, v in out.items()}
    return out
