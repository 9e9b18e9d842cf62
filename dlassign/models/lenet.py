"""LeNet-5 with ReLU and max pooling, in the layout of the PyTorch module the tests keep."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import activation_max_pool, conv, flatten_dense, logits
from dlassign.models.registry import Architecture, TorchEntry


class LeNet5(nn.Module):
    """conv 6 5x5, pool, conv 16 5x5, pool, dense 120, 84, num_classes (32x32 input: 16*5*5=400).

    torch names: conv1, conv2, fc1, fc2, fc3 (`torch_table`).
    """

    num_classes: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, 32, 32, C] -> logits float32[N, num_classes]."""
        for name, features in (("conv1", 6), ("conv2", 16)):
            x = conv(features, 5, dtype=self.dtype, name=name)(x)
            x = activation_max_pool(x, "relu", 2, 2)
        x = nn.relu(flatten_dense(x, 120, "chw", dtype=self.dtype, name="fc1"))
        x = nn.relu(nn.Dense(84, dtype=self.dtype, name="fc2")(x))
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc3")(x))


def torch_table() -> list[TorchEntry]:
    """`torch_module`'s names: conv1, conv2, fc1, fc2, fc3."""
    return [TorchEntry("conv1", ("conv1",), "conv"), TorchEntry("conv2", ("conv2",), "conv"),
            TorchEntry("fc1", ("fc1",), "linear"), TorchEntry("fc2", ("fc2",), "linear"),
            TorchEntry("fc3", ("fc3",), "linear", head=True)]


def torch_module(num_classes: int = 10, in_channels: int = 3):
    """The PyTorch LeNet-5 this module mirrors (ReLU, 2x2 max pooling); needs the torch extra."""
    import torch
    from torch import nn

    class TorchLeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(in_channels, 6, 5)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, num_classes)

        def forward(self, x):
            x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.flatten(x, 1)
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.fc3(x)

    return TorchLeNet5()


ARCHITECTURES = (Architecture("lenet5", LeNet5, head="fc3", min_image_size=32, image_size=32,
                              torch_table=torch_table, torch_module=torch_module,
                              why="LeNet-5 wins here: with little data and short training, 62k "
                                  "parameters fit fastest; deeper networks need more data or "
                                  "epochs to overtake it."),)
