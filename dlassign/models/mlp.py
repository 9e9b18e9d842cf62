"""Dense feed-forward networks."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import activation, logits
from dlassign.models.registry import Architecture


class MLP(nn.Module):
    """Flatten, then `len(hidden_sizes)` dense layers with an activation and dropout, then logits.

    Attributes:
      num_classes: width of the output layer.
      hidden_sizes: widths of the hidden layers, e.g. (512, 256).
      activation: a name from `layers.ACTIVATIONS`.
      dropout: dropout rate after each hidden layer (0 disables it).
      dtype: compute dtype (parameters stay float32).
    """

    num_classes: int
    hidden_sizes: Sequence[int] = (128,)
    activation: str = "relu"
    dropout: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, ...] -> logits float32[N, num_classes]."""
        act = activation(self.activation)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden_sizes):
            x = act(nn.Dense(width, dtype=self.dtype, name=f"dense{i}")(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


ARCHITECTURES = (Architecture("mlp", MLP),)
