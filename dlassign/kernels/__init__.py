"""XLA:CPU fast paths, behind one door.

Models reach these kernels through `dlassign.models.layers` (convolutions, pools, the dense
layer after a batch-minor map) and choose a layout with `use_batch_minor`; everything else (the
trainer, the mesh, the Hessian tools) asks `placement` how a model runs and never learns which
layout that is. The kernels are exact rewrites of the plain operations (tests compare values
and gradients in float64); where each one pays is measured in docs/performance.md.

`impl` names the choice: 'auto' uses the kernels when JAX's default backend is the CPU, 'cpu'
always, 'im2col' always and for every plain convolution (tests and benchmarks), 'xla' never.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from dlassign.errors import one_of
from dlassign.kernels.batch_minor import (
    FLATTEN_ORDERS,
    BatchMinorConv,
    BatchMinorDense,
    batch_minor,
)
from dlassign.kernels.conv import cpu_conv_general_dilated, im2col_conv_general_dilated
from dlassign.kernels.pool import max_pool

IMPLS = ("auto", "cpu", "xla", "im2col")


def use_cpu_kernels(impl: str) -> bool:
    """Whether the CPU rewrites apply; decided at trace time from JAX's default backend."""
    if impl not in IMPLS:
        raise one_of("impl", impl, IMPLS)
    return impl in ("cpu", "im2col") or (impl == "auto" and jax.default_backend() == "cpu")


def conv_general_dilated(impl: str) -> Callable | None:
    """The `conv_general_dilated` an NHWC `nn.Conv` should take (None: XLA's own)."""
    if not use_cpu_kernels(impl):
        return None
    return im2col_conv_general_dilated if impl == "im2col" else cpu_conv_general_dilated


def use_batch_minor(batch_minor: bool | None, impl: str) -> bool:
    """A model's `batch_minor` field resolved: None means wherever the CPU kernels apply."""
    return use_cpu_kernels(impl) if batch_minor is None else batch_minor


def _runs_batch_minor(model: nn.Module) -> bool:
    return hasattr(model, "batch_minor") and use_batch_minor(model.batch_minor, model.impl)


def _nhwc(model: nn.Module) -> nn.Module:
    """The model with `batch_minor=False` where the field is left to `use_batch_minor`."""
    return model.clone(batch_minor=False) if getattr(model, "batch_minor", False) is None else model


def placement(model: nn.Module, num_devices: int = 0, *, hessian: bool = False
              ) -> tuple[nn.Module, int]:
    """How `model` runs: the module to apply, and the number of devices it asks for.

    A batch-minor model merges the batch into its matmuls' minor dimension, which a batch sharded
    over several devices cannot keep (the partitioner would all-gather the patches). So such a
    model keeps one device when the count is left open, and runs NHWC on a mesh of several
    devices. Forward-over-reverse Hessian-vector products run NHWC too, which measured faster
    for ResNet-18 and the MNIST CNN (docs/performance.md).

    Args:
      model: a Flax module, with or without a `batch_minor` field.
      num_devices: the mesh size the config asks for; 0 leaves it open.
      hessian: the model will be differentiated twice (`dlassign.analysis.hessian`).

    Returns:
      (model, num_devices): num_devices is 1 where the kernels want one device and the count
      was open, else the argument unchanged (0 still open).
    """
    if hessian or num_devices > 1:
        return _nhwc(model), num_devices
    if num_devices == 0 and _runs_batch_minor(model):
        return model, 1
    return model, num_devices


__all__ = ["FLATTEN_ORDERS", "IMPLS", "BatchMinorConv", "BatchMinorDense", "batch_minor",
           "conv_general_dilated", "max_pool", "placement", "use_batch_minor", "use_cpu_kernels"]
