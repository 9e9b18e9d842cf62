"""LeNet-5 with ReLU and max pooling, in the layout of the PyTorch module the tests keep."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import (
    batch_minor,
    conv,
    flatten_chw,
    logits,
    max_pool,
    use_batch_minor,
)


class LeNet5(nn.Module):
    """conv 6 5x5, pool, conv 16 5x5, pool, dense 120, 84, num_classes (32x32 input: 16*5*5=400).

    torch names: conv1, conv2, fc1, fc2, fc3 (see `porting.tables`). With `batch_minor` the
    convolutions and pools run on [C, H, W, N] arrays (`layers.batch_minor_conv`; None: with
    the CPU kernels, see `layers.use_batch_minor`); the parameters are the same either way.
    """

    num_classes: int
    dtype: jnp.dtype | None = None
    impl: str = "auto"
    batch_minor: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, 32, 32, C] -> logits float32[N, num_classes]."""
        bm = use_batch_minor(self.batch_minor, self.impl)
        if bm:
            x = batch_minor(x)
        for name, features in (("conv1", 6), ("conv2", 16)):
            x = conv(features, 5, impl=self.impl, dtype=self.dtype, batch_minor=bm, name=name)(x)
            x = max_pool(nn.relu(x), 2, 2, impl=self.impl)
        x = flatten_chw(x, batch_minor=bm)
        x = nn.relu(nn.Dense(120, dtype=self.dtype, name="fc1")(x))
        x = nn.relu(nn.Dense(84, dtype=self.dtype, name="fc2")(x))
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x))
