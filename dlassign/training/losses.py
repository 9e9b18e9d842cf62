"""Classification losses on logits: softmax cross-entropy and MSE on probabilities.

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


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example -y log sigmoid(z) - (1 - y) log(1 - sigmoid(z)), stable for large |z|."""
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def binary_mse(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example (sigmoid(z) - y)^2."""
    return (jax.nn.sigmoid(logits) - labels.astype(logits.dtype)) ** 2


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}
BINARY_LOSSES = {"cross_entropy": binary_cross_entropy, "mse": binary_mse}


def get_loss(name: str, binary: bool = False):
    table = BINARY_LOSSES if binary else LOSSES
    if name not in table:
        raise one_of("loss", name, table)
    return table[name]
