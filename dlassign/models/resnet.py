"""ResNet v1.5 in torchvision's layout: the stride of a bottleneck sits on its 3x3 conv."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import batch_norm, channels, conv, global_avg_pool, logits, max_pool
from dlassign.models.registry import Architecture, TorchEntry

# blocks per stage, and whether the blocks are bottlenecks (expansion 4).
RESNET_LAYOUTS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}


class Block(nn.Module):
    """A basic block (two 3x3) or a bottleneck (1x1, 3x3 with the stride, 1x1 x4)."""

    planes: int
    stride: int
    bottleneck: bool
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = lambda f, k, s, p, name: conv(f, k, s, p, use_bias=False, dtype=self.dtype,
                                          name=name)
        bn = lambda name: batch_norm(train, self.dtype, name=name)
        if self.bottleneck:
            out_planes = self.planes * 4
            y = nn.relu(bn("bn1")(c(self.planes, 1, 1, 0, "conv1")(x)))
            y = nn.relu(bn("bn2")(c(self.planes, 3, self.stride, 1, "conv2")(y)))
            y = bn("bn3")(c(out_planes, 1, 1, 0, "conv3")(y))
        else:
            out_planes = self.planes
            y = nn.relu(bn("bn1")(c(self.planes, 3, self.stride, 1, "conv1")(x)))
            y = bn("bn2")(c(self.planes, 3, 1, 1, "conv2")(y))
        if self.stride != 1 or channels(x) != out_planes:
            x = bn("downsample_bn")(c(out_planes, 1, self.stride, 0, "downsample_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """conv1 7x7/2, bn1, max pool 3x3/2, stages layer1..layer4 (blocks layerS_B), mean, fc."""

    num_classes: int
    depth: int = 18
    stage_sizes: Sequence[int] | None = None  # overrides depth's layout, for small test models
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, H, W, 3] -> logits float32[N, num_classes]."""
        stages, bottleneck = RESNET_LAYOUTS[self.depth]
        stages = self.stage_sizes or stages
        x = conv(64, 7, 2, 3, use_bias=False, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
        x = max_pool(x, 3, 2, 1)
        for s, blocks in enumerate(stages):
            for b in range(blocks):
                x = Block(64 * 2**s, 2 if (s > 0 and b == 0) else 1, bottleneck, self.dtype,
                          name=f"layer{s + 1}_{b}")(x, train)
        x = global_avg_pool(x)
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


def torch_table(depth: int) -> list[TorchEntry]:
    """torchvision ResNet: conv1, bn1, layerS.B.{conv,bn}{1,2[,3]}, downsample.{0,1}, fc."""
    stages, bottleneck = RESNET_LAYOUTS[depth]
    entries = [TorchEntry("conv1", ("conv1",), "conv"), TorchEntry("bn1", ("bn1",), "bn")]
    in_planes = 64
    for s, blocks in enumerate(stages):
        planes = 64 * 2**s
        out_planes = planes * (4 if bottleneck else 1)
        for b in range(blocks):
            t, f = f"layer{s + 1}.{b}", f"layer{s + 1}_{b}"
            for i in range(1, 4 if bottleneck else 3):
                entries += [TorchEntry(f"{t}.conv{i}", (f, f"conv{i}"), "conv"),
                            TorchEntry(f"{t}.bn{i}", (f, f"bn{i}"), "bn")]
            stride = 2 if (s > 0 and b == 0) else 1
            if stride != 1 or in_planes != out_planes:
                entries += [TorchEntry(f"{t}.downsample.0", (f, "downsample_conv"), "conv"),
                            TorchEntry(f"{t}.downsample.1", (f, "downsample_bn"), "bn")]
            in_planes = out_planes
    return entries + [TorchEntry("fc", ("fc",), "linear", head=True)]


WHY = ("Why a residual network suits SVHN: the crops are 32x32 with neighbouring digits as "
       "clutter, so separating the centre digit takes depth but no more resolution than 32 "
       "pixels; identity shortcuts keep gradients healthy through that depth and BatchNorm keeps "
       "fine-tuning stable at a usable learning rate. VGG-16 without BatchNorm (the write-up's "
       "collapsed run) and AlexNet need upsampled inputs and carry 4096-wide dense layers that "
       "over-fit a 25% subset.")

ARCHITECTURES = tuple(
    Architecture(f"resnet{depth}", functools.partial(ResNet, depth=depth), head="fc",
                 torch_table=functools.partial(torch_table, depth), torchvision=f"resnet{depth}",
                 why=WHY)
    for depth in (18, 34, 50, 101))
