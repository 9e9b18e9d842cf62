"""The torch model of an architecture, for parity checks and the PyTorch baselines."""

from __future__ import annotations

from dlassign.models import architecture


def build(arch: str, num_classes: int = 10):
    """A randomly initialised torch model of `arch`: torchvision's constructor, or the torch twin
    the architecture declares where torchvision has none (needs the torch extra)."""
    spec = architecture(arch)
    if spec.torch_module is not None:
        return spec.torch_module(num_classes)
    if spec.torchvision is None:
        raise ValueError(f"architecture {arch!r} has no torch counterpart")
    import torchvision

    return torchvision.models.get_model(spec.torchvision, weights=None, num_classes=num_classes)
