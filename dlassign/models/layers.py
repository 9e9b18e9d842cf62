"""Building blocks with torch's semantics, and XLA:CPU fast paths that compute the same numbers.

XLA:CPU has three slow spots that dominate small-image training on a laptop:

* the gradient of `lax.reduce_window` max pooling (select-and-scatter). Pooling becomes a
  `maximum` over the k*k strided slices of the -inf-padded input, with a custom derivative that
  follows each window's first maximum (select-and-scatter's and torch's rule). For 2x2 windows
  this was also 1.6-3.9x faster than a reshape and a `max` over two axes, whose derivative
  compares every element with its window's maximum and counts the ties.
* convolutions on feature maps of a few pixels. They become im2col: pad, take the kh*kw shifted
  (strided) slices, concatenate them along channels and do one matmul. Stride-1 kernels with
  few output channels (LeNet-5's 5x5 to 6 and 16) take patches under tiles of several output
  pixels and a banded kernel matrix, so the matmul gives several pixels' outputs per patch: a
  smaller patch matrix and a wider matmul, for some multiplications by zero. A 1x1 output
  from a map with fewer pixels than the kernel has taps (ResNet's last stage at 32x32 input)
  becomes one dense matmul with the kernel taps the real pixels meet instead, which leaves out
  the products with padding zeros that im2col would compute (a 3x3 kernel on a 1x1 map is its
  centre tap alone).
* everything around small convolutions: the per-pixel work over 1-16 channels (bias, ReLU,
  pooling and their gradients) and im2col patches whose rows are runs of a few channels. Models
  with `batch_minor` run on [C, H, W, N] arrays instead (`batch_minor_conv`,
  `BatchMinorConv`): patch rows are strided slices whose innermost runs are whole batches, and
  the elementwise work runs over contiguous batches.

All are exact rewrites for finite inputs (the same sums and maxima; only the summation order of
the matmul differs, and terms that are zero) and are checked against the plain operations,
values and gradients, in float64 by the tests. `impl='auto'` uses them when JAX's default
backend is the CPU; 'xla' and 'cpu' force a choice. Pooling always takes the rewrite on the
CPU; each NHWC convolution the form `conv_path` names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dlassign.errors import one_of

IMPLS = ("auto", "cpu", "xla", "im2col")

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


def use_cpu_kernels(impl: str) -> bool:
    """Whether the CPU rewrites apply; decided at trace time from JAX's default backend.

    'auto': on the CPU; 'cpu': always; 'im2col': always, and a rewrite for every plain convolution
    (im2col, or the dense or tiled form where they pay; for tests and benchmarks); 'xla': never.
    """
    if impl not in IMPLS:
        raise one_of("impl", impl, IMPLS)
    return impl in ("cpu", "im2col") or (impl == "auto" and jax.default_backend() == "cpu")


def max_pool(
    x: jax.Array, window: int, stride: int, padding: int = 0, impl: str = "auto"
) -> jax.Array:
    """torch.nn.MaxPool2d(window, stride, padding) on NHWC input (floor mode, -inf padding).

    Args:
      x: [N, H, W, C].
      window, stride, padding: square, as in torch.
      impl: 'auto', 'cpu' or 'xla' (see module docstring).
    """
    pads = ((padding, padding), (padding, padding))
    if not use_cpu_kernels(impl):
        return nn.max_pool(x, (window, window), (stride, stride), pads)
    return _tap_max_pool(x, window, stride, padding)


def _taps(x: jax.Array, window: int, stride: int, padding: int):
    """-inf-padded x and the strided slice of every window tap, in row-major tap order."""
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=-jnp.inf)
    ho, wo = (x.shape[1] - window) // stride + 1, (x.shape[2] - window) // stride + 1
    index = [(a, b, (slice(None), slice(a, a + stride * (ho - 1) + 1, stride),
                     slice(b, b + stride * (wo - 1) + 1, stride)))
             for a in range(window) for b in range(window)]
    return x, index


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _tap_max_pool(x, window, stride, padding):
    """Max over the strided slices of the window taps; no reduce_window, no select-and-scatter.

    Derivatives follow the first maximum of each window in row-major order, exactly as XLA's
    select-and-scatter (and torch) break ties. The rule is a JVP, so reverse mode (its
    transpose) and forward-over-reverse Hessian-vector products both work.
    """
    xp, index = _taps(x, window, stride, padding)
    out = None
    for _, _, sl in index:
        out = xp[sl] if out is None else jnp.maximum(out, xp[sl])
    return out


@_tap_max_pool.defjvp
def _tap_max_pool_jvp(window, stride, padding, primals, tangents):
    (x,), (t,) = primals, tangents
    out = _tap_max_pool(x, window, stride, padding)
    xp, index = _taps(x, window, stride, padding)
    tp = jnp.pad(t, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    taken = jnp.zeros(out.shape, bool)
    t_out = jnp.zeros(out.shape, t.dtype)
    for _, _, sl in index:
        first = (xp[sl] == out) & ~taken
        taken = taken | first
        t_out = t_out + jnp.where(first, tp[sl], jnp.zeros((), t.dtype))
    return out, t_out


def _im2col_conv(lhs, rhs, window_strides, padding):
    """NHWC x HWIO convolution as one matmul over the kh*kw shifted slices."""
    kh, kw, ci, co = rhs.shape
    x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    sh, sw = window_strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    if kh == kw == 1:
        patches = x[:, : sh * (ho - 1) + 1: sh, : sw * (wo - 1) + 1: sw]
    else:
        patches = jnp.concatenate(
            [x[:, i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw]
             for i in range(kh) for j in range(kw)], axis=-1)
    out = jnp.dot(patches.reshape(-1, kh * kw * ci), rhs.reshape(kh * kw * ci, co))
    return out.reshape(lhs.shape[0], ho, wo, co)


def _dense_conv(lhs, rhs, padding):
    """NHWC x HWIO convolution with a 1x1 output as one matmul over the real input pixels.

    Input pixel (a, b) meets kernel tap (a + top padding, b + left padding), or none; the
    padding, which im2col would multiply, takes no part.
    """
    n, h, w, ci = lhs.shape
    out = jnp.dot(lhs.reshape(n, h * w * ci), _pixel_taps(rhs, h, w, padding))
    return out.reshape(n, 1, 1, rhs.shape[3])


def _pixel_taps(rhs, h, w, padding):
    """[H*W*I, O]: for each input pixel (row-major) the kernel tap it meets for a 1x1 output,
    zeros for a pixel outside the window."""
    kh, kw, ci, co = rhs.shape
    (pt, _), (pl, _) = padding
    zero = jnp.zeros((ci, co), rhs.dtype)
    return jnp.concatenate([rhs[a + pt, b + pl] if a + pt < kh and b + pl < kw else zero
                            for a in range(h) for b in range(w)], axis=0)


def _band(rhs, tile):
    """[KH, TILE+KW-1, I, TILE, O]: the kernel under each of a tile's TILE output columns."""
    return jnp.stack([jnp.pad(rhs, ((0, 0), (v, tile - 1 - v), (0, 0), (0, 0)))
                      for v in range(tile)], axis=-2)


def _tiled_conv(lhs, rhs, padding, tile):
    """Stride-1 NHWC x HWIO convolution, im2col over output tiles `tile` pixels wide.

    A patch holds the KH rows of the TILE+KW-1 input columns under one tile's outputs
    ([N, HO, WO/TILE, KH*(TILE+KW-1)*I]; im2col's, tile 1, the KH*KW*I values under one
    output); one matmul with the kernel laid out as a banded (Toeplitz) matrix over the tile's
    columns ([KH*(TILE+KW-1)*I, TILE*O], zero where an input column is outside an output's
    window) gives every tile's TILE*O outputs. Output widths that `tile` does not divide are
    padded on the right and cropped.
    """
    kh, kw, _, co = rhs.shape
    patches, ho, wo, tiles = _tile_patches(lhs, kh, kw, (1, 1), padding, tile, axis=-1)
    k = patches.shape[-1]  # KH * (TILE+KW-1) * I
    out = jnp.dot(patches.reshape(-1, k), _band(rhs, tile).reshape(k, tile * co))
    return out.reshape(lhs.shape[0], ho, tiles * tile, co)[:, :, :wo]


def _tile_patches(x, kh, kw, window_strides, padding, tile, axis):
    """im2col patches under output tiles `tile` pixels wide (1: one output each), for NHWC or
    batch-minor [C, H, W, N] input (rows and columns on axes 1 and 2 in both).

    Each patch holds, concatenated along the channel axis `axis`, the KH rows of the
    TILE+KW-1 input columns under a tile (KW for tile 1), taken as two levels of strided
    slices (columns, then rows). Output widths that `tile` does not divide are padded on the
    right. Returns (patches, HO, WO, number of tiles per output row).
    """
    sh, sw = window_strides
    x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    h, w = x.shape[1:3]
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    tiles = -(-wo // tile)
    span = tile + kw - 1 if tile > 1 else kw
    if tile > 1 and tiles * tile + kw - 1 > w:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, tiles * tile + kw - 1 - w), (0, 0)))
    step = tile if tile > 1 else sw
    cols = jnp.concatenate([x[:, :, u: u + step * (tiles - 1) + 1: step] for u in range(span)],
                           axis=axis)
    patches = jnp.concatenate([cols[:, i: i + sh * (ho - 1) + 1: sh] for i in range(kh)],
                              axis=axis)
    return patches, ho, wo, tiles


def tile_width(lhs_shape, rhs_shape, window_strides, padding) -> int:
    """Output tile width of a stride-1 convolution's im2col: the smallest divisor of the output
    width that gives the matmul at least 24 output columns (TILE*O), 1 (plain im2col) for
    strided kernels and 24 or more output channels. LeNet-5's 5x5 layers in NHWC take 4
    (6 channels) and 2 (16): its NHWC train step took 12.4 ms against 18.5 ms with a row form
    (kernel rows' products added after one matmul over the KW*I column shifts), interleaved on
    2 cores (benchmarks/conv_paths.py has the layers alone).
    """
    kh, kw, _, co = rhs_shape
    if tuple(window_strides) != (1, 1) or co >= 24 or kw == 1:
        return 1
    wo = lhs_shape[2] + sum(padding[1]) - kw + 1
    return min(d for d in range(1, wo + 1) if wo % d == 0 and (d * co >= 24 or d == wo))


def dense_pays(lhs_shape, rhs_shape, window_strides, padding) -> bool:
    """One output pixel from an input map with fewer pixels than the kernel has taps (ResNet's
    last stage at 32x32 input): the matmul contracts H*W*I values against im2col's KH*KW*I, so
    it does fewer multiplications. Forward and gradients at batch 128, 2 cores: 1x1x512 -> 512
    1.85 ms against im2col's 11.1 ms, 2x2x256 -> 512 stride 2 3.6 against 5.8 ms. On 2x2
    outputs it was only 1.1x faster per layer and took 94 MiB more temporary memory in
    ResNet-18's step, so those stay with im2col.
    """
    kh, kw = rhs_shape[:2]
    ho = (lhs_shape[1] + sum(padding[0]) - kh) // window_strides[0] + 1
    wo = (lhs_shape[2] + sum(padding[1]) - kw) // window_strides[1] + 1
    return ho * wo == 1 and lhs_shape[1] * lhs_shape[2] < kh * kw


_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def im2col_pays(lhs_shape, rhs_shape, window_strides, padding) -> bool:
    """Where a matmul rewrite beats XLA:CPU's convolution, as measured by
    benchmarks/conv_paths.py and in whole train steps (benchmarks/throughput.py) on 2 cores with
    jaxlib 0.10: 1x1 kernels (a plain matmul), outputs of at most 2x2 pixels (5-15x faster),
    and small contractions of small kernels over several input channels (the MNIST CNN's
    second layer; LeNet-5's, in output tiles wider than a pixel: `tile_width`).
    XLA keeps single-channel inputs, where im2col's matmul would contract over only kh*kw
    terms from a patch matrix kh*kw times the size of the input (the MNIST CNN's step took 30.5
    ms with it, 26.6 ms without), and ResNet's 7x7 stem and 3x3 layers on 4x4 and larger maps,
    where its own convolution is faster.
    """
    kh, kw, cin, _ = rhs_shape
    ho = (lhs_shape[1] + sum(padding[0]) - kh) // window_strides[0] + 1
    wo = (lhs_shape[2] + sum(padding[1]) - kw) // window_strides[1] + 1
    return (kh * kw == 1 or ho * wo <= 4
            or (kh * kw <= 25 and cin > 1 and cin * kh * kw <= 288))


def conv_path(lhs_shape, rhs_shape, window_strides, padding, force: bool = False) -> str:
    """The form a plain NHWC convolution takes on the CPU: 'dense', 'tiled', 'im2col' or 'xla'.

    force: rewrite even where `im2col_pays` says XLA's kernel is faster (impl='im2col').
    """
    if dense_pays(lhs_shape, rhs_shape, window_strides, padding):
        return "dense"
    if force or im2col_pays(lhs_shape, rhs_shape, window_strides, padding):
        tiled = tile_width(lhs_shape, rhs_shape, window_strides, padding) > 1
        return "tiled" if tiled else "im2col"
    return "xla"


def _is_plain(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
              batch_group_count) -> bool:
    return (lhs.ndim == 4
            and not isinstance(padding, str)
            and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
            and feature_group_count == 1 and batch_group_count == 1
            and dimension_numbers is not None
            and tuple(map(tuple, dimension_numbers)) == _NHWC)


def _conv_general_dilated(force: bool):
    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             batch_group_count=1, precision=None, preferred_element_type=None):
        if _is_plain(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count, batch_group_count):
            path = conv_path(lhs.shape, rhs.shape, window_strides, padding, force)
            if path == "dense":
                return _dense_conv(lhs, rhs, padding)
            if path == "tiled":
                return _tiled_conv(lhs, rhs, padding,
                                   tile_width(lhs.shape, rhs.shape, window_strides, padding))
            if path == "im2col":
                return _im2col_conv(lhs, rhs, window_strides, padding)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)

    return conv_general_dilated


# `lax.conv_general_dilated`'s signature, taking the form `conv_path` names: the first rewrites
# where it pays, the second every plain 2-D NHWC convolution (the tests compare both with XLA's).
# Dilated, grouped or other-layout convolutions always go to XLA unchanged.
cpu_conv_general_dilated = _conv_general_dilated(force=False)
im2col_conv_general_dilated = _conv_general_dilated(force=True)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, *, impl: str = "auto",
         use_bias: bool = True, dtype=None, batch_minor: bool = False,
         name: str | None = None) -> nn.Module:
    """A square `nn.Conv` with torch's explicit symmetric padding (never 'SAME' with stride 2);
    with batch_minor, its `BatchMinorConv` twin for [C, H, W, N] input."""
    if batch_minor:
        return BatchMinorConv(features, kernel, stride, padding, use_bias, dtype, name=name)
    kwargs = {}
    if use_cpu_kernels(impl):
        kwargs["conv_general_dilated"] = (im2col_conv_general_dilated if impl == "im2col"
                                          else cpu_conv_general_dilated)
    return nn.Conv(features, (kernel, kernel), (stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   dtype=dtype, name=name, **kwargs)


def use_batch_minor(batch_minor: bool | None, impl: str) -> bool:
    """A model's `batch_minor` field resolved: None means wherever the CPU kernels apply.

    `train.setup` sets it False for a mesh of several devices: the batch-minor matmul merges
    the batch into its minor dimension, which a batch sharded over devices cannot keep (the
    SPMD partitioner all-gathers the patches).
    """
    return use_cpu_kernels(impl) if batch_minor is None else batch_minor


def runs_batch_minor(model: nn.Module) -> bool:
    """Whether a model runs batch-minor (False for models without the `batch_minor` field)."""
    return hasattr(model, "batch_minor") and use_batch_minor(model.batch_minor, model.impl)


def nhwc(model: nn.Module) -> nn.Module:
    """The model with `batch_minor=False` where the field is left to `use_batch_minor` (None);
    any other model unchanged."""
    return model.clone(batch_minor=False) if getattr(model, "batch_minor", False) is None else model


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


def flatten_chw(x: jax.Array, batch_minor: bool = False) -> jax.Array:
    """Flattens NHWC (or batch-minor CHWN) in torch's C, H, W order, so ported Linear weights
    apply unchanged."""
    if batch_minor:
        return jnp.transpose(x, (3, 0, 1, 2)).reshape(x.shape[3], -1)
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def logits(x: jax.Array) -> jax.Array:
    """Output logits in float32 at least: bfloat16 compute returns float32, float64 stays."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
