"""Reading and writing torch state dicts: `.pth` through torch, `.safetensors` without it."""

from __future__ import annotations

import os

import numpy as np

from dlassign.errors import PortingError
from dlassign.models import architecture, architectures


def _import_torch():
    try:
        import torch
    except ImportError:
        raise PortingError("reading .pth checkpoints needs PyTorch: pip install "
                           "'dlassign[torch]' (or convert the file to .safetensors)") from None
    return torch


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def unwrap_state_dict(obj) -> dict[str, np.ndarray]:
    """Accepts a bare state dict or one under 'state_dict' / 'model'; strips 'module.'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise PortingError(f"expected a state dict (names to tensors), found {type(obj).__name__}")
    out = {}
    for name, value in obj.items():
        if not hasattr(value, "shape"):
            raise PortingError(f"state dict entry {name!r} is a {type(value).__name__}, "
                               "not a tensor")
        out[name[len("module."):] if name.startswith("module.") else name] = _to_numpy(value)
    return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a `.pth`/`.pt` (torch.load, weights only) or `.safetensors` file."""
    if not os.path.isfile(path):
        raise PortingError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise PortingError(f"{path} is not a safetensors file: {e}") from None
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PortingError(f"{path} is not a PyTorch checkpoint (torch.load failed: "
                           f"{first[:200]})") from None
    return unwrap_state_dict(obj)


def write_state_dict(state_dict: dict[str, np.ndarray], path: str) -> None:
    """Writes `.safetensors` (no torch needed) or `.pth` (through torch)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
        return
    torch = _import_torch()
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
               path)


def torchvision_state_dict(arch: str, weights: str) -> dict[str, np.ndarray]:
    """Downloads torchvision's pretrained weights (e.g. 'IMAGENET1K_V1'); needs internet."""
    name = architecture(arch).torchvision
    if name is None:
        with_weights = ", ".join(n for n, a in architectures().items() if a.torchvision)
        raise PortingError(f"torchvision has no pretrained {arch!r}; architectures with "
                           f"weights: {with_weights}")
    _import_torch()
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        valid = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
        raise PortingError(f"unknown torchvision weights {weights!r} for {name}; expected one "
                           f"of {valid}") from None
    try:
        model = torchvision.models.get_model(name, weights=enum)
    except Exception as e:  # URLError and friends when offline
        raise PortingError(f"could not download torchvision weights {name} {weights} "
                           f"({type(e).__name__}: {str(e)[:200]}); without internet, pass a "
                           "local file with --torch_checkpoint") from None
    return unwrap_state_dict(model.state_dict())
