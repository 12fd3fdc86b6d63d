"""Zero-shot metrics: accuracy, per-class accuracy and confusion matrix (single-label tasks), average precision
and macro mAP (multi-label tasks, the paper's AS/FSD columns of Table VII).

Average precision follows scikit-learn's ``average_precision_score`` exactly (EVAR calls it): the
precision-recall curve is taken at every distinct score (tied scores form one step) and
AP = sum_n (R_n - R_{n-1}) P_n, with no interpolation. A class without a positive clip gets AP 0, as in
scikit-learn (which also warns); :func:`mean_average_precision` reports those classes so they can be spotted.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _as_2d(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, C), got shape {s.shape}")
    return s


def accuracy(scores, targets: Sequence[int]) -> float:
    """Top-1 accuracy of (N, C) scores against (N,) class indices."""
    s, t = _as_2d(scores), np.asarray(targets)
    if len(t) != len(s):
        raise ValueError(f"{len(s)} score rows but {len(t)} targets")
    if len(t) == 0:
        return float("nan")
    return float((s.argmax(axis=1) == t).mean())


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int], n_classes: int) -> np.ndarray:
    """(C, C) counts; rows are the true class, columns the predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix (NaN for a class without clips)."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def average_precision(y_true, scores) -> float:
    """AP of one class: y_true (N,) in {0, 1}, scores (N,). NaN when there is no positive."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    # the last position of each run of tied scores is a threshold of the curve
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(y_true, scores, no_positive: str = "zero") -> tuple[float, np.ndarray, list[int]]:
    """Macro mAP over classes of (N, C) 0/1 targets and (N, C) scores.

    Returns ``(mAP, per-class AP (C,), indices of classes without a positive)``. Those classes count as AP 0
    with ``no_positive="zero"`` (scikit-learn's and EVAR's figure) or are left out of the mean with
    ``"exclude"``; their per-class AP is NaN either way.
    """
    y, s = np.asarray(y_true), _as_2d(scores)
    if y.shape != s.shape:
        raise ValueError(f"targets {y.shape} and scores {s.shape} differ in shape")
    if no_positive not in ("zero", "exclude"):
        raise ValueError(f"no_positive must be 'zero' or 'exclude', got {no_positive!r}")
    ap = np.array([average_precision(y[:, c], s[:, c]) for c in range(s.shape[1])])
    empty = [int(c) for c in np.flatnonzero(np.isnan(ap))]
    if empty:
        log.warning("%d of %d class(es) have no positive clip; their AP is %s", len(empty), len(ap),
                    "0 in the mean (as scikit-learn)" if no_positive == "zero" else "left out of the mean")
    if len(empty) == len(ap):
        return float("nan"), ap, empty
    mean = np.nan_to_num(ap, nan=0.0).mean() if no_positive == "zero" else np.nanmean(ap)
    return float(mean), ap, empty
