"""Datasets as uint8 images and int labels; seeded batching, folds and preprocessing."""

from dlassign.data.batching import eval_batches, steps_per_epoch, train_batch, train_batches
from dlassign.data.dataset import Dataset, prepare
from dlassign.data.folds import stratified_kfold, stratified_split, stratified_subset
from dlassign.data.preprocess import Normalizer, random_crop, transform_geometry
from dlassign.data.sources import DATASETS, Split, dataset_info, load_split, read_idx

__all__ = [
    "DATASETS", "Dataset", "Normalizer", "Split", "dataset_info", "eval_batches", "load_split",
    "prepare", "random_crop", "read_idx", "steps_per_epoch", "stratified_kfold", "stratified_split",
    "stratified_subset", "train_batch", "train_batches", "transform_geometry",
]
