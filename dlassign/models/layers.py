"""Building blocks with torch's semantics: the layers every model is written with.

Convolutions and max pools take the XLA:CPU fast paths of `dlassign.kernels` where they apply
(`impl`), so a model never calls a kernel itself; `use_batch_minor` and `batch_minor` let a
model run its convolutional layers on [C, H, W, N] arrays, and `flatten_dense` takes such a
map into its first dense layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dlassign import kernels
from dlassign.errors import one_of
from dlassign.kernels import IMPLS, batch_minor, use_batch_minor

Padding = Sequence[tuple[int, int]]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "elu": nn.elu,
    "silu": nn.silu,
    "leaky_relu": nn.leaky_relu,
    "linear": lambda x: x,
}


# An activation chosen by a traced index instead of by name: a model built with
# `activation=CHOSEN + "activation"` applies, inside `chosen_activations`, the candidate its
# index picks. A grid's cells that differ only in activations then trace to one program
# (training/tune.py), which compiles once instead of once per cell.
CHOSEN = "chosen:"
_CHOICES: contextvars.ContextVar = contextvars.ContextVar("activation_choices", default=None)


@contextlib.contextmanager
def chosen_activations(choices: dict[str, tuple[jax.Array, tuple[str, ...]]]):
    """Within it, `activation(CHOSEN + field)` applies `names[index]` for `choices[field] =
    (index, names)`: index an int32 scalar (traced or not), names the candidates."""
    token = _CHOICES.set(choices)
    try:
        yield
    finally:
        _CHOICES.reset(token)


def _chosen(field: str) -> Callable[[jax.Array], jax.Array]:
    def apply(x: jax.Array) -> jax.Array:
        choices = _CHOICES.get() or {}
        if field not in choices:
            raise ValueError(f"activation {CHOSEN + field!r} is applied outside "
                             "chosen_activations, which supplies its choice")
        index, names = choices[field]
        out = activation(names[-1])(x)
        # a select, exact in value and gradient, and one fused loop on every backend
        for i in reversed(range(len(names) - 1)):
            out = jnp.where(index == i, activation(names[i])(x), out)
        return out

    return apply


# A layer's width as a traced value: a grid whose cells differ in a width field builds every
# cell at the grid's widest value, and inside `active_widths` the units at and beyond the
# cell's own width are held at zero (their parameters start at zero and get zero gradients),
# so the cells share one compiled program (training/tune.py).
_WIDTHS: contextvars.ContextVar = contextvars.ContextVar("active_widths", default=None)


@contextlib.contextmanager
def active_widths(widths: dict[str, jax.Array]):
    """Within it, `active_units(x, field)` keeps x's first `widths[field]` units (an int32
    scalar, or int32[L] for a per-layer field such as an MLP's hidden_sizes, traced or not)."""
    token = _WIDTHS.set(widths)
    try:
        yield
    finally:
        _WIDTHS.reset(token)


def active_units(x: jax.Array, field: str, layer: int | None = None) -> jax.Array:
    """x [..., units] with the units beyond the active width of `field` (its entry `layer`
    for a per-layer field) set to zero, exactly and with zero gradient; x itself outside
    `active_widths` or for a field it does not set."""
    width = (_WIDTHS.get() or {}).get(field)
    if width is None:
        return x
    if layer is not None:
        width = width[layer]
    return jnp.where(jnp.arange(x.shape[-1]) < width, x, jnp.zeros((), x.dtype))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name.startswith(CHOSEN):
        return _chosen(name[len(CHOSEN):])
    if name not in ACTIVATIONS:
        raise one_of("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def max_pool(
    x: jax.Array, window: int, stride: int, padding: int = 0, impl: str = "auto"
) -> jax.Array:
    """torch.nn.MaxPool2d(window, stride, padding) (floor mode, -inf padding).

    Args:
      x: [N, H, W, C], or [C, H, W, N] in a batch-minor model (the CPU kernels only).
      window, stride, padding: square, as in torch.
      impl: see `dlassign.kernels`.
    """
    if kernels.use_cpu_kernels(impl):
        return kernels.max_pool(x, window, stride, padding)
    pads = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), (stride, stride), pads)


# Activations that commute with a max pool exactly, in value and in gradient, ties included:
# nondecreasing, and where they map different inputs to one value (ReLU's negatives) their
# derivative there is zero.
_POOL_FIRST = ("relu", "linear")


def activation_max_pool(x: jax.Array, name: str, window: int, stride: int, padding: int = 0,
                        impl: str = "auto") -> jax.Array:
    """`max_pool(activation(name)(x), ...)`, computed as the activation of the pooled map where
    that is the same function with the same gradient (ReLU, linear), on a map a quarter the size
    for 2x2 pools."""
    if name in _POOL_FIRST:
        return activation(name)(max_pool(x, window, stride, padding, impl))
    return max_pool(activation(name)(x), window, stride, padding, impl)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, *, impl: str = "auto",
         use_bias: bool = True, groups: int = 1, dtype=None, batch_minor: bool = False,
         name: str | None = None) -> nn.Module:
    """A square `nn.Conv` with torch's explicit symmetric padding (never 'SAME' with stride 2);
    with batch_minor, its `kernels.BatchMinorConv` twin for [C, H, W, N] input (groups=1)."""
    if batch_minor:
        if groups != 1:
            raise ValueError(f"batch-minor convolutions take groups=1, got {groups}")
        return kernels.BatchMinorConv(features, kernel, stride, padding, use_bias, dtype,
                                      name=name)
    kwargs = {}
    fn = kernels.conv_general_dilated(impl)
    if fn is not None:
        kwargs["conv_general_dilated"] = fn
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   feature_group_count=groups, dtype=dtype, name=name, **kwargs)


def batch_norm(train: bool, dtype=None, name: str | None = None,
               batch_minor: bool = False) -> nn.BatchNorm:
    """BatchNorm with torch's defaults: running-average momentum 0.9 (torch's 0.1), eps 1e-5;
    over the channels of NHWC input, or of [C, H, W, N] with batch_minor.

    Flax updates the running variance with the biased batch variance; torch uses the unbiased
    one. Evaluation is identical; the running variance drifts by a factor (m-1)/m while training.
    """
    return nn.BatchNorm(use_running_average=not train, axis=0 if batch_minor else -1,
                        momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                        name=name)


def _adaptive_matrix(size_in: int, size_out: int) -> np.ndarray:
    """torch's AdaptiveAvgPool bins: output j averages [floor(j*I/O), ceil((j+1)*I/O))."""
    m = np.zeros((size_out, size_in))
    for j in range(size_out):
        lo, hi = (j * size_in) // size_out, -(-((j + 1) * size_in) // size_out)
        m[j, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """torch.nn.AdaptiveAvgPool2d on NHWC input, at any input size (also upsampling 1x1 to 7x7).

    Args:
      x: [N, H, W, C].
      output_size: (OH, OW).

    Returns:
      [N, OH, OW, C].
    """
    n, h, w, c = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    if (oh, ow) == (1, 1):
        return x.mean(axis=(1, 2), keepdims=True)
    mh = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", mh, x, mw)


class PooledDense(nn.Module):
    """torch's AdaptiveAvgPool2d(size), flatten (C, H, W order) and Linear, as one layer with
    `nn.Dense`'s parameters (kernel [C*OH*OW, features], bias; same initial values).

    Where the map has fewer pixels than the pool's output (VGG-16 at 32 px: 1x1 pooled to 7x7,
    AlexNet at 64 px: 1x1 to 6x6) the pool only repeats pixels, and the product folds the pool's
    matrix into the kernel instead: a [C*H*W, features] kernel, 49 (36) times fewer
    multiply-adds in the forward and both gradients. The same function, rounded differently.
    """

    features: int
    size: tuple[int, int]
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [N, H, W, C] -> [N, features]."""
        _, h, w, c = x.shape
        oh, ow = self.size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (c * oh * ow, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if h * w == 1:  # every output pixel is the one pixel: a sum (no transposed copy)
            kernel = kernel.reshape(c, oh * ow, self.features).sum(axis=1)
        elif h * w < oh * ow:
            mh = jnp.asarray(_adaptive_matrix(h, oh), kernel.dtype)
            mw = jnp.asarray(_adaptive_matrix(w, ow), kernel.dtype)
            kernel = jnp.einsum("ap,bq,cabf->cpqf", mh, mw,
                                kernel.reshape(c, oh, ow, self.features))
            kernel = kernel.reshape(c * h * w, self.features)
        else:
            x = adaptive_avg_pool(x, self.size)
        return jnp.dot(flatten_chw(x), kernel) + bias


def flatten_chw(x: jax.Array) -> jax.Array:
    """Flattens NHWC in torch's C, H, W order, so ported Linear weights apply unchanged."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def flatten_dense(x: jax.Array, features: int, order: str = "hwc", *, batch_minor: bool = False,
                  dtype=None, name: str | None = None) -> jax.Array:
    """`nn.Dense(features)` over each example's map flattened in `order`: 'hwc' (NHWC's
    reshape) or 'chw' (torch's flatten, so ported Linear weights apply unchanged).

    x is [N, H, W, C], or [C, H, W, N] with batch_minor, which takes `kernels.BatchMinorDense`
    (the same parameters) and never moves the batch back to the front.
    """
    if order not in kernels.FLATTEN_ORDERS:
        raise one_of("order", order, kernels.FLATTEN_ORDERS)
    if batch_minor:
        return kernels.BatchMinorDense(features, order, dtype, name=name)(x)
    if order == "chw":
        x = jnp.transpose(x, (0, 3, 1, 2))
    return nn.Dense(features, dtype=dtype, name=name)(x.reshape(x.shape[0], -1))


def logits(x: jax.Array) -> jax.Array:
    """Output logits in float32 at least: bfloat16 compute returns float32, float64 stays."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


__all__ = ["ACTIVATIONS", "CHOSEN", "IMPLS", "PooledDense", "activation", "activation_max_pool",
           "active_units",
           "active_widths",
           "adaptive_avg_pool", "batch_minor", "batch_norm", "chosen_activations", "conv",
           "flatten_chw", "flatten_dense", "logits", "max_pool", "use_batch_minor"]
