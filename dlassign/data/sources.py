"""Reading a dataset split as `uint8[N, H, W, C]` images and `int32[N]` labels.

Each dataset is declared once, in a module of this package that exports `DATASETS` (a tuple of
`DatasetSpec`): its classes, image shape, TFDS name and local file formats. A split comes from,
in this order:

* embedded data that needs no download (scikit-learn's `digits`);
* a local directory (`data_dir`) holding the raw files users already have, read by the
  dataset's own reader;
* TFDS (`tfds.data_source`), which downloads and builds the dataset on first use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from dlassign.discovery import collect
from dlassign.errors import DataError, DlassignError, one_of

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
class DatasetSpec:
    """Everything about one dataset that code outside its module needs.

    Attributes:
      name: the config's `data.name`.
      num_classes: labels are 0..num_classes-1.
      image_shape: (H, W, C) as stored.
      tfds_name: the TFDS builder, or None where TFDS has none.
      local_files: what `data_dir` should hold, in words, for messages.
      read_local: (data_dir, split) -> Split from the raw files; None: no local format.
      has_local_files: data_dir -> whether it holds the files (checked before any compute).
      embedded: split -> Split without any download; None for downloaded datasets.
      class_names: a name per label, where the labels are not their own names.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    tfds_name: str | None = None
    local_files: str = ""
    read_local: Callable[[str, str], Split] | None = None
    has_local_files: Callable[[str], bool] | None = None
    embedded: Callable[[str], Split] | None = None
    class_names: tuple[str, ...] | None = None

    def class_name(self, label: int) -> str:
        return self.class_names[label] if self.class_names else str(label)


@functools.cache
def datasets() -> dict[str, DatasetSpec]:
    """Every registered dataset by name, collected from the modules of `dlassign.data`."""
    return collect("dlassign.data", "DATASETS")


def dataset_info(name: str) -> DatasetSpec:
    """The declared facts of one dataset; an unknown name lists the registered ones."""
    specs = datasets()
    if name not in specs:
        raise one_of("dataset", name, specs)
    return specs[name]


def load_split(
    name: str, split: str, data_dir: str | None = None, tfds_data_dir: str | None = None
) -> Split:
    """Loads one split of a dataset.

    Args:
      name: a registered dataset (see `datasets()`).
      split: 'train' or 'test'.
      data_dir: a directory of raw files (see the dataset's `local_files`); when given, TFDS is
        not tried.
      tfds_data_dir: where TFDS keeps its prepared datasets (TFDS's default when None).

    Returns:
      The split, validated: uint8 images of the dataset's shape and labels in range.

    Raises:
      DataError: the files are missing or malformed, or TFDS could not provide the dataset; the
        message names the dataset, what was tried, and how to point at local files.
    """
    spec = dataset_info(name)
    if split not in SPLITS:
        raise one_of("split", split, SPLITS)
    if spec.embedded is not None:
        result, source = spec.embedded(split), "embedded data"
    elif data_dir:
        if spec.read_local is None:
            raise DataError(f"dataset {name!r} has no local file format; leave data_dir empty "
                            "to load it through TFDS")
        source = f"data_dir {data_dir!r}"
        try:
            result = spec.read_local(data_dir, split)
        except DlassignError:
            raise
        except Exception as e:  # a reader that missed a malformed input still gets one line
            raise DataError(f"cannot read the {name} {split} split from {source}: "
                            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}; "
                            f"expected {spec.local_files}") from None
    else:
        result, source = _load_tfds(spec, split, tfds_data_dir), "TFDS"
    return _validate(result, spec, split, source)


def _validate(s: Split, info: DatasetSpec, split: str, source: str) -> Split:
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


def _load_tfds(info: DatasetSpec, split: str, tfds_data_dir: str | None) -> Split:
    if info.tfds_name is None:
        raise DataError(f"dataset {info.name!r} is not in TFDS; point --config.data.data_dir at "
                        f"a directory holding {info.local_files}")
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
