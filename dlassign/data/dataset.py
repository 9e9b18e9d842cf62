"""A prepared dataset: both splits after subset and geometry, plus the normaliser from train."""

from __future__ import annotations

import dataclasses

from dlassign.data.folds import stratified_subset
from dlassign.data.preprocess import Normalizer, transform_geometry
from dlassign.data.sources import Split, dataset_info, load_split


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    train: Split
    test: Split
    normalizer: Normalizer

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def prepare(data_cfg, seed: int) -> Dataset:
    """Loads and prepares both splits as `data_cfg` says.

    Args:
      data_cfg: the config's `data` block: name, data_dir, tfds_data_dir, subset_fraction,
        pad_to, image_size, channels, normalization.
      seed: fixes the stratified training subset.

    Returns:
      The dataset; only the training split is subsetted, the test split is always whole.
    """
    info = dataset_info(data_cfg.name)
    load = lambda split: load_split(data_cfg.name, split, data_cfg.get("data_dir") or None,
                                    data_cfg.get("tfds_data_dir") or None)
    train, test = load("train"), load("test")
    fraction = data_cfg.get("subset_fraction", 1.0)
    if fraction < 1.0:
        train = train.take(stratified_subset(train.labels, fraction, seed))
    geometry = dict(pad_to=data_cfg.get("pad_to", 0), image_size=data_cfg.get("image_size", 0),
                    channels=data_cfg.get("channels", 0))
    train, test = transform_geometry(train, **geometry), transform_geometry(test, **geometry)
    normalizer = Normalizer.from_config(data_cfg.get("normalization", "scale"), train.images)
    return Dataset(data_cfg.name, info.num_classes, train, test, normalizer)
