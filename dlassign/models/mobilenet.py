"""MobileNetV2 in torchvision's layout: inverted residual blocks of depthwise-separable convs.

The Flax module names read as the architecture (`stem_conv`, `block{N}` with `expand_conv` ...
`project_bn`, `last_conv`, `head`); `torch_table` maps torchvision's `features.N...` names onto
them. `block{N}` is torchvision's `features.N`, so the two can be read side by side.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlassign.models.layers import batch_norm, channels, conv, global_avg_pool, logits
from dlassign.models.registry import Architecture, TorchEntry

# torchvision's inverted-residual setting [t, c, n, s]: expansion ratio, output channels,
# blocks, stride of the stage's first block.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
ROUND_NEAREST = 8


def make_divisible(value: float, divisor: int = ROUND_NEAREST) -> int:
    """torchvision's `_make_divisible`: the nearest multiple of `divisor`, at least `divisor`,
    and never more than 10% below `value` (from the original TensorFlow implementation).

    At width 1.0 every channel count of MobileNetV2 is already a multiple of 8, so this is the
    identity there; it is kept so the channel arithmetic reads as torchvision's does.
    """
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def block_layout() -> list[tuple[int, int, int, int]]:
    """The inverted residual blocks in order, as torchvision builds them.

    Returns:
      One (in_channels, out_channels, stride, expand_ratio) per block; the i-th (from 0) is
      torchvision's `features.{i + 1}` and Flax's `block{i + 1}`.
    """
    layout, in_channels = [], make_divisible(STEM_CHANNELS)
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        out_channels = make_divisible(c)
        for i in range(n):
            layout.append((in_channels, out_channels, s if i == 0 else 1, t))
            in_channels = out_channels
    return layout


class InvertedResidual(nn.Module):
    """1x1 expand (skipped at ratio 1), 3x3 depthwise with the stride, linear 1x1 project.

    The projection has no activation: the paper's point is that ReLU on the narrow bottleneck
    destroys information, so only the wide expanded tensor is rectified (ReLU6 as torchvision).
    """

    out_channels: int
    stride: int
    expand_ratio: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """x: [N, H, W, C_in] -> [N, ceil(H / stride), ceil(W / stride), out_channels]."""
        in_channels = channels(x)
        # torchvision rounds (not floors) the hidden width; at ratio 1 or 6 that is exact.
        hidden = int(round(in_channels * self.expand_ratio))
        c = lambda f, k, s, p, groups, name: conv(f, k, s, p, use_bias=False, groups=groups,
                                                  dtype=self.dtype, name=name)
        bn = lambda name: batch_norm(train, self.dtype, name=name)
        y = x
        if self.expand_ratio != 1:
            y = nn.relu6(bn("expand_bn")(c(hidden, 1, 1, 0, 1, "expand_conv")(y)))
        # groups == channels: one 3x3 filter per channel (Conv2dNormActivation pads k // 2).
        y = nn.relu6(bn("depthwise_bn")(c(hidden, 3, self.stride, 1, hidden,
                                          "depthwise_conv")(y)))
        y = bn("project_bn")(c(self.out_channels, 1, 1, 0, 1, "project_conv")(y))
        if self.stride == 1 and in_channels == self.out_channels:
            return x + y
        return y


class MobileNetV2(nn.Module):
    """torchvision's `mobilenet_v2` at width 1.0.

    stem_conv 3x3/2 to 32 + stem_bn + ReLU6, 17 inverted residual blocks block1..block17,
    last_conv 1x1 to 1280 + last_bn + ReLU6, global average pool, dropout, head.

    Attributes:
      num_classes: width of the head.
      dropout: drop rate before the head (torchvision's 0.2); active only with train=True.
      dtype: compute dtype (None: Flax's promotion of parameters and input).
    """

    num_classes: int
    dropout: float = 0.2
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [N, H, W, 3], any H, W >= 1 -> logits float32[N, num_classes] (float64 stays)."""
        x = conv(make_divisible(STEM_CHANNELS), 3, 2, 1, use_bias=False, dtype=self.dtype,
                 name="stem_conv")(x)
        x = nn.relu6(batch_norm(train, self.dtype, name="stem_bn")(x))
        for i, (_, out_channels, stride, t) in enumerate(block_layout()):
            x = InvertedResidual(out_channels, stride, t, self.dtype,
                                 name=f"block{i + 1}")(x, train)
        x = conv(make_divisible(LAST_CHANNELS), 1, 1, 0, use_bias=False, dtype=self.dtype,
                 name="last_conv")(x)
        x = nn.relu6(batch_norm(train, self.dtype, name="last_bn")(x))
        x = global_avg_pool(x)  # adaptive_avg_pool2d to 1x1 + flatten
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return logits(nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x))


def torch_table() -> list[TorchEntry]:
    """torchvision MobileNetV2's names (as `named_modules()` lists them) -> Flax paths.

    features.0.{0,1}: stem conv, bn. features.N (N = 1..17) is an InvertedResidual whose
    `conv` Sequential holds [expand Conv2dNormActivation (ratio != 1 only), depthwise
    Conv2dNormActivation, project Conv2d, project BatchNorm2d], so its indices shift by one
    when the expansion is absent (block 1). features.18.{0,1}: last conv, bn. classifier.1:
    the Linear head (classifier.0 is the dropout).
    """
    entries = [TorchEntry("features.0.0", ("stem_conv",), "conv"),
               TorchEntry("features.0.1", ("stem_bn",), "bn")]
    layout = block_layout()
    for n, (_, _, _, t) in enumerate(layout, start=1):
        prefix, block = f"features.{n}.conv", f"block{n}"
        i = 0
        if t != 1:
            entries += [TorchEntry(f"{prefix}.0.0", (block, "expand_conv"), "conv"),
                        TorchEntry(f"{prefix}.0.1", (block, "expand_bn"), "bn")]
            i = 1
        entries += [TorchEntry(f"{prefix}.{i}.0", (block, "depthwise_conv"), "conv"),
                    TorchEntry(f"{prefix}.{i}.1", (block, "depthwise_bn"), "bn"),
                    TorchEntry(f"{prefix}.{i + 1}", (block, "project_conv"), "conv"),
                    TorchEntry(f"{prefix}.{i + 2}", (block, "project_bn"), "bn")]
    last = len(layout) + 1
    return entries + [TorchEntry(f"features.{last}.0", ("last_conv",), "conv"),
                      TorchEntry(f"features.{last}.1", ("last_bn",), "bn"),
                      TorchEntry("classifier.1", ("head",), "linear", head=True)]


ARCHITECTURES = (
    Architecture("mobilenet_v2", MobileNetV2, head="head", min_image_size=1,
                 torch_table=torch_table, torchvision="mobilenet_v2",
                 why="MobileNetV2 is light (2.2M parameters in depthwise-separable, "
                     "BatchNorm-stabilised blocks) but built for 224x224: its five stride-2 "
                     "stages shrink a 32x32 crop to 1x1 from block 14 on, so its last blocks' "
                     "3x3 depthwise filters see only their centre pixel and it classifies "
                     "digits from very coarse features."),
)
