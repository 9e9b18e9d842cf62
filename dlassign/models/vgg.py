"""VGG in torchvision's layout, with or without BatchNorm."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import PooledDense, batch_norm, conv, logits, max_pool
from dlassign.models.registry import Architecture, TorchEntry

# torchvision's configuration 'D' (VGG-16): channels of each 3x3 conv, 'M' a 2x2/2 max pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class VGG(nn.Module):
    """Convs named conv0..conv12 (bn0..bn12 with batch_norm), adaptive 7x7 pool, fc1, fc2, head."""

    num_classes: int
    layers: Sequence[int | str] = VGG16_LAYERS
    batch_norm: bool = False
    dropout: float = 0.5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, H, W, 3] with H, W >= 32 -> logits float32[N, num_classes]."""
        i = 0
        for layer in self.layers:
            if layer == "M":
                x = max_pool(x, 2, 2)
                continue
            x = conv(layer, 3, 1, 1, dtype=self.dtype, name=f"conv{i}")(x)
            if self.batch_norm:
                x = batch_norm(train, self.dtype, name=f"bn{i}")(x)
            x = nn.relu(x)
            i += 1
        for name in ("fc1", "fc2"):  # fc1 takes the adaptive 7x7 average pool, flattened
            layer = (PooledDense(4096, (7, 7), self.dtype, name=name) if name == "fc1"
                     else nn.Dense(4096, dtype=self.dtype, name=name))
            x = nn.relu(layer(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


def torch_table(batch_norm: bool) -> list[TorchEntry]:
    """torchvision VGG-16(-BN): features.N numbered through conv (+bn) + relu and pool layers."""
    entries, index, conv_index = [], 0, 0
    for layer in VGG16_LAYERS:
        if layer == "M":
            index += 1
            continue
        entries.append(TorchEntry(f"features.{index}", (f"conv{conv_index}",), "conv"))
        if batch_norm:
            entries.append(TorchEntry(f"features.{index + 1}", (f"bn{conv_index}",), "bn"))
        index += 3 if batch_norm else 2
        conv_index += 1
    return entries + [TorchEntry("classifier.0", ("fc1",), "linear"),
                      TorchEntry("classifier.3", ("fc2",), "linear"),
                      TorchEntry("classifier.6", ("head",), "linear", head=True)]


ARCHITECTURES = tuple(
    Architecture(name, functools.partial(VGG, batch_norm=bn), min_image_size=32,
                 torch_table=functools.partial(torch_table, bn), torchvision=name,
                 why="VGG's plain 3x3 stacks work on 32x32 crops once BatchNorm or a low "
                     "learning rate keeps training stable; its 4096-wide dense layers hold most "
                     "of its parameters.")
    for name, bn in (("vgg16", False), ("vgg16_bn", True)))
