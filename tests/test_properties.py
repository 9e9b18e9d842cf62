"""Property tests: fold splits, padded evaluation and metrics hold for any input."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dlassign.data import Split, eval_batches, stratified_kfold, stratified_subset
from dlassign.training.metrics import classification_metrics

labels_st = st.lists(st.integers(0, 6), min_size=6, max_size=300).map(np.asarray)


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, k=st.integers(2, 6), seed=st.integers(0, 2**31))
def test_folds_partition_and_stratify(labels, k, seed):
    k = min(k, labels.size)
    folds = stratified_kfold(labels, k, seed)
    vals = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(vals), np.arange(labels.size))  # disjoint and covering
    sizes = [v.size for _, v in folds]
    assert max(sizes) - min(sizes) <= 1
    for train, val in folds:
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
        for c in np.unique(labels):
            share = np.sum(labels[val] == c)
            assert abs(share - np.sum(labels == c) / k) < 1.0 + 1e-9
    again = stratified_kfold(labels, k, seed)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


@settings(max_examples=60, deadline=None)
@given(labels=labels_st, fraction=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_subset_takes_each_class_share(labels, fraction, seed):
    idx = stratified_subset(labels, fraction, seed)
    assert np.unique(idx).size == idx.size
    for c in np.unique(labels):
        n = np.sum(labels == c)
        assert np.sum(labels[idx] == c) == max(1, int(round(fraction * n)))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), batch=st.integers(1, 64))
def test_padded_evaluation_sees_each_example_once(n, batch):
    split = Split(np.arange(n).reshape(n, 1, 1, 1).astype(np.uint8),
                  (np.arange(n) % 3).astype(np.int32))
    seen = []
    for b in eval_batches(split, batch):
        assert b["image"].shape[0] == b["label"].shape[0] == b["mask"].shape[0] == batch
        seen.extend(b["image"][b["mask"], 0, 0, 0].tolist())
    assert seen == list(range(n))


@settings(max_examples=80, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1,
                      max_size=200))
def test_metrics_bounds_and_identities(pairs):
    labels, preds = np.asarray(pairs).T
    m = classification_metrics(labels, preds, 5)
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert 0.0 <= m[key] <= 1.0
    assert m["accuracy"] == np.mean(labels == preds)
    assert sum(m["per_class"]["support"]) == labels.size
    for p, r, f in zip(m["per_class"]["precision"], m["per_class"]["recall"],
                       m["per_class"]["f1"]):
        assert f <= max(p, r) + 1e-12 and f >= min(p, r) - 1e-12 or f == 0.0
    perfect = classification_metrics(labels, labels, 5)
    present = np.unique(labels).size
    assert perfect["accuracy"] == 1.0
    assert np.isclose(perfect["recall_macro"], present / 5)
