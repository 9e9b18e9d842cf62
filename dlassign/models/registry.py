"""What the rest of the library knows about an architecture, declared beside its module.

Every model module exports `ARCHITECTURES`, a tuple of `Architecture`s: the Flax module, the
name of its classification head, its smallest input, its torch name table, and the
torchvision constructor or torch twin that the porting and parity tests build. The registry
(`dlassign.models.architecture`) collects them from the modules of this package, so adding an
architecture is adding one module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

LAYER_KINDS = ("conv", "linear", "bn")


@dataclasses.dataclass(frozen=True)
class TorchEntry:
    """One line of a torch name table.

    Attributes:
      torch: the torch module name, a prefix such as 'layer1.0.conv1'.
      flax: the Flax module path, such as ('layer1_0', 'conv1').
      kind: 'conv', 'linear' or 'bn'; `dlassign.porting` has one conversion rule per kind.
      head: the classification layer, the one part that may be replaced for a new class count.
    """

    torch: str
    flax: tuple[str, ...]
    kind: str
    head: bool = False


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Everything about one architecture that code outside its module needs.

    Attributes:
      name: the config's `model.name`.
      module: the Flax module class, or a `functools.partial` of one fixing some fields.
      head: top-level module name of the classification head (replaced when porting to a new
        class count, trained at the full rate under `optimizer.backbone_lr_scale`).
      min_image_size: the smallest square input, or a function of the model's config fields.
      image_size: the only square input size the architecture takes, if it takes one only.
      torch_table: returns the torch name table; None where there is no torch counterpart.
      torchvision: the `torchvision.models` constructor name, where torchvision has one.
      torch_module: builds the torch twin (num_classes) where torchvision has none.
      why: what suits (or does not suit) the architecture to small digit crops such as SVHN's,
        quoted by `analysis.compare` when it wins a comparison.
    """

    name: str
    module: Callable[..., nn.Module]
    head: str = "head"
    min_image_size: int | Callable[[Mapping[str, Any]], int] = 1
    image_size: int | None = None
    torch_table: Callable[[], list[TorchEntry]] | None = None
    torchvision: str | None = None
    torch_module: Callable[[int], Any] | None = None
    why: str = ""

    @property
    def module_class(self) -> type[nn.Module]:
        m = self.module
        return m.func if isinstance(m, functools.partial) else m

    @property
    def fields(self) -> frozenset[str]:
        """The module's configurable fields (those a config's `model` block may set)."""
        fixed = set(self.module.keywords) if isinstance(self.module, functools.partial) else set()
        names = {f.name for f in dataclasses.fields(self.module_class)}
        return frozenset(names - {"parent", "name", "num_classes"} - fixed)

    def smallest_input(self, fields: Mapping[str, Any] | None = None) -> int:
        """The smallest square input side for a model with these config fields."""
        if callable(self.min_image_size):
            return self.min_image_size(fields or {})
        return self.min_image_size

    @property
    def portable(self) -> bool:
        """Whether torch weights can be ported into it (it has a torch name table)."""
        return self.torch_table is not None
