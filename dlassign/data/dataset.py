"""A prepared dataset: both splits after subset and geometry (and a validation part held out of
the training split, when asked), plus the normaliser from train."""

from __future__ import annotations

import dataclasses

from dlassign.data.folds import stratified_split, stratified_subset
from dlassign.data.preprocess import Normalizer, transform_geometry
from dlassign.data.sources import Split, dataset_info, load_split
from dlassign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    train: Split
    test: Split
    normalizer: Normalizer
    validation: Split | None = None  # held out of the training split (data.validation_fraction)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def hold_out_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """`dataset` with a stratified `fraction` of its training split moved to `validation`
    (every class keeps the share it has; the two parts are disjoint). The normaliser stays as it
    is; `prepare` holds out before it computes one. Returns `dataset` itself for fraction 0."""
    if not fraction:
        return dataset
    train, validation = split_off_validation(dataset.train, fraction, seed)
    return dataclasses.replace(dataset, train=train, validation=validation)


def split_off_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(what trains, the validation part): a stratified `fraction` of `train` held out.

    Raises:
      ConfigError: nothing would be left to train on; names data.validation_fraction and the
        fractions that leave enough.
    """
    keep, held = stratified_split(train.labels, fraction, seed)
    if keep.size == 0:
        n = len(train)
        raise ConfigError(f"data.validation_fraction={fraction} holds out all {n} training "
                          "examples, leaving none to train on; use a fraction in [0, 1) that "
                          f"leaves at least batch_size of them: about 1 - batch_size / {n} "
                          "at most")
    return train.take(keep), train.take(held)


def prepare(data_cfg, seed: int) -> Dataset:
    """Loads and prepares both splits as `data_cfg` says.

    Args:
      data_cfg: the config's `data` block: name, data_dir, tfds_data_dir, subset_fraction,
        validation_fraction, pad_to, image_size, channels, normalization.
      seed: fixes the stratified training subset and the validation part.

    Returns:
      The dataset; only the training split is subsetted (then `validation_fraction` of what is
      left held out as `validation`), the test split is always whole. The normaliser's
      statistics come from the remaining training part only.
    """
    info = dataset_info(data_cfg.name)
    load = lambda split: load_split(data_cfg.name, split, data_cfg.get("data_dir") or None,
                                    data_cfg.get("tfds_data_dir") or None)
    train, test = load("train"), load("test")
    fraction = data_cfg.get("subset_fraction", 1.0)
    if fraction < 1.0:
        train = train.take(stratified_subset(train.labels, fraction, seed))
    validation = None
    if data_cfg.get("validation_fraction", 0.0):
        train, validation = split_off_validation(train, data_cfg.validation_fraction, seed)
    geometry = dict(pad_to=data_cfg.get("pad_to", 0), image_size=data_cfg.get("image_size", 0),
                    channels=data_cfg.get("channels", 0))
    train, test = transform_geometry(train, **geometry), transform_geometry(test, **geometry)
    if validation is not None:
        validation = transform_geometry(validation, **geometry)
    normalizer = Normalizer.from_config(data_cfg.get("normalization", "scale"), train.images)
    return Dataset(data_cfg.name, info.num_classes, train, test, normalizer, validation)
