"""Building blocks with torch's semantics: the layers every model is written with.

A model touches its feature maps only through these layers (convolutions, pools, BatchNorm,
`channels`, `global_avg_pool`, `flatten_dense`, ...) and elementwise operations. The layers
read how the model was placed (`dlassign.kernels.current`, set by `kernels.placement`) while it
is traced: which convolution and pooling kernels to take, and whether the feature maps are
NHWC or batch-minor [C, H, W, N]. A model never names a kernel or a layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dlassign import kernels
from dlassign.errors import one_of
from dlassign.kernels import NoBatchMinorForm

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


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in ACTIVATIONS:
        raise one_of("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """torch.nn.MaxPool2d(window, stride, padding) (floor mode, -inf padding).

    Args:
      x: a feature map, [N, H, W, C] (or [C, H, W, N] where the model runs batch-minor).
      window, stride, padding: square, as in torch.
    """
    if kernels.current().cpu_kernels:
        return kernels.max_pool(x, window, stride, padding)
    pads = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), (stride, stride), pads)


# Activations that commute with a max pool exactly, in value and in gradient, ties included:
# nondecreasing, and where they map different inputs to one value (ReLU's negatives) their
# derivative there is zero.
_POOL_FIRST = ("relu", "linear")


def activation_max_pool(x: jax.Array, name: str, window: int, stride: int,
                        padding: int = 0) -> jax.Array:
    """`max_pool(activation(name)(x), ...)`, computed as the activation of the pooled map where
    that is the same function with the same gradient (ReLU, linear), on a map a quarter the size
    for 2x2 pools."""
    if name in _POOL_FIRST:
        return activation(name)(max_pool(x, window, stride, padding))
    return max_pool(activation(name)(x), window, stride, padding)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, *,
         use_bias: bool = True, groups: int = 1, dtype=None, name: str | None = None
         ) -> nn.Module:
    """A square `nn.Conv` with torch's explicit symmetric padding (never 'SAME' with stride 2);
    on batch-minor feature maps, its `kernels.BatchMinorConv` twin (groups=1 only)."""
    layout = kernels.current()
    if layout.batch_minor:
        if groups != 1:
            raise NoBatchMinorForm(f"batch-minor convolutions take groups=1, got {groups}")
        return kernels.BatchMinorConv(features, kernel, stride, padding, use_bias, dtype,
                                      name=name)
    kwargs = {}
    fn = kernels.conv_general_dilated(layout)
    if fn is not None:
        kwargs["conv_general_dilated"] = fn
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   feature_group_count=groups, dtype=dtype, name=name, **kwargs)


def batch_norm(train: bool, dtype=None, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with torch's defaults: running-average momentum 0.9 (torch's 0.1), eps 1e-5;
    over the channels of a feature map.

    Flax updates the running variance with the biased batch variance; torch uses the unbiased
    one. Evaluation is identical; the running variance drifts by a factor (m-1)/m while training.
    """
    return nn.BatchNorm(use_running_average=not train,
                        axis=0 if kernels.current().batch_minor else -1,
                        momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                        name=name)


def channels(x: jax.Array) -> int:
    """The channel count of a feature map, whatever its layout."""
    return x.shape[0 if kernels.current().batch_minor else -1]


def nhwc(x: jax.Array) -> jax.Array:
    """A feature map as [N, H, W, C], whatever its layout."""
    return kernels.batch_minor(x) if kernels.current().batch_minor else x


def global_avg_pool(x: jax.Array) -> jax.Array:
    """The mean of each channel over the map: a feature map -> [N, C]."""
    x = x.mean(axis=(1, 2))
    return x.T if kernels.current().batch_minor else x


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
    if kernels.current().batch_minor:
        raise NoBatchMinorForm("adaptive_avg_pool takes NHWC feature maps")
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
    if kernels.current().batch_minor:
        raise NoBatchMinorForm("flatten_chw takes NHWC feature maps; see flatten_dense")
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def flatten_dense(x: jax.Array, features: int, order: str = "hwc", *, dtype=None,
                  name: str | None = None) -> jax.Array:
    """`nn.Dense(features)` over each example's map flattened in `order`: 'hwc' (NHWC's
    reshape) or 'chw' (torch's flatten, so ported Linear weights apply unchanged).

    A batch-minor map [C, H, W, N] takes `kernels.BatchMinorDense` (the same parameters), which
    never moves the batch back to the front.
    """
    if order not in kernels.FLATTEN_ORDERS:
        raise one_of("order", order, kernels.FLATTEN_ORDERS)
    if kernels.current().batch_minor:
        return kernels.BatchMinorDense(features, order, dtype, name=name)(x)
    if order == "chw":
        x = jnp.transpose(x, (0, 3, 1, 2))
    return nn.Dense(features, dtype=dtype, name=name)(x.reshape(x.shape[0], -1))


def logits(x: jax.Array) -> jax.Array:
    """Output logits in float32 at least: bfloat16 compute returns float32, float64 stays."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


__all__ = ["ACTIVATIONS", "PooledDense", "activation", "activation_max_pool", "adaptive_avg_pool",
           "batch_norm", "channels", "conv", "flatten_chw", "flatten_dense", "global_avg_pool",
           "logits", "max_pool", "nhwc"]
