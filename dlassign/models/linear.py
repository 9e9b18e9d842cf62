"""Models whose output is a scalar logit: logistic regression and deep linear networks."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class LogisticRegression(nn.Module):
    """z = w.x + b; a binary classifier through sigmoid(z)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, ...] -> logits [N]."""
        return nn.Dense(1, name="linear")(x.reshape(x.shape[0], -1))[:, 0]


class DeepLinear(nn.Module):
    """z = w_L^T W_{L-1} ... W_1 x: linear activations, no biases, scalar output.

    Without biases the network's function is a product of its weight matrices, which is what
    makes the sign and rescaling symmetries (and so the non-convexity certificates) exact.
    """

    hidden_sizes: Sequence[int] = (4,)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, ...] -> logits [N]."""
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden_sizes):
            x = nn.Dense(width, use_bias=False, name=f"layer{i}")(x)
        return nn.Dense(1, use_bias=False, name=f"layer{len(self.hidden_sizes)}")(x)[:, 0]
