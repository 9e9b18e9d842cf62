"""Reading a dataset split as `uint8[N, H, W, C]` images and `int32[N]` labels.

Three sources, tried in this order:

* embedded: scikit-learn's 8x8 handwritten `digits` (no download);
* a local directory (`data_dir`) holding the raw files users already have: MNIST IDX files
  (gzipped or not) or a Keras `mnist.npz`; SVHN `train_32x32.mat` / `test_32x32.mat`;
* TFDS (`tfds.data_source`), which downloads and builds the dataset on first use.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from collections.abc import Callable

import numpy as np

from dlassign.errors import DataError, one_of

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
      images: uint8[N, H, W, C].
      labels: int32[N], in [0, num_classes).
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> Split:
        return Split(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    tfds_name: str | None
    local_files: str  # what a user should put in data_dir, for error messages


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, (8, 8, 1), None, "(embedded, none needed)"),
    "mnist": DatasetInfo(
        "mnist", 10, (28, 28, 1), "mnist",
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz], or a Keras mnist.npz"),
    "svhn_cropped": DatasetInfo(
        "svhn_cropped", 10, (32, 32, 3), "svhn_cropped", "train_32x32.mat and test_32x32.mat"),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise one_of("dataset", name, DATASETS)
    return DATASETS[name]


def load_split(
    name: str, split: str, data_dir: str | None = None, tfds_data_dir: str | None = None
) -> Split:
    """Loads one split of a dataset.

    Args:
      name: 'digits', 'mnist' or 'svhn_cropped'.
      split: 'train' or 'test'.
      data_dir: a directory of raw files (see module docstring); when given, TFDS is not tried.
      tfds_data_dir: where TFDS keeps its prepared datasets (TFDS's default when None).

    Returns:
      The split, validated: uint8 images of the dataset's shape and labels in range.

    Raises:
      DataError: the files are missing or malformed, or TFDS could not provide the dataset; the
        message names the dataset, what was tried, and how to point at local files.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise one_of("split", split, SPLITS)
    if name == "digits":
        result = _load_digits(split)
        source = "scikit-learn's embedded digits"
    elif data_dir:
        result = _LOCAL_READERS[name](data_dir, split)
        source = f"data_dir {data_dir!r}"
    else:
        result = _load_tfds(info, split, tfds_data_dir)
        source = "TFDS"
    return _validate(result, info, split, source)


def _validate(s: Split, info: DatasetInfo, split: str, source: str) -> Split:
    where = f"{info.name} {split} split from {source}"
    if s.images.ndim != 4 or tuple(s.images.shape[1:]) != info.image_shape:
        raise DataError(f"{where}: images have shape {s.images.shape}; "
                        f"expected (N, {', '.join(map(str, info.image_shape))})")
    if s.images.dtype != np.uint8:
        raise DataError(f"{where}: images have dtype {s.images.dtype}; expected uint8")
    if s.labels.shape != (s.images.shape[0],):
        raise DataError(f"{where}: {s.labels.shape[0] if s.labels.ndim else 0} labels for "
                        f"{s.images.shape[0]} images")
    if len(s) == 0:
        raise DataError(f"{where} is empty")
    if not np.issubdtype(s.labels.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {s.labels.dtype}; expected integers")
    lo, hi = int(s.labels.min()), int(s.labels.max())
    if lo < 0 or hi >= info.num_classes:
        raise DataError(f"{where}: labels span [{lo}, {hi}]; expected [0, {info.num_classes - 1}]")
    return Split(np.ascontiguousarray(s.images), s.labels.astype(np.int32))


# ----------------------------------------------------------------------------------- embedded


def _load_digits(split: str) -> Split:
    """scikit-learn's 1,797 8x8 digits, split 75/25 stratified with a fixed seed (1347/450)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    from dlassign.data.folds import stratified_split

    train_idx, test_idx = stratified_split(labels, test_fraction=0.25, seed=0)
    idx = train_idx if split == "train" else test_idx
    return Split(images[idx], labels[idx])


# ------------------------------------------------------------------------------------- local


def _read_maybe_gzip(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (MNIST's format), gzipped or not, as a uint8 array."""
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(raw)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file "
                        f"(magic {raw[:4].hex()}; expected 00000801 or 00000803)")
    header = 4 + 4 * ndim
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or padded: header says {dims} "
                        f"({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(data_dir: str, candidates: list[str]) -> str | None:
    for c in candidates:
        p = os.path.join(data_dir, c)
        if os.path.isfile(p):
            return p
    return None


def _require_dir(data_dir: str, name: str) -> None:
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} for dataset '{name}' is not a directory; expected "
                        f"one holding {DATASETS[name].local_files}")


def _load_mnist_local(data_dir: str, split: str) -> Split:
    _require_dir(data_dir, "mnist")
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind, ndim in (("images", 3), ("labels", 1)):
        stem = f"{prefix}-{kind}"
        names = [f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte"]
        found[kind] = _find(data_dir, names + [n + ".gz" for n in names])
    if found["images"] and found["labels"]:
        images, labels = read_idx(found["images"]), read_idx(found["labels"])
        if images.ndim != 3:
            raise DataError(f"{found['images']} holds a {images.ndim}-d array {images.shape}; "
                            "expected (N, 28, 28)")
        return Split(images[..., None], labels.astype(np.int32))
    npz = _find(data_dir, ["mnist.npz"])
    if npz:
        try:
            with np.load(npz) as z:
                x, y = z[f"x_{split}"], z[f"y_{split}"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read {npz}: {e}; expected a Keras mnist.npz with "
                            "x_train, y_train, x_test, y_test") from None
        return Split(x[..., None] if x.ndim == 3 else x, y)
    raise DataError(f"no MNIST {split} files in data_dir {data_dir!r}; expected "
                    f"{DATASETS['mnist'].local_files}")


def _load_svhn_local(data_dir: str, split: str) -> Split:
    _require_dir(data_dir, "svhn_cropped")
    path = _find(data_dir, [f"{split}_32x32.mat"])
    if path is None:
        raise DataError(f"no {split}_32x32.mat in data_dir {data_dir!r}; expected "
                        f"{DATASETS['svhn_cropped'].local_files}")
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read {path}: {e}; expected a MATLAB file with X[32, 32, 3, N] "
                        "and y[N, 1]") from None
    if x.ndim != 4:
        raise DataError(f"{path}: X has shape {x.shape}; expected (32, 32, 3, N)")
    y = np.asarray(y).reshape(-1)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels span [{y.min()}, {y.max()}]; SVHN's .mat files use "
                        "1..10 (10 stands for the digit 0)")
    # SVHN's files write the digit 0 as label 10; TFDS's svhn_cropped maps it to 0, as we do.
    return Split(np.transpose(x, (3, 0, 1, 2)), (y % 10).astype(np.int32))


_LOCAL_READERS: dict[str, Callable[[str, str], Split]] = {
    "mnist": _load_mnist_local,
    "svhn_cropped": _load_svhn_local,
}


# -------------------------------------------------------------------------------------- TFDS


def _load_tfds(info: DatasetInfo, split: str, tfds_data_dir: str | None) -> Split:
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(info.tfds_name, split=split, data_dir=tfds_data_dir)
        n = len(source)
        records = [source[i] for i in range(n)]
    except Exception as e:  # TFDS raises many unrelated types when offline or half-installed.
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise DataError(
            f"could not load dataset '{info.name}' split '{split}' through TFDS ({reason}). "
            "TFDS downloads and builds it on first use, which needs internet and "
            "`pip install 'dlassign[tfds-build]'`. Without internet, point at local files with "
            f"--config.data.data_dir=DIR, DIR holding {info.local_files}"
        ) from None
    if n == 0:
        return Split(np.zeros((0, *info.image_shape), np.uint8), np.zeros((0,), np.int32))
    images = np.stack([np.asarray(r["image"]) for r in records])
    labels = np.asarray([int(r["label"]) for r in records], np.int32)
    return Split(images, labels)
