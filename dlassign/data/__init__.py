"""Datasets as uint8 images and int labels; seeded batching, folds and preprocessing.

Each dataset is declared in a module of this package that exports `DATASETS`
(`sources.DatasetSpec`); `dataset_info(name)` and `load_split` read those declarations.
"""

from dlassign.data.batching import eval_batches, steps_per_epoch, train_batch, train_batches
from dlassign.data.dataset import Dataset, hold_out_validation, prepare
from dlassign.data.folds import stratified_kfold, stratified_split, stratified_subset
from dlassign.data.formats import read_idx
from dlassign.data.preprocess import Normalizer, random_crop, transform_geometry
from dlassign.data.sources import DatasetSpec, Split, dataset_info, datasets, load_split

__all__ = [
    "Dataset", "DatasetSpec", "Normalizer", "Split", "dataset_info", "datasets", "eval_batches",
    "hold_out_validation", "load_split", "prepare", "random_crop", "read_idx", "steps_per_epoch",
    "stratified_kfold", "stratified_split", "stratified_subset", "train_batch", "train_batches",
    "transform_geometry",
]
