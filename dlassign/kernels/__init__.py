"""XLA:CPU fast paths, behind one door: `placement`.

`placement(model, ..., platform=...)` decides how a model runs and returns it wrapped with that
decision, a `Layout`: which convolution kernel the layers of `dlassign.models.layers` take, and
whether the feature maps run batch-minor ([C, H, W, N]). The wrapper installs the layout while
the model is traced; the layers read it (`current`). Models, the trainer, the mesh and the
Hessian tools never name a kernel. The kernels are exact rewrites of the plain operations (tests
compare values and gradients in float64); where each one pays is measured in
docs/performance.md.

The kernels are chosen only for the platform the program is lowered for: `platform` (the
trainer passes its devices' platform; a program exported for 'cuda' or 'tpu' is placed for that
platform), JAX's default backend when left out. Off the CPU every layer is XLA's own. `impl`
(the config's field) narrows the choice on the CPU: 'auto' and 'cpu' take the kernels, 'im2col'
takes them for every plain convolution (tests and benchmarks), 'xla' none. Outside a placed
model the layers are XLA's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the layers of a placed model run.

    Attributes:
      conv: 'xla' (XLA's own operations), 'cpu' (the CPU kernels where they pay) or 'im2col'
        (the CPU kernels for every plain convolution).
      batch_minor: feature maps are [C, H, W, N] between the model's input and its first
        dense layer or global pool (CPU kernels only).
    """

    conv: str = "xla"
    batch_minor: bool = False

    @property
    def cpu_kernels(self) -> bool:
        return self.conv != "xla"


_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


def current() -> Layout:
    """The layout the layers being traced run with (XLA's own outside a placed model)."""
    return _LAYOUT.get() or Layout()


@contextlib.contextmanager
def using(layout: Layout) -> Iterator[Layout]:
    """Within it, the layers run with `layout` (a placed model sets it around its own trace)."""
    token = _LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _LAYOUT.reset(token)


class NoBatchMinorForm(ValueError):
    """A layer met a batch-minor feature map it has no form for (`placement` then runs NHWC)."""


def choose(impl: str = "auto", platform: str | None = None) -> Layout:
    """The NHWC layout for `impl` on `platform` (None: JAX's default backend)."""
    if impl not in IMPLS:
        raise one_of("impl", impl, IMPLS)
    platform = platform or jax.default_backend()
    if platform != "cpu" or impl == "xla":
        return Layout()
    return Layout("im2col" if impl == "im2col" else "cpu")


def conv_general_dilated(layout: Layout) -> Callable | None:
    """The `conv_general_dilated` an NHWC `nn.Conv` should take (None: XLA's own)."""
    if not layout.cpu_kernels:
        return None
    return im2col_conv_general_dilated if layout.conv == "im2col" else cpu_conv_general_dilated


class Placed(nn.Module):
    """`model` run with `layout`: the same variables (it shares the model's scope), the same
    call; the model's input is taken batch-minor here when the layout says so."""

    model: nn.Module
    layout: Layout = Layout()

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, x: jax.Array, *args, **kwargs):
        with using(self.layout):
            return self.model(batch_minor(x) if self.layout.batch_minor else x, *args, **kwargs)


def _runs_batch_minor(model: nn.Module, layout: Layout, input_shape: Sequence[int]) -> bool:
    """Whether `model` gives the same parameters and output batch-minor as NHWC: its feature
    maps reach only layers with a batch-minor form, and no plain operation reads their axes.
    Decided from two abstract traces (no compute), at a batch size that differs from the
    model's other dimensions."""
    x = jnp.zeros((5, *input_shape[1:]))
    shapes = lambda layout: jax.eval_shape(  # noqa: E731
        lambda: Placed(model, layout).init_with_output(jax.random.PRNGKey(0), x, train=False))
    try:
        bm = shapes(dataclasses.replace(layout, batch_minor=True))
    except (NoBatchMinorForm, TypeError, ValueError):
        return False
    return jax.tree.map(lambda a: a.shape, bm) == jax.tree.map(lambda a: a.shape, shapes(layout))


def placement(model: nn.Module, num_devices: int = 0, *, hessian: bool = False,
              platform: str | None = None, impl: str = "auto",
              input_shape: Sequence[int] | None = None) -> tuple[nn.Module, int]:
    """How `model` runs: the module to apply, and the number of devices it asks for.

    On the CPU, a model whose convolutional part runs batch-minor merges the batch into its
    matmuls' minor dimension, which pays on one device (docs/performance.md). A batch sharded
    over several devices cannot keep that layout (the partitioner would all-gather the patches),
    so such a model keeps one device when the count is left open, and runs NHWC on a mesh of
    several devices. Forward-over-reverse Hessian-vector products run NHWC too, which measured
    faster for ResNet-18 and the MNIST CNN.

    Args:
      model: a Flax module taking (x [N, H, W, C] or [N, ...], train), or one placed before
        (placed again from scratch, keeping its kernel choice when `platform` is left out).
      num_devices: the mesh size the config asks for; 0 leaves it open.
      hessian: the model will be differentiated twice (`dlassign.analysis.hessian`).
      platform: the platform the program is lowered for ('cpu', 'cuda', 'tpu'); None: JAX's
        default backend.
      impl: the config's `impl` (see the module docstring).
      input_shape: the model's input shape; batch-minor is considered only where it is given.

    Returns:
      (model, num_devices): the model wrapped in its `Placed` layout; num_devices is 1 where
      the layout wants one device and the count was open, else the argument unchanged.
    """
    if isinstance(model, Placed):
        layout = model.layout if platform is None and impl == "auto" else choose(impl, platform)
        model, layout = model.model, dataclasses.replace(layout, batch_minor=False)
    else:
        layout = choose(impl, platform)
    if (layout.cpu_kernels and not hessian and num_devices <= 1 and input_shape is not None
            and _runs_batch_minor(model, layout, input_shape)):
        return Placed(model, dataclasses.replace(layout, batch_minor=True)), num_devices or 1
    return Placed(model, layout), num_devices


__all__ = ["FLATTEN_ORDERS", "IMPLS", "BatchMinorConv", "BatchMinorDense", "Layout",
           "NoBatchMinorForm", "Placed", "batch_minor", "choose", "conv_general_dilated",
           "current", "max_pool", "placement", "using"]
