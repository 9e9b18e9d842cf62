"""Raw file formats that several datasets share: MNIST's IDX files, gzipped or not."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from dlassign.data.sources import Split
from dlassign.errors import DataError

IDX_STEMS = {"train": "train", "test": "t10k"}


def read_maybe_gzip(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (MNIST's format), gzipped or not, as a uint8 array."""
    raw = read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file: only {len(raw)} bytes")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file "
                        f"(magic {raw[:4].hex()}; expected 00000801 or 00000803)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is cut short: its header announces {ndim} dimensions "
                        f"({header} bytes) but the file holds {len(raw)} bytes")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or padded: header says {dims} "
                        f"({expected} bytes), file holds {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def find_file(data_dir: str, candidates: list[str]) -> str | None:
    for c in candidates:
        p = os.path.join(data_dir, c)
        if os.path.isfile(p):
            return p
    return None


def require_dir(data_dir: str, name: str, local_files: str) -> None:
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir!r} for dataset '{name}' is not a directory; expected "
                        f"one holding {local_files}")


def idx_names(split: str, kind: str) -> list[str]:
    """The file names MNIST-format datasets use for one split's images or labels."""
    ndim = 3 if kind == "images" else 1
    stem = f"{IDX_STEMS[split]}-{kind}"
    names = [f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte"]
    return names + [n + ".gz" for n in names]


def has_idx_files(data_dir: str) -> bool:
    """Whether `data_dir` holds all four IDX files of an MNIST-format dataset."""
    return all(find_file(data_dir, idx_names(split, kind))
               for split in IDX_STEMS for kind in ("images", "labels"))


def read_idx_split(data_dir: str, split: str, name: str, local_files: str,
                   num_classes: int) -> Split | None:
    """One split from MNIST-format IDX files ([N, H, W] images, [N] labels in
    [0, num_classes)), or None when `data_dir` lacks them. A bad file is named."""
    require_dir(data_dir, name, local_files)
    images_path = find_file(data_dir, idx_names(split, "images"))
    labels_path = find_file(data_dir, idx_names(split, "labels"))
    if not (images_path and labels_path):
        return None
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path} holds a {images.ndim}-d array {images.shape}; "
                        "expected (N, H, W)")
    if labels.ndim != 1:
        raise DataError(f"{labels_path} holds a {labels.ndim}-d array {labels.shape}; "
                        "expected (N,)")
    if labels.size and int(labels.max()) >= num_classes:
        raise DataError(f"{labels_path} holds label {int(labels.max())}; labels span "
                        f"[{int(labels.min())}, {int(labels.max())}], {name} has labels "
                        f"0..{num_classes - 1}")
    return Split(images[..., None], labels.astype(np.int32))
