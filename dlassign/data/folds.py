"""Stratified index splits: hold-out, subsets and k folds, all seeded and by index."""

from __future__ import annotations

import numpy as np

from dlassign.errors import ConfigError


def _class_permutations(labels: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset holding `fraction` of each class (at least one each).

    Args:
      labels: int[N].
      fraction: in (0, 1]; 1 returns every index.
      seed: fixes which examples are kept.

    Returns:
      int64[M], sorted.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"subset fraction {fraction!r} is outside (0, 1]")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(labels.shape[0])
    keep = [p[: max(1, int(round(fraction * p.size)))] for p in _class_permutations(labels, seed)]
    return np.sort(np.concatenate(keep))


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A stratified hold-out split: (train indices, test indices), both sorted."""
    test = stratified_subset(labels, test_fraction, seed)
    train = np.setdiff1d(np.arange(np.asarray(labels).shape[0]), test)
    return train, test


def stratified_kfold(
    labels: np.ndarray, num_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold cross-validation splits.

    Each class's examples are shuffled and dealt to the folds in turn, continuing the turn across
    classes, so fold sizes differ by at most one and each class's share per fold by at most one.

    Args:
      labels: int[N].
      num_folds: k >= 2, and no more than N.
      seed: fixes the shuffle.

    Returns:
      k pairs (train indices, validation indices), sorted; the validation sets are disjoint and
      together cover every index.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise ConfigError(f"num_folds {num_folds!r} must be an integer >= 2")
    if num_folds > n:
        raise ConfigError(f"num_folds {num_folds} exceeds the {n} examples to split")
    fold_of = np.empty(n, np.int64)
    turn = 0
    for perm in _class_permutations(labels, seed):
        fold_of[perm] = (turn + np.arange(perm.size)) % num_folds
        turn = (turn + perm.size) % num_folds
    return [(np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)) for k in range(num_folds)]
