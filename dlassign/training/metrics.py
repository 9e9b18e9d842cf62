"""Classification metrics from predictions, computed on the host in float64."""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """int64[K, K]; row = true class, column = predicted class."""
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(
        num_classes, num_classes)


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    """Accuracy and macro precision, recall and F1, as fractions in [0, 1].

    Macro averages weight every class equally. A class never predicted has precision 0 and a
    class absent from `labels` has recall 0 (scikit-learn's zero_division=0), which is what makes
    a collapsed classifier's macro scores low.

    Args:
      labels: int[N] true classes.
      preds: int[N] predicted classes.
      num_classes: K.

    Returns:
      accuracy, precision_macro, recall_macro, f1_macro (floats), num_examples (int) and the
      per-class precision, recall, f1 and support (lists of length K).
    """
    cm = confusion_matrix(labels, preds, num_classes).astype(np.float64)
    tp = np.diag(cm)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    n = cm.sum()
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "num_examples": int(n),
        "per_class": {
            "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": support.astype(int).tolist(),
        },
    }


def prediction_collapse(preds: np.ndarray, num_classes: int, threshold: float = 0.9) -> dict:
    """Flags a classifier whose predictions pile onto one or two classes.

    Args:
      preds: int[N] predicted classes.
      num_classes: K; with K <= 2 collapse onto two classes is not meaningful and is never flagged.
      threshold: the share of predictions that the two most predicted classes may not reach.

    Returns:
      collapsed (bool), top_classes (the two most predicted), share (their fraction of predictions).
    """
    counts = np.bincount(np.asarray(preds, np.int64), minlength=num_classes)
    top = np.argsort(-counts, kind="stable")[:2]
    share = float(counts[top].sum() / max(counts.sum(), 1))
    return {"collapsed": bool(num_classes > 2 and share >= threshold),
            "top_classes": top.tolist(), "share": share}
