"""Model registry: `get_model(name, num_classes=..., **kwargs)`."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn

from dlassign.errors import ConfigError, one_of
from dlassign.models.alexnet import AlexNet
from dlassign.models.cnn import CNN
from dlassign.models.lenet import LeNet5
from dlassign.models.linear import DeepLinear, LogisticRegression
from dlassign.models.mlp import MLP
from dlassign.models.resnet import ResNet
from dlassign.models.vgg import VGG

MODELS = {
    "mlp": MLP,
    "cnn": CNN,
    "lenet5": LeNet5,
    "alexnet": AlexNet,
    "vgg16": functools.partial(VGG, batch_norm=False),
    "vgg16_bn": functools.partial(VGG, batch_norm=True),
    "resnet18": functools.partial(ResNet, depth=18),
    "resnet34": functools.partial(ResNet, depth=34),
    "resnet50": functools.partial(ResNet, depth=50),
    "resnet101": functools.partial(ResNet, depth=101),
}

# The smallest square input each architecture accepts.
MIN_IMAGE_SIZE = {"alexnet": 63, "lenet5": 32, "vgg16": 32, "vgg16_bn": 32, "cnn": 10}


def min_image_size(name: str, padding: str = "valid") -> int:
    """Smallest square input of a model; the CNN with 'same' padding only needs its two pools."""
    if name == "cnn" and padding == "same":
        return 4
    return MIN_IMAGE_SIZE.get(name, 1)


def model_class(name: str) -> type[nn.Module]:
    if name not in MODELS:
        raise one_of("model", name, MODELS)
    m = MODELS[name]
    return m.func if isinstance(m, functools.partial) else m


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
      name: one of `MODELS`.
      num_classes: width of the classification head.
      **kwargs: the module's other fields (hidden_sizes, activation, dropout, dtype, impl, ...).

    Raises:
      ConfigError: unknown name, or a keyword the model does not have.
    """
    cls = model_class(name)
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "num_classes"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(f"model {name!r} has no field {', '.join(map(repr, unknown))}; "
                          f"its fields are {', '.join(sorted(fields))}")
    return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "MIN_IMAGE_SIZE", "min_image_size", "AlexNet", "CNN", "DeepLinear", "LeNet5",
           "LogisticRegression", "MLP", "ResNet", "VGG", "get_model", "model_class"]
