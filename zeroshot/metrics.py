"""Zero-shot metrics: accuracy, per-class accuracy and confusion matrix (single-label tasks), average precision
and macro mAP (multi-label tasks, the paper's AS/FSD columns of Table VII).

Average precision follows scikit-learn's ``average_precision_score`` exactly (EVAR calls it): the
precision-recall curve is taken at every distinct score (tied scores form one step) and
AP = sum_n (R_n - R_{n-1}) P_n, with no interpolation. A class without a positive clip has no AP (NaN); the
macro mean counts it as 0, as scikit-learn does (which also warns), and :func:`mean_average_precision`
reports those classes so they can be spotted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from m2dclap.metrics import accuracy, average_precision, mean_average_precision  # noqa: F401  (re-exported)


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
