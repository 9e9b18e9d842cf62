"""Convolutions on batch-minor [C, H, W, N] arrays.

With the batch as the minor axis, every im2col patch row is a strided slice whose innermost runs
are whole batches, the matmul is [O, K] x [K, pixels x N], and the elementwise work around it
(bias, ReLU, pooling and their gradients) runs over contiguous batches instead of a few channels.
A batch sharded over several devices cannot stay sharded through these matmuls, which is why
`placement` (in `dlassign.kernels`) keeps such models on one device or runs them NHWC.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dlassign.errors import one_of
from dlassign.kernels.conv import _band, _pixel_taps, _tile_patches, dense_pays


def batch_minor(x: jax.Array) -> jax.Array:
    """[N, H, W, C] <-> [C, H, W, N] (the same transpose both ways)."""
    return jnp.transpose(x, (3, 1, 2, 0))


def batch_minor_tile(rhs_shape, window_strides) -> int:
    """Output tile width of `batch_minor_conv`: tiles only where the output channels are few
    (under 16) and the stride is 1, wide enough for 24 matmul rows (TILE*O); else 1."""
    co = rhs_shape[3]
    if tuple(window_strides) != (1, 1) or co >= 16:
        return 1
    return -(-24 // co)


def batch_minor_conv(x, rhs, window_strides, padding, tile: int = 1):
    """Convolution of a batch-minor [C, H, W, N] input with an HWIO kernel: [O, HO, WO, N].

    im2col with the batch as the matmul's minor dimension: every patch row is a strided slice
    of the input whose innermost runs are whole batches (N contiguous values), and the matmul
    is [TILE*O, K] x [K, HO*WO/TILE*N]. With tile > 1 (stride 1 only) the patches lie under
    tiles of TILE output columns and the kernel is the banded matrix of `_tiled_conv`. A 1x1
    output that `dense_pays` for takes the dense form of `_dense_conv`.

    Args:
      x: [C, H, W, N].
      rhs: [KH, KW, C, O].
      window_strides, padding: as in `lax.conv_general_dilated` (explicit pairs).
      tile: output tile width (1: plain im2col); needs stride 1.
    """
    kh, kw, ci, co = rhs.shape
    sh, sw = window_strides
    if tile > 1 and (sh, sw) != (1, 1):
        raise ValueError(f"tile={tile} needs stride 1, got strides {tuple(window_strides)}")
    if tile == 1 and dense_pays(batch_minor(x).shape, rhs.shape, window_strides, padding):
        _, h, w, n = x.shape
        pixels = jnp.transpose(x, (1, 2, 0, 3)).reshape(h * w * ci, n)
        return jnp.dot(_pixel_taps(rhs, h, w, padding).T, pixels).reshape(co, 1, 1, n)
    n = x.shape[3]
    patches, ho, wo, tiles = _tile_patches(x, kh, kw, window_strides, padding, tile, axis=0)
    if tile > 1:
        rhs = _band(rhs, tile)
    k = patches.shape[0]  # KH * columns * C
    out = jnp.dot(rhs.reshape(k, tile * co).T, patches.reshape(k, ho * tiles * n))
    if tile == 1:
        return out.reshape(co, ho, wo, n)
    out = out.reshape(tile, co, ho, tiles, n).transpose(1, 2, 3, 0, 4)
    return out.reshape(co, ho, tiles * tile, n)[:, :, :wo]


class BatchMinorConv(nn.Module):
    """`nn.Conv` (square kernel, explicit symmetric padding) on batch-minor [C, H, W, N] input.

    The same parameters as `nn.Conv`, under the same names ('kernel' HWIO, 'bias') and
    initialisers, so a model can switch layouts without changing its checkpoints or ported
    weights.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, x.shape[0], self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,),
                           self.param_dtype) if self.use_bias else None)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        strides = (self.stride, self.stride)
        y = batch_minor_conv(x, kernel, strides, ((self.padding, self.padding),) * 2,
                             batch_minor_tile(kernel.shape, strides))
        return y if bias is None else y + bias[:, None, None, None]


FLATTEN_ORDERS = ("hwc", "chw")


class BatchMinorDense(nn.Module):
    """`nn.Dense` over each example's map of a batch-minor [C, H, W, N] array, flattened in
    `order` ('hwc': NHWC's reshape; 'chw': torch's flatten), returning [N, features].

    The map is never transposed to [N, C*H*W], a transpose across the batch that XLA:CPU runs
    slowly (docs/performance.md); the contraction runs over its leading C*H*W values
    instead, and for 'hwc' the kernel's rows are permuted, whole rows at a time. Same
    parameters as `nn.Dense` on the flattened input, under the same names and initialisers.
    """

    features: int
    order: str = "hwc"
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.order not in FLATTEN_ORDERS:
            raise one_of("order", self.order, FLATTEN_ORDERS)
        c, h, w, n = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (c * h * w, self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.order == "hwc":
            kernel = kernel.reshape(h, w, c, self.features).transpose(2, 0, 1, 3)
        y = lax.dot_general(x.reshape(c * h * w, n), kernel.reshape(c * h * w, self.features),
                            (((0,), (0,)), ((), ())))
        return y + bias
