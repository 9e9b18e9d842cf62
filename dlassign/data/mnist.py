"""MNIST: TFDS `mnist`, or a directory of the four IDX files (gzipped or not) or a Keras
`mnist.npz`."""

from __future__ import annotations

import os

import numpy as np

from dlassign.data.formats import find_file, has_idx_files, read_idx_split
from dlassign.data.sources import DatasetSpec, Split
from dlassign.errors import DataError

NUM_CLASSES = 10
LOCAL_FILES = ("train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
               "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], or a Keras mnist.npz")


def read_local(data_dir: str, split: str) -> Split:
    """One split from IDX files, else from `mnist.npz` (x_train, y_train, x_test, y_test)."""
    found = read_idx_split(data_dir, split, "mnist", LOCAL_FILES, NUM_CLASSES)
    if found is not None:
        return found
    npz = find_file(data_dir, ["mnist.npz"])
    if npz is None:
        raise DataError(f"no MNIST {split} files in data_dir {data_dir!r}; expected "
                        f"{LOCAL_FILES}")
    try:
        with np.load(npz) as z:
            x, y = z[f"x_{split}"], z[f"y_{split}"]
    except Exception as e:  # zipfile, pickle and numpy raise many types for a damaged file
        raise DataError(f"cannot read {npz}: {e}; expected a Keras mnist.npz with "
                        "x_train, y_train, x_test, y_test") from None
    return Split(x[..., None] if x.ndim == 3 else x, y)


def has_local_files(data_dir: str) -> bool:
    return has_idx_files(data_dir) or os.path.isfile(os.path.join(data_dir, "mnist.npz"))


DATASETS = (DatasetSpec("mnist", NUM_CLASSES, (28, 28, 1), tfds_name="mnist",
                        local_files=LOCAL_FILES, read_local=read_local,
                        has_local_files=has_local_files),)
