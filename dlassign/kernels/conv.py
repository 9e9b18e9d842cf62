"""Matmul forms of plain NHWC convolutions, for the shapes where XLA:CPU's own kernel is slow.

* im2col: pad, take the kh*kw shifted (strided) slices, concatenate them along channels, one
  matmul.
* tiled: stride-1 kernels with few output channels take patches under tiles of several output
  pixels and a banded kernel matrix, so one matmul row yields several pixels' outputs.
* dense: a 1x1 output from a map with fewer pixels than the kernel has taps (ResNet's last
  stage at 32x32) is one matmul over the real pixels, skipping the products with padding.
* canonical gradients: the convolutions left to XLA get their two gradients written as
  forward NHWC x HWIO convolutions (`canonical_conv`). XLA:CPU rewrites a gradient
  convolution into that form only in a program's top-level computation; inside a loop or a
  branch (a multi-step training call) it stays in a layout that Eigen's fast path does not
  take and runs up to 50x slower.

`conv_path` picks the form from the shapes; `cpu_conv_general_dilated` has
`lax.conv_general_dilated`'s signature so `nn.Conv` can take it. Every form is an exact rewrite
for finite inputs (only the summation order differs), checked against XLA in float64 by the
tests; the measurements behind the choices are in docs/performance.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _nhwc_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, _DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(lhs, rhs, window_strides, padding):
    """`lax.conv_general_dilated` for NHWC x HWIO -> NHWC, whose input and kernel gradients are
    themselves NHWC x HWIO convolutions, the one layout XLA:CPU's fast convolution takes.

    Exact: the same products and sums as XLA's own transposition (the tests compare both
    gradients and Hessian-vector products in float64); forward-over-reverse differentiation
    goes through the backward convolutions as usual.
    """
    return _nhwc_conv(lhs, rhs, window_strides, padding)


def _canonical_conv_fwd(lhs, rhs, window_strides, padding):
    return _nhwc_conv(lhs, rhs, window_strides, padding), (lhs, rhs)


def _canonical_conv_bwd(window_strides, padding, residuals, dy):
    x, w = residuals
    kh, kw = w.shape[:2]
    h, wd = x.shape[1:3]
    ho, wo = dy.shape[1:3]
    (pt, _), (pl, _) = padding
    sh, sw = window_strides
    # input gradient: dy spread out by the strides, against the flipped kernel with I and O
    # swapped, padded so that the output has the input's size
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = _nhwc_conv(dy, flipped, (1, 1),
                    ((kh - 1 - pt, h + pt - sh * (ho - 1) - 1),
                     (kw - 1 - pl, wd + pl - sw * (wo - 1) - 1)), lhs_dilation=(sh, sw))
    # kernel gradient: the input's channels as the batch and its examples as the features,
    # dy as the kernel dilated by the strides; the far padding leaves exactly kh x kw outputs
    # (where it would be negative, the rows and columns the forward never read are cut)
    hi_h, hi_w = kh + sh * (ho - 1) - h - pt, kw + sw * (wo - 1) - wd - pl
    x = x[:, :h + min(hi_h, 0), :wd + min(hi_w, 0)]
    dw = _nhwc_conv(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                    ((pt, max(hi_h, 0)), (pl, max(hi_w, 0))), rhs_dilation=(sh, sw))
    return dx, dw.transpose(1, 2, 0, 3)


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


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
    width that gives the matmul at least 24 output columns (TILE*O); 1 (plain im2col) for
    strided kernels, 1x1 kernels and 24 or more output channels.
    """
    kh, kw, _, co = rhs_shape
    if tuple(window_strides) != (1, 1) or co >= 24 or kw == 1:
        return 1
    wo = lhs_shape[2] + sum(padding[1]) - kw + 1
    return min(d for d in range(1, wo + 1) if wo % d == 0 and (d * co >= 24 or d == wo))


def dense_pays(lhs_shape, rhs_shape, window_strides, padding) -> bool:
    """One output pixel from an input map with fewer pixels than the kernel has taps (ResNet's
    last stage at 32x32 input): the matmul contracts H*W*I values against im2col's KH*KW*I.
    Larger outputs stay with im2col, which needs less temporary memory there.
    """
    kh, kw = rhs_shape[:2]
    ho = (lhs_shape[1] + sum(padding[0]) - kh) // window_strides[0] + 1
    wo = (lhs_shape[2] + sum(padding[1]) - kw) // window_strides[1] + 1
    return ho * wo == 1 and lhs_shape[1] * lhs_shape[2] < kh * kw


_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def im2col_pays(lhs_shape, rhs_shape, window_strides, padding) -> bool:
    """Where a matmul rewrite beat XLA:CPU's convolution when measured
    (docs/performance.md): 1x1 kernels, outputs of at most 2x2 pixels,
    and small kernels over a few input channels. Single-channel inputs stay with XLA (im2col
    would contract over only kh*kw terms from a patch matrix kh*kw times the input), as do large
    kernels and 3x3 layers on 4x4 and larger maps with many channels.
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
            if precision is None and preferred_element_type is None:
                return canonical_conv(lhs, rhs, tuple(window_strides),
                                      tuple(map(tuple, padding)))
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)

    return conv_general_dilated


# `lax.conv_general_dilated`'s signature, taking the form `conv_path` names: the first rewrites
# where it pays, the second every plain 2-D NHWC convolution (the tests compare both with XLA's).
# Dilated, grouped or other-layout convolutions always go to XLA unchanged.
cpu_conv_general_dilated = _conv_general_dilated(force=False)
im2col_conv_general_dilated = _conv_general_dilated(force=True)
