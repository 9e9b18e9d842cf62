"""The small MNIST convolutional network of the write-up, with its knobs exposed."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import (
    activation,
    activation_max_pool,
    conv,
    flatten_dense,
    logits,
)
from dlassign.models.registry import Architecture


class CNN(nn.Module):
    """conv 3x3 -> pool 2 per entry of `conv_features`, flatten, dense, dropout, logits.

    The defaults are the write-up's network: conv 32, pool, conv 64, pool, dense 128, dense 10.

    Attributes:
      num_classes: output width.
      conv_features: channels of each conv layer.
      dense_width: width of the hidden dense layer.
      activation: activation of the hidden dense layer (the write-up's tuned knob).
      conv_activation: activation after each convolution.
      padding: 'valid' (Keras's default, 28 -> 26 -> 13 -> 11 -> 5) or 'same'.
      dropout: rate before the output layer.
      dtype: compute dtype.
    """

    num_classes: int
    conv_features: Sequence[int] = (32, 64)
    dense_width: int = 128
    activation: str = "relu"
    conv_activation: str = "relu"
    padding: str = "valid"
    dropout: float = 0.0
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, H, W, C] -> logits float32[N, num_classes]."""
        pad = {"valid": 0, "same": 1}[self.padding]
        for i, f in enumerate(self.conv_features):
            x = conv(f, 3, padding=pad, dtype=self.dtype, name=f"conv{i}")(x)
            x = activation_max_pool(x, self.conv_activation, 2, 2)
        x = activation(self.activation)(flatten_dense(x, self.dense_width, "hwc",
                                                      dtype=self.dtype, name="dense"))
        if self.dropout:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


def _smallest_input(fields) -> int:
    """'valid' 3x3 convs and 2x2 pools need 10 pixels (10 -> 8 -> 4 -> 2 -> 1); 'same' only the
    pools' 4."""
    return 4 if fields.get("padding", "valid") == "same" else 10


ARCHITECTURES = (Architecture("cnn", CNN, min_image_size=_smallest_input),)
