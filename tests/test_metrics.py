"""Metrics against values worked out by hand, and against scikit-learn."""

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from dlassign.training.metrics import classification_metrics, confusion_matrix, prediction_collapse


def test_macro_metrics_by_hand():
    # Fixed logits for 6 examples, 3 classes; argmax gives preds [0, 1, 1, 2, 0, 2].
    logits = np.array([[3, 1, 0], [0, 2, 1], [1, 4, 0], [0, 1, 5], [2, 1, 1], [0, 0, 1.0]])
    labels = np.array([0, 1, 0, 2, 1, 2])
    preds = logits.argmax(1)
    m = classification_metrics(labels, preds, 3)
    # class 0: tp 1, predicted 2, support 2 -> p 1/2, r 1/2, f1 1/2
    # class 1: tp 1, predicted 2, support 2 -> p 1/2, r 1/2, f1 1/2
    # class 2: tp 2, predicted 2, support 2 -> p 1,   r 1,   f1 1
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision_macro"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert m["f1_macro"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    np.testing.assert_array_equal(confusion_matrix(labels, preds, 3),
                                  [[1, 1, 0], [1, 1, 0], [0, 0, 2]])


def test_unequal_precision_and_recall_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 1, 1])
    m = classification_metrics(labels, preds, 3)
    # p = [2/2, 2/4, 0], r = [2/3, 2/2, 0/1], f1 = [0.8, 2/3, 0]
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)


def test_agrees_with_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    preds[preds == 3] = 4  # a class that is never predicted
    m = classification_metrics(labels, preds, 10)
    kw = dict(average="macro", zero_division=0, labels=range(10))
    assert m["precision_macro"] == pytest.approx(precision_score(labels, preds, **kw))
    assert m["recall_macro"] == pytest.approx(recall_score(labels, preds, **kw))
    assert m["f1_macro"] == pytest.approx(f1_score(labels, preds, **kw))


def test_collapse_detection():
    labels = np.arange(1000) % 10
    collapsed = classification_metrics(labels, np.full(1000, 3), 10)
    # The write-up's VGG-16: one class predicted, recall 0.1000 exactly.
    assert collapsed["recall_macro"] == pytest.approx(0.1)
    assert prediction_collapse(np.full(1000, 3), 10)["collapsed"]
    two = np.where(np.arange(1000) % 2 == 0, 1, 7)
    assert prediction_collapse(two, 10) == {"collapsed": True, "top_classes": [1, 7],
                                            "share": 1.0}
    assert not prediction_collapse(labels, 10)["collapsed"]
    assert not prediction_collapse(np.zeros(10, int), 2)["collapsed"]
