"""SVHN's cropped digits: TFDS `svhn_cropped`, or the `train_32x32.mat` / `test_32x32.mat`
files."""

from __future__ import annotations

import os

import numpy as np

from dlassign.data.formats import find_file, require_dir
from dlassign.data.sources import DatasetSpec, Split
from dlassign.errors import DataError

LOCAL_FILES = "train_32x32.mat and test_32x32.mat"


def read_local(data_dir: str, split: str) -> Split:
    """X[32, 32, 3, N] and y[N, 1] of a MATLAB file; label 10 (SVHN's digit 0) read as 0."""
    require_dir(data_dir, "svhn_cropped", LOCAL_FILES)
    path = find_file(data_dir, [f"{split}_32x32.mat"])
    if path is None:
        raise DataError(f"no {split}_32x32.mat in data_dir {data_dir!r}; expected {LOCAL_FILES}")
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"]
    except Exception as e:  # scipy raises many types (MatReadError, ValueError, ...) for bad files
        raise DataError(f"cannot read {path}: {e}; expected a MATLAB (v5) file with "
                        "X[32, 32, 3, N] and y[N, 1]") from None
    if x.ndim != 4:
        raise DataError(f"{path}: X has shape {x.shape}; expected (32, 32, 3, N)")
    y = np.asarray(y).reshape(-1)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels span [{y.min()}, {y.max()}]; SVHN's .mat files use "
                        "1..10 (10 stands for the digit 0)")
    # SVHN's files write the digit 0 as label 10; TFDS's svhn_cropped maps it to 0, as we do.
    return Split(np.transpose(x, (3, 0, 1, 2)), (y % 10).astype(np.int32))


def has_local_files(data_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(data_dir, f"{s}_32x32.mat")) for s in ("train", "test"))


DATASETS = (DatasetSpec("svhn_cropped", 10, (32, 32, 3), tfds_name="svhn_cropped",
                        local_files=LOCAL_FILES, read_local=read_local,
                        has_local_files=has_local_files),)
