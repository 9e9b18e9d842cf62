"""scikit-learn's 8x8 handwritten digits: embedded, so every study runs without a download."""

from __future__ import annotations

import functools

import numpy as np

from dlassign.data.folds import stratified_split
from dlassign.data.sources import DatasetSpec, Split

TEST_FRACTION = 0.25


def load(split: str) -> Split:
    """The 1,797 digits split 75/25, stratified with a fixed seed (1,347 train / 450 test);
    pixels 0..16 rescaled to 0..255."""
    images, labels, train_idx, test_idx = _digits()
    idx = train_idx if split == "train" else test_idx
    return Split(images[idx], labels[idx])  # copies: the cached arrays stay as they are


@functools.cache
def _digits() -> tuple[np.ndarray, ...]:
    """Read and split once per process: scikit-learn parses its CSV on every call, and a job's
    studies prepare the digits many times."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    arrays = (images, labels, *stratified_split(labels, test_fraction=TEST_FRACTION, seed=0))
    for a in arrays:  # shared by every caller in the process
        a.setflags(write=False)
    return arrays


DATASETS = (DatasetSpec("digits", 10, (8, 8, 1), local_files="(embedded, none needed)",
                        embedded=load),)
