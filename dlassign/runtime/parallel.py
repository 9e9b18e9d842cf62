"""Data parallelism with JAX's own sharding: a 1-D `Mesh` named 'data' over the devices.

One code path for one device, several GPUs, TPU cores, or CPU host devices: the batch is sharded
along its leading axis, parameters and optimizer state are replicated, or with `shard_params`
split along their largest divisible axis (ZeRO-3/FSDP style, for models that do not fit one
device). XLA inserts the collectives. Multi-host runs call `jax.distributed.initialize()` first
(docs/scale-out.md); each process then feeds its own slice of every global batch.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dlassign.errors import ConfigError
from dlassign.runtime import host

DATA = "data"


def cpu_core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


CPU_DEVICES_ENV = "DLASSIGN_NUM_CPU_DEVICES"  # the default when `num` is 0 (set by the launcher)


def configure_cpu_devices(num: int = 0) -> None:
    """Asks JAX for `num` CPU host devices (0: $DLASSIGN_NUM_CPU_DEVICES, else one per core)
    before its backend starts.

    XLA:CPU runs one device's program on one stream, so a single device leaves cores idle on
    small models; data parallel over one host device per core uses them. Has no effect on GPU or
    TPU runs (they use their accelerators), and none once JAX's backend is up. Also lets the
    host allocator reuse freed pages across steps (`dlassign.runtime.host`).
    """
    host.keep_freed_memory()
    num = num or int(os.environ.get(CPU_DEVICES_ENV) or 0) or cpu_core_count()
    try:
        jax.config.update("jax_num_cpu_devices", num)
    except RuntimeError as e:  # the backend is already initialised
        logging.warning("could not set %d CPU devices (%s); continuing with %d", num, e,
                        jax.local_device_count())


def auto_num_devices(num_params: int, cpu_max_params: int,
                     step_flops: Callable[[], float | None] | None = None,
                     cpu_min_step_flops: float = 0.0) -> int:
    """How many devices `mesh.num_devices = 0` uses, once the model left the count open
    (`models.placement`).

    On GPUs and TPUs: all of them. On CPU host devices data parallelism pays only for models
    that are small but not tiny: every step all-reduces the gradients through an in-process
    rendezvous, and one device already spreads a large model's matmuls over every core
    (measurements in docs/performance.md).

    Args:
      num_params: the model's parameter count.
      cpu_max_params: above it, one CPU device.
      step_flops: returns the floating-point operations of one training step (None when
        unknown); called only where the answer depends on it (CPU, within cpu_max_params).
      cpu_min_step_flops: below it, one CPU device.
    """
    if jax.default_backend() != "cpu":
        return jax.device_count()
    if num_params > cpu_max_params:
        return 1
    flops = step_flops() if step_flops and cpu_min_step_flops > 0 else None
    if flops is not None and flops < cpu_min_step_flops:
        return 1
    return jax.device_count()


def forward_flops(apply_fn, abstract_variables, input_shape) -> float | None:
    """XLA's count of the floating-point operations of one forward pass over `input_shape`
    (None when the backend gives no cost analysis). Lowers without compiling."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), np.float32)
    try:
        cost = jax.jit(apply_fn).lower(abstract_variables, x).cost_analysis()
    except Exception:  # cost analysis is best-effort on every backend
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def requested_devices(num_devices: int) -> int:
    """The mesh size a config's `mesh.num_devices` asks for: a multi-process run always spans
    every device of every process (each process feeds its own rows), single-process runs
    leave 0 open for the model to decide."""
    return jax.device_count() if num_devices == 0 and jax.process_count() > 1 else num_devices


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (0: all of them)."""
    devices = jax.devices()
    if jax.process_count() > 1 and num_devices not in (0, len(devices)):
        raise ConfigError(f"mesh.num_devices={num_devices}, but a run of "
                          f"{jax.process_count()} processes spans all {len(devices)} devices; "
                          f"use 0 or {len(devices)}")
    if num_devices < 0 or num_devices > len(devices):
        raise ConfigError(f"mesh.num_devices={num_devices} but {len(devices)} devices exist; "
                          f"use 0 (all) or 1..{len(devices)}")
    devices = devices[: num_devices or len(devices)]
    return Mesh(np.asarray(devices), (DATA,))


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Shards axis `leading_axes` of every batch array (1 for vmapped folds [K, B, ...])."""
    return NamedSharding(mesh, P(*([None] * leading_axes), DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(f"{field}={batch_size} is not divisible by the {n} devices of the mesh; "
                          f"use a multiple of {n} or set mesh.num_devices")


def param_sharding(mesh: Mesh, shape: tuple[int, ...], shard: bool, min_size: int = 2**14
                   ) -> NamedSharding:
    """Replicated, or with `shard` split along the largest axis the mesh size divides."""
    n = mesh.devices.size
    if not shard or n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = DATA
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def state_shardings(mesh: Mesh, abstract_state, shard_params: bool = False):
    """A sharding for every leaf of a (possibly abstract) train state."""
    return jax.tree.map(lambda x: param_sharding(mesh, tuple(x.shape), shard_params),
                        abstract_state)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding
                 ) -> dict[str, jax.Array]:
    """Puts one global batch on the mesh.

    Single-process, `batch` is the whole global batch. Multi-process, every process passes the
    same global batch and contributes the rows its devices hold, along the axis `sharding`
    shards (0, or 1 for steps or folds stacked in front; see `batch_sharding`).
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    axis = list(sharding.spec).index(DATA)

    def local(x):
        per = x.shape[axis] // jax.process_count()
        start = jax.process_index() * per
        sl = (slice(None),) * axis + (slice(start, start + per),)
        return jax.make_array_from_process_local_data(sharding, x[sl])

    return jax.tree.map(local, batch)


def to_host(tree):
    """Fetches a pytree to numpy on this host. Leaves that are not JAX arrays stay as they
    are; across processes, replicated arrays are read from a local copy and sharded ones are
    gathered from every process (one collective for all of them, which every process must
    join)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = [np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
           and not x.is_fully_addressable and x.is_fully_replicated
           else np.asarray(jax.device_get(x)) if isinstance(x, jax.Array)
           and x.is_fully_addressable else x for x in leaves]
    sharded = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)
               and not x.is_fully_addressable and not x.is_fully_replicated]
    if sharded:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in sharded], tiled=True)
        for i, x in zip(sharded, gathered):
            out[i] = np.asarray(x)
    return jax.tree.unflatten(treedef, out)


class DispatchLimiter:
    """Keeps at most `depth` dispatched computations in flight.

    XLA:CPU with several host devices can deadlock when many programs that contain collectives
    are queued at once (an all-reduce waits for a peer that never gets a thread; seen with
    jaxlib 0.10 on 2 cores). Blocking on the output of the step `depth` steps back keeps the
    pipeline full without an unbounded queue; on GPUs and TPUs it costs nothing measurable.
    """

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._queue = collections.deque()

    def __call__(self, token) -> None:
        """Registers the output of a just-dispatched computation."""
        self._queue.append(token)
        if len(self._queue) > self.depth:
            jax.block_until_ready(self._queue.popleft())


def tree_size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


__all__ = ["DATA", "DispatchLimiter", "auto_num_devices", "batch_sharding", "check_divisible",
           "configure_cpu_devices", "forward_flops", "global_batch", "make_mesh",
           "requested_devices",
           "param_sharding", "replicated", "state_shardings", "to_host", "tree_size"]
