"""Explicit name tables: torchvision module names to Flax module paths, one entry per layer.

Each entry says which torch module (a prefix such as `layer1.0.conv1`) becomes which Flax module
(a path such as ('layer1_0', 'conv1')) and what kind of layer it is; `rules` turns the kind into
the per-tensor mapping. The tables are written out, not inferred, so a reader can check every
line against torchvision's `named_modules()`.
"""

from __future__ import annotations

import dataclasses

from dlassign.errors import one_of
from dlassign.models.resnet import RESNET_LAYOUTS
from dlassign.models.vgg import VGG16_LAYERS


@dataclasses.dataclass(frozen=True)
class Entry:
    """torch: the torch module name; flax: the Flax module path; kind: conv, linear or bn;
    head: the classification layer, the one part that may be replaced for a new class count."""

    torch: str
    flax: tuple[str, ...]
    kind: str
    head: bool = False


def lenet5() -> list[Entry]:
    """LeNet-5 (`dlassign.porting.torch_models.LeNet5`): conv1, conv2, fc1, fc2, fc3."""
    return [Entry("conv1", ("conv1",), "conv"), Entry("conv2", ("conv2",), "conv"),
            Entry("fc1", ("fc1",), "linear"), Entry("fc2", ("fc2",), "linear"),
            Entry("fc3", ("fc3",), "linear", head=True)]


def alexnet() -> list[Entry]:
    """torchvision AlexNet: features.{0,3,6,8,10} are convs, classifier.{1,4,6} dense."""
    convs = [Entry(f"features.{i}", (f"conv{k + 1}",), "conv")
             for k, i in enumerate((0, 3, 6, 8, 10))]
    return convs + [Entry("classifier.1", ("fc1",), "linear"),
                    Entry("classifier.4", ("fc2",), "linear"),
                    Entry("classifier.6", ("head",), "linear", head=True)]


def vgg16(batch_norm: bool) -> list[Entry]:
    """torchvision VGG-16(-BN): features.N numbered through conv (+bn) + relu and pool layers."""
    entries, index, conv = [], 0, 0
    for layer in VGG16_LAYERS:
        if layer == "M":
            index += 1
            continue
        entries.append(Entry(f"features.{index}", (f"conv{conv}",), "conv"))
        if batch_norm:
            entries.append(Entry(f"features.{index + 1}", (f"bn{conv}",), "bn"))
        index += 3 if batch_norm else 2
        conv += 1
    return entries + [Entry("classifier.0", ("fc1",), "linear"),
                      Entry("classifier.3", ("fc2",), "linear"),
                      Entry("classifier.6", ("head",), "linear", head=True)]


def resnet(depth: int) -> list[Entry]:
    """torchvision ResNet: conv1, bn1, layerS.B.{conv,bn}{1,2[,3]}, downsample.{0,1}, fc."""
    stages, bottleneck = RESNET_LAYOUTS[depth]
    entries = [Entry("conv1", ("conv1",), "conv"), Entry("bn1", ("bn1",), "bn")]
    in_planes = 64
    for s, blocks in enumerate(stages):
        planes = 64 * 2**s
        out_planes = planes * (4 if bottleneck else 1)
        for b in range(blocks):
            t, f = f"layer{s + 1}.{b}", f"layer{s + 1}_{b}"
            for i in range(1, 4 if bottleneck else 3):
                entries += [Entry(f"{t}.conv{i}", (f, f"conv{i}"), "conv"),
                            Entry(f"{t}.bn{i}", (f, f"bn{i}"), "bn")]
            stride = 2 if (s > 0 and b == 0) else 1
            if stride != 1 or in_planes != out_planes:
                entries += [Entry(f"{t}.downsample.0", (f, "downsample_conv"), "conv"),
                            Entry(f"{t}.downsample.1", (f, "downsample_bn"), "bn")]
            in_planes = out_planes
    return entries + [Entry("fc", ("fc",), "linear", head=True)]


TABLES = {
    "lenet5": lenet5,
    "alexnet": alexnet,
    "vgg16": lambda: vgg16(False),
    "vgg16_bn": lambda: vgg16(True),
    "resnet18": lambda: resnet(18),
    "resnet34": lambda: resnet(34),
    "resnet50": lambda: resnet(50),
    "resnet101": lambda: resnet(101),
}


def table(arch: str) -> list[Entry]:
    if arch not in TABLES:
        raise one_of("architecture", arch, TABLES)
    return TABLES[arch]()
