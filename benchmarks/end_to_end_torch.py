"""A plain PyTorch script of the training `python -m experiments.train` runs on MNIST: the other
side of `benchmarks/end_to_end.py`, which passes every setting from our config.

  python benchmarks/end_to_end_torch.py --model=cnn --data_dir=PATH/TO/MNIST --workdir=runs/t \
      --num_epochs=2 --optimizer=adamw --learning_rate=0.002 --weight_decay=1e-4 \
      --schedule=cosine --dropout=0.3 --random_crop=2

Deliberately imports nothing but PyTorch, NumPy and the standard library (no dlassign, no JAX),
as a user's own script would. The same training as ours: the network (PyTorch's default
initialisation), the optimizer and its per-step schedule, batches from the same seeded
permutation per epoch (last partial batch dropped), pixels scaled to [0, 1], random shifts of up
to `--random_crop` pixels (edge padding, one offset per image), the loss logged every
`--log_every_steps` steps, a checkpoint each epoch, and the test split evaluated at the end
(accuracy, macro F1) into WORKDIR/results.json. On a CUDA GPU when PyTorch sees one (the data
placed on it once, TF32 allowed as JAX's default float32 precision does), else on the CPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STEMS = {"train": "train", "test": "t10k"}


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format, gzipped or not) as uint8."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    found = {}
    for kind, suffix in (("images", "idx3"), ("labels", "idx1")):
        name = f"{STEMS[split]}-{kind}-{suffix}-ubyte"
        path = next(p for p in (os.path.join(data_dir, name + e) for e in (".gz", ""))
                    if os.path.isfile(p))
        found[kind] = read_idx(path)
    return found["images"], found["labels"].astype(np.int64)


def build(name: str, dropout: float, channels: int, num_classes: int = 10) -> nn.Module:
    if name == "mlp":
        layers, width = [nn.Flatten()], 28 * 28 * channels
        for hidden in (1024, 1024):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            layers += [nn.Dropout(dropout)] if dropout else []
            width = hidden
        return nn.Sequential(*layers, nn.Linear(width, num_classes))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Dropout(dropout),
                             nn.Linear(128, num_classes))
    if name == "lenet5":
        return nn.Sequential(nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84),
                             nn.ReLU(), nn.Linear(84, num_classes))
    raise ValueError(f"unknown model {name!r}")


def shift(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of x [B, C, H, W] moved by up to `pad` pixels: edge padding, a random crop."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate").permute(0, 2, 3, 1)
    offsets = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    offsets = offsets.to(x.device)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)
    index = torch.arange(b, device=x.device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]].permute(
        0, 3, 1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn", "lenet5"], required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_epochs", type=int, default=2)
    p.add_argument("--subset_fraction", type=float, default=1.0)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--eval_batch_size", type=int, default=1000)
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adamw")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["constant", "cosine"], default="cosine")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--random_crop", type=int, default=0)
    p.add_argument("--pad_to", type=int, default=0)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--log_every_steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    def tensor(images: np.ndarray) -> torch.Tensor:
        """uint8 [N, 28, 28] -> uint8 [N, C, H, W], padded as configured."""
        x = images[:, None]
        if args.pad_to:
            lo = (args.pad_to - x.shape[-1]) // 2
            hi = args.pad_to - x.shape[-1] - lo
            x = np.pad(x, ((0, 0), (0, 0), (lo, hi), (lo, hi)))
        return torch.from_numpy(np.repeat(x, args.channels, axis=1))

    train_x, train_y = load(args.data_dir, "train")
    if args.subset_fraction < 1.0:  # the same share of every class
        rng = np.random.default_rng(args.seed)
        keep = [rng.permutation(np.flatnonzero(train_y == c))[
            :max(1, round(args.subset_fraction * np.sum(train_y == c)))] for c in range(10)]
        keep = np.sort(np.concatenate(keep))
        train_x, train_y = train_x[keep], train_y[keep]
    test_x, test_y = load(args.data_dir, "test")
    train_x, test_x = tensor(train_x).to(device), tensor(test_x).to(device)
    train_y = torch.from_numpy(train_y).to(device)

    model = build(args.model, args.dropout, args.channels).to(device)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), args.learning_rate, momentum=args.momentum,
                              weight_decay=args.weight_decay)
    elif args.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), args.learning_rate)
    else:
        opt = torch.optim.AdamW(model.parameters(), args.learning_rate,
                                weight_decay=args.weight_decay)
    steps_per_epoch = len(train_y) // args.batch_size
    total = steps_per_epoch * args.num_epochs
    decay = ((lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
             if args.schedule == "cosine" else (lambda s: 1.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, decay)

    start, step = time.perf_counter(), 0
    for epoch in range(args.num_epochs):
        model.train()
        order = torch.from_numpy(np.random.default_rng([args.seed, epoch]).permutation(
            len(train_y))).to(device)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x = train_x[idx].float() / 255.0
            if args.random_crop:
                x = shift(x, args.random_crop, generator)
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            if args.log_every_steps and step % args.log_every_steps == 0:
                print(f"step {step}/{total} loss {loss.item():.4f}", flush=True)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                   os.path.join(args.workdir, "checkpoint.pt"))
    train_time = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(test_x[i:i + args.eval_batch_size].float() / 255.0).argmax(1)
                           for i in range(0, len(test_x), args.eval_batch_size)]).cpu().numpy()
    confusion = np.bincount(test_y * 10 + preds, minlength=100).reshape(10, 10)
    tp = np.diag(confusion).astype(np.float64)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(10), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(10), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(10),
                   where=precision + recall > 0)
    results = {"test": {"accuracy": float(np.mean(preds == test_y)),
                        "f1_macro": float(f1.mean())},
               "steps": step, "train_time_s": train_time}
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, allow_nan=False)
    print(f"test accuracy {results['test']['accuracy']:.4f} f1 {results['test']['f1_macro']:.4f}")


if __name__ == "__main__":
    main()
