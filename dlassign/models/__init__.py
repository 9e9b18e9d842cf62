"""Model registry: `get_model(name, num_classes=..., **fields)` and `architecture(name)`.

Each module of this package that exports `ARCHITECTURES` declares its architectures there
(see `registry.Architecture`); nothing else lists them.
"""

from __future__ import annotations

import functools

import flax.linen as nn

from dlassign.discovery import collect
from dlassign.errors import ConfigError, one_of
from dlassign.kernels import IMPLS, placement
from dlassign.models.linear import DeepLinear, LogisticRegression
from dlassign.models.registry import Architecture, TorchEntry


@functools.cache
def architectures() -> dict[str, Architecture]:
    """Every registered architecture by name, collected from this package's modules."""
    return collect(__name__, "ARCHITECTURES")


def architecture(name: str) -> Architecture:
    """The declared facts of one architecture.

    Raises:
      ConfigError: unknown name; the message lists the registered ones.
    """
    archs = architectures()
    if name not in archs:
        raise one_of("model", name, archs)
    return archs[name]


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
      name: a registered architecture (see `architectures()`).
      num_classes: width of the classification head.
      **kwargs: the module's other fields (hidden_sizes, activation, dropout, dtype, ...).

    Raises:
      ConfigError: unknown name, or a keyword the model does not have.
    """
    arch = architecture(name)
    unknown = sorted(set(kwargs) - arch.fields)
    if unknown:
        raise ConfigError(f"model {name!r} has no field {', '.join(map(repr, unknown))}; "
                          f"its fields are {', '.join(sorted(arch.fields))}")
    return arch.module(num_classes=num_classes, **kwargs)


__all__ = ["IMPLS", "Architecture", "DeepLinear", "LogisticRegression", "TorchEntry",
           "architecture", "architectures", "get_model", "placement"]
