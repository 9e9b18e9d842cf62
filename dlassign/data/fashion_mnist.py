"""Fashion-MNIST: Zalando's 28x28 grayscale images of clothing in ten classes, 60,000 for
training and 10,000 for testing (Xiao, Rasul and Vollgraf, 2017).

The data come from TFDS `fashion_mnist`, or from a directory holding the four IDX files in
MNIST's format and names, gzipped or not, as github.com/zalandoresearch/fashion-mnist
distributes them.
"""

from __future__ import annotations

from dlassign.data.formats import find_file, has_idx_files, idx_names, read_idx_split
from dlassign.data.sources import DatasetSpec, Split
from dlassign.errors import DataError

NAME = "fashion_mnist"
LOCAL_FILES = ("train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
               "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] (Zalando's IDX files)")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


def read_local(data_dir: str, split: str) -> Split:
    """One split from the IDX files in `data_dir`; a missing or bad file is named in the error."""
    found = read_idx_split(data_dir, split, NAME, LOCAL_FILES, len(CLASS_NAMES))
    if found is not None:
        return found
    missing = [f"{names[0]}[.gz]" for names in (idx_names(split, k) for k in ("images", "labels"))
               if find_file(data_dir, names) is None]
    raise DataError(f"data_dir {data_dir!r} lacks {' and '.join(missing)} for the {NAME} "
                    f"{split} split; expected {LOCAL_FILES}")


DATASETS = (DatasetSpec(NAME, len(CLASS_NAMES), (28, 28, 1), tfds_name="fashion_mnist",
                        local_files=LOCAL_FILES, read_local=read_local,
                        has_local_files=has_idx_files, class_names=CLASS_NAMES),)
