"""Classification losses on logits: softmax cross-entropy, MSE on probabilities and the square
loss on the logits themselves (Cohen et al.'s "MSE").

Multi-class losses take logits float[N, K] and integer labels int[N]; binary ones (the convexity
study) take a scalar logit per example, float[N], and labels in {0, 1}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dlassign.errors import one_of


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy: float[N]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def mse(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example squared error between softmax probabilities and one-hot labels: float[N]."""
    p = jax.nn.softmax(logits)
    return jnp.sum((p - jax.nn.one_hot(labels, logits.shape[-1], dtype=p.dtype)) ** 2, axis=-1)


def square(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0.5 * sum_k (logits_k - onehot_k)^2 on the raw outputs: float[N].

    The square loss of Cohen et al. (ICLR 2021; their `SquaredLoss` on one-hot 0/1 targets,
    summed over the batch and divided by its size): convex in the outputs, unlike `mse`, so its
    Gauss-Newton part is positive semi-definite and its curvature does not vanish as the
    softmax saturates.
    """
    target = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return 0.5 * jnp.sum((logits - target) ** 2, axis=-1)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)), stable for large |z|."""
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def binary_mse(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example (sigmoid(z) - y)^2."""
    return (jax.nn.sigmoid(logits) - labels.astype(logits.dtype)) ** 2


def binary_square(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 0.5 * (z - y)^2 on the raw scalar output."""
    return 0.5 * (logits - labels.astype(logits.dtype)) ** 2


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "square": square}
BINARY_LOSSES = {"cross_entropy": binary_cross_entropy, "mse": binary_mse,
                 "square": binary_square}


def get_loss(name: str, binary: bool = False):
    table = BINARY_LOSSES if binary else LOSSES
    if name not in table:
        raise one_of("loss", name, table)
    return table[name]
