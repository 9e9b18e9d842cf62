"""Max pooling as a maximum over strided slices, with torch's tie rule as a custom derivative.

XLA:CPU's gradient of `reduce_window` max pooling (select-and-scatter) is slow; the maximum over
the k*k strided slices of the -inf-padded input, with a JVP that follows each window's first
maximum, computes the same numbers much faster (docs/performance.md). Works on NHWC and on
batch-minor [C, H, W, N] arrays alike: rows and columns are axes 1 and 2 in both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """torch.nn.MaxPool2d(window, stride, padding) (floor mode, -inf padding).

    Args:
      x: [N, H, W, C] or batch-minor [C, H, W, N].
    """
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
