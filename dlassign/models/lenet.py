"""LeNet-5 with ReLU and max pooling, in the layout of the PyTorch module the tests keep."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import conv, flatten_chw, logits, max_pool


class LeNet5(nn.Module):
    """conv 6 5x5, pool, conv 16 5x5, pool, dense 120, 84, num_classes (32x32 input: 16*5*5=400).

    torch names: conv1, conv2, fc1, fc2, fc3 (see `porting.tables`).
    """

    num_classes: int
    dtype: jnp.dtype | None = None
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, 32, 32, C] -> logits float32[N, num_classes]."""
        x = max_pool(nn.relu(conv(6, 5, impl=self.impl, dtype=self.dtype, name="conv1")(x)),
                     2, 2, impl=self.impl)
        x = max_pool(nn.relu(conv(16, 5, impl=self.impl, dtype=self.dtype, name="conv2")(x)),
                     2, 2, impl=self.impl)
        x = flatten_chw(x)
        x = nn.relu(nn.Dense(120, dtype=self.dtype, name="fc1")(x))
        x = nn.relu(nn.Dense(84, dtype=self.dtype, name="fc2")(x))
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x))
