"""Shared pieces: the models under test in both frameworks, timing, and the JAX set-up."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (input shape HWC, dlassign model config) of the models under test that are not a registered
# architecture at its question-4 input, or that fix some of its fields.
MNIST = (28, 28, 1)
VARIANTS = {
    "mlp": (MNIST, {"name": "mlp", "hidden_sizes": (1024, 1024)}),
    "mlp128": (MNIST, {"name": "mlp", "hidden_sizes": (128,)}),
    "mlp_dropout": (MNIST, {"name": "mlp", "hidden_sizes": (1024, 1024), "dropout": 0.2}),
    "cnn": (MNIST, {"name": "cnn", "dropout": 0.3}),
}


def registered() -> list[str]:
    """Every registered architecture's name."""
    from dlassign.models import architectures

    return sorted(architectures())


def question4(name: str) -> bool:
    """Whether `name` is a question-4 architecture (torch weights, SVHN-sized input)."""
    from dlassign.models import architecture

    return name not in VARIANTS and architecture(name).portable


def model_spec(name: str) -> tuple[tuple[int, int, int], dict]:
    """(input shape HWC, model config) of a variant, or of a registered architecture at the
    input its question-4 config gives it (configs/svhn.py: 32 px, AlexNet 64)."""
    if name in VARIANTS:
        return VARIANTS[name]
    if not question4(name):
        return MNIST, {"name": name}
    from configs import svhn

    size = svhn.get_config(name).data.image_size or svhn.SVHN_SIZE
    return (size, size, 3), {"name": name}


def parse(description: str, extra=None,
          models: str = "mlp,mlp_dropout,mlp128,cnn,lenet5,resnet18",
          steps: tuple[int, str] = (10, "steps per round")) -> argparse.Namespace:
    """The shared flags; `models` is the default of --models, `steps` the default and help of
    --steps."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--models", default=models)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--steps", type=int, default=steps[0], help=steps[1])
    p.add_argument("--cpu_devices", type=int, default=0, help="0: one per core")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--image_size", type=int, default=0,
                   help="input size for the ImageNet-style models (0: their default 32)")
    if extra:
        extra(p)
    return p.parse_args()


def add_steps_per_call(p: argparse.ArgumentParser) -> None:
    """--steps_per_call: ours runs that many steps per jitted call, as the training loop does."""
    from configs import base

    p.add_argument("--steps_per_call", type=int, default=base.get_config().steps_per_call,
                   help="our steps per jitted call (default: the config's)")


def start_jax(cpu_devices: int):
    """JAX with one CPU host device per core (or `cpu_devices`), as the entry points do."""
    from dlassign.runtime.parallel import configure_cpu_devices

    configure_cpu_devices(cpu_devices)
    import jax

    return jax


def median_rate(samples: list[float]) -> float:
    return statistics.median(samples)


def timed(run_steps, steps: int) -> float:
    """Seconds taken by run_steps(steps), which must block until its work is done."""
    t = time.perf_counter()
    run_steps(steps)
    return time.perf_counter() - t


def input_shape(name: str, image_size: int = 0) -> tuple[int, int, int]:
    shape = model_spec(name)[0]
    if image_size and shape[-1] == 3:
        return (image_size, image_size, 3)
    return shape


def torch_device(torch):
    """CUDA when PyTorch sees a GPU, with TF32 allowed as JAX's default float32 precision does."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def torch_sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_model(name: str, num_classes: int = 10):
    """The PyTorch twin of MODELS[name]."""
    import torch
    from torch import nn

    if name == "mlp128":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(),
                             nn.Linear(128, num_classes))
    if name in ("mlp", "mlp_dropout"):
        rate = 0.2 if name == "mlp_dropout" else 0.0
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Dropout(rate),
                             nn.Linear(1024, 1024), nn.ReLU(), nn.Dropout(rate),
                             nn.Linear(1024, num_classes))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(1600, 128), nn.ReLU(), nn.Dropout(0.3),
                             nn.Linear(128, num_classes))
    from dlassign.porting.torch_models import build

    del torch
    return build(name, num_classes)


def report(rows: list[dict], columns: list[tuple[str, str, str]], path: str = "") -> None:
    """Prints rows as a markdown table of (header, key, format) columns, None as an empty cell;
    optionally writes them as JSON."""
    print("| " + " | ".join(h for h, _, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        print("| " + " | ".join("" if r.get(k) is None else fmt.format(r[k])
                                for _, k, fmt in columns) + " |")
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2, allow_nan=False)
