"""Batches by index: a seeded permutation per epoch for training, padded and masked for evaluation.

Everything is a pure function of (seed, epoch, step), so a resumed run sees the same batches as
one that was never interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dlassign.data.sources import Split
from dlassign.errors import ConfigError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n training examples in `epoch`, fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training drops the last partial batch; the next epoch's permutation covers those examples."""
    if batch_size > n:
        raise ConfigError(f"batch_size {batch_size} exceeds the {n} training examples (what "
                          "data.subset_fraction and data.validation_fraction leave of the training "
                          "split); lower batch_size, or raise data.subset_fraction or lower "
                          "data.validation_fraction")
    return n // batch_size


def train_batch(split: Split, batch_size: int, seed: int, step: int) -> dict[str, np.ndarray]:
    """The training batch of `step` (0-based): `image` uint8[B, H, W, C], `label` int32[B]."""
    spe = steps_per_epoch(len(split), batch_size)
    epoch, i = divmod(step, spe)
    idx = epoch_permutation(len(split), seed, epoch)[i * batch_size:(i + 1) * batch_size]
    return {"image": split.images[idx], "label": split.labels[idx]}


def train_batches(
    split: Split, batch_size: int, seed: int, start_step: int, num_steps: int
) -> Iterator[dict[str, np.ndarray]]:
    """Batches for steps [start_step, start_step + num_steps), one permutation per epoch."""
    spe = steps_per_epoch(len(split), batch_size)
    perm_epoch, perm = -1, None
    for step in range(start_step, start_step + num_steps):
        epoch, i = divmod(step, spe)
        if epoch != perm_epoch:
            perm_epoch, perm = epoch, epoch_permutation(len(split), seed, epoch)
        idx = perm[i * batch_size:(i + 1) * batch_size]
        yield {"image": split.images[idx], "label": split.labels[idx]}


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once; the last batch is padded and `mask` marks the real rows.

    Yields:
      `image` uint8[B, H, W, C], `label` int32[B], `mask` bool[B].
    """
    n = len(split)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        mask = np.ones(batch_size, bool)
        if idx.size < batch_size:
            mask[idx.size:] = False
            idx = np.concatenate([idx, np.zeros(batch_size - idx.size, idx.dtype)])
        yield {"image": split.images[idx], "label": split.labels[idx], "mask": mask}
