"""AlexNet in torchvision's layout (the one-GPU variant of Krizhevsky's 'one weird trick')."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import (
    PooledDense,
    adaptive_avg_pool,
    conv,
    flatten_chw,
    logits,
    max_pool,
)
from dlassign.models.registry import Architecture, TorchEntry

# (features, kernel, stride, padding, pool after) for torchvision's features.0/3/6/8/10.
_CONVS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
          (256, 3, 1, 1, False), (256, 3, 1, 1, True))

MIN_IMAGE_SIZE = 63  # Smaller inputs leave nothing for the third 3x3/2 max pool.


class AlexNet(nn.Module):
    """Conv 11/4, 5, 3, 3, 3 with 3x3/2 max pools, adaptive 6x6 average pool, 3 dense layers."""

    num_classes: int
    dropout: float = 0.5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, H, W, 3] with H, W >= 63 -> logits float32[N, num_classes]."""
        for i, (f, k, s, p, pool) in enumerate(_CONVS):
            x = nn.relu(conv(f, k, s, p, dtype=self.dtype, name=f"conv{i + 1}")(x))
            if pool:
                x = max_pool(x, 3, 2)
        # fc1 takes the adaptive 6x6 average pool, flattened; with dropout in between (while
        # training), each pooled copy of a pixel has its own mask and the pool stays apart
        if train and self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=False)(
                flatten_chw(adaptive_avg_pool(x, (6, 6))))
            x = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc1")(x))
        else:
            x = nn.relu(PooledDense(4096, (6, 6), self.dtype, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.relu(nn.Dense(4096, dtype=self.dtype, name="fc2")(x))
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


def torch_table() -> list[TorchEntry]:
    """torchvision AlexNet: features.{0,3,6,8,10} are convs, classifier.{1,4,6} dense."""
    convs = [TorchEntry(f"features.{i}", (f"conv{k + 1}",), "conv")
             for k, i in enumerate((0, 3, 6, 8, 10))]
    return convs + [TorchEntry("classifier.1", ("fc1",), "linear"),
                    TorchEntry("classifier.4", ("fc2",), "linear"),
                    TorchEntry("classifier.6", ("head",), "linear", head=True)]


ARCHITECTURES = (Architecture("alexnet", AlexNet, min_image_size=MIN_IMAGE_SIZE,
                              torch_table=torch_table, torchvision="alexnet",
                              why="AlexNet needs inputs upsampled to at least 63 pixels, and its "
                                  "large early strides discard detail that small digits need."),)
