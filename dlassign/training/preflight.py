"""Checks before training that fail in one line instead of hours in: memory for an evaluation
batch and for the stacked calls, and disk for a checkpoint."""

from __future__ import annotations

import shutil

import jax

from dlassign.errors import ConfigError
from dlassign.training import loop
from dlassign.training.setup import Run, state_tree
from dlassign.training.train_state import TrainState


def available_memory() -> int | None:
    """Bytes the first device can still allocate: the accelerator's free memory, or the host's
    MemAvailable on the CPU (None when unknown)."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_disk(state: TrainState, workdir: str) -> None:
    """Fails before training, in one line, where the disk has no room for a checkpoint.

    Raises:
      ConfigError: names the workdir, with the sizes.
    """
    size = sum(x.nbytes for x in jax.tree.leaves(state_tree(state)))
    free = shutil.disk_usage(workdir).free
    if free < 2 * size:  # a save writes the new step before the oldest is dropped
        raise ConfigError(f"workdir {workdir!r} has {free / 2**20:.0f} MiB free; a checkpoint "
                          f"of this run takes {size / 2**20:.0f} MiB and a save needs room for "
                          "two")


def check_memory(run: Run, stats) -> None:
    """Fails in one line where an evaluation batch cannot fit in memory, by XLA's own estimate
    of the compiled eval program (`stats`: its `memory_analysis()`, None when unknown), or where
    a fixed `steps_per_call` stacks more batches than half the memory holds.

    Raises:
      ConfigError: names eval_batch_size or steps_per_call, with the sizes.
    """
    n = run.config.eval_batch_size
    have = available_memory()
    if stats is not None and have is not None:
        per_device = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                      + stats.output_size_in_bytes)
        need = per_device * (run.mesh.devices.size if jax.local_devices()[0].platform == "cpu"
                             else 1)  # CPU host devices share the host's memory
        if need > have:
            raise ConfigError(f"eval_batch_size={n} needs about {need / 2**30:.1f} GiB to "
                              f"evaluate, {have / 2**30:.1f} GiB are available; lower "
                              "eval_batch_size")
    k = min(run.config.get("steps_per_call", 0), run.total_steps)
    if have is not None and k > 1:
        images = run.dataset.train.images
        batch = run.config.batch_size * (images[0].nbytes + run.dataset.train.labels[0].nbytes)
        need = (loop.PREFETCH + 1) * k * batch  # the calls placed ahead and the one running
        if need > have / 2:
            raise ConfigError(f"steps_per_call={k} stacks batches of {k * batch / 2**20:.0f} MiB "
                              f"per call, {need / 2**30:.1f} GiB with the calls placed ahead; "
                              f"{have / 2**30:.1f} GiB are available; lower steps_per_call, or "
                              "0 to let the run choose")
