"""Synthetic data and tiny configs shared by the tests."""

from __future__ import annotations

import numpy as np

from configs import base
from dlassign.data import Dataset, Normalizer, Split
from dlassign.runtime.checkpoint import Checkpointer


def synthetic_split(n: int, num_classes: int = 4, size: int = 8, channels: int = 1,
                    seed: int = 0) -> Split:
    """Learnable images: class c lights up its own horizontal band, plus uniform noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels))
    band = size // num_classes
    for c in range(num_classes):
        images[labels == c, c * band:(c + 1) * band] += 180
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int32))


def synthetic_dataset(n_train: int = 256, n_test: int = 100, num_classes: int = 4,
                      size: int = 8, channels: int = 1) -> Dataset:
    train = synthetic_split(n_train, num_classes, size, channels, seed=0)
    test = synthetic_split(n_test, num_classes, size, channels, seed=1)
    return Dataset("digits", num_classes, train, test,
                   Normalizer((0.0,) * channels, (1.0,) * channels))


def tiny_config(overrides: dict | None = None):
    """A small MLP run over eight devices: batch 32, 3 epochs, checkpoints every 4 steps.

    Args:
      overrides: dotted config paths to values, e.g. {"model.name": "cnn"}.
    """
    c = base.get_config()
    c.model.hidden_sizes = (32,)
    c.batch_size = 32
    c.eval_batch_size = 64
    c.num_epochs = 3
    c.log_every_steps = 4
    c.checkpoint_every_steps = 4
    c.optimizer.learning_rate = 3e-3
    c.update_from_flattened_dict(overrides or {})
    return c


def checkpoint_steps(directory) -> list[int]:
    """The steps saved under `directory` (the checkpointer closed after reading)."""
    with Checkpointer(str(directory)) as ckpt:
        return ckpt.steps()


def restore_checkpoint(directory, abstract, step: int | None = None):
    """(tree, meta) of checkpoint `step` under `directory` (None: the newest intact one)."""
    with Checkpointer(str(directory)) as ckpt:
        return ckpt.restore_latest(abstract) if step is None else ckpt.restore(step, abstract)



def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:  # it ended meanwhile
        return None


def descendants(pid: int) -> list[int]:
    """The live processes that `pid` started, and theirs, recursively."""
    import os

    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat(int(name))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def still_running(pids: list[int], seconds: float) -> list[int]:
    """Polls until none of `pids` is alive (zombies count as gone), or `seconds` passed;
    returns those still alive."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in pids if (fields := _stat(p)) and fields[0] != "Z"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
