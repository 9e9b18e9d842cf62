"""Ported weights as checkpoints: write them for training, verify them against torch, export.

What `experiments.port_weights` runs; `port` writes a checkpoint that a training config's
`init_checkpoint` starts from.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
from absl import logging

from dlassign.data import dataset_info
from dlassign.errors import PortingError
from dlassign.porting.convert import flax_to_torch, torch_to_flax
from dlassign.porting.io import write_state_dict
from dlassign.porting.torch_models import build
from dlassign.runtime.checkpoint import Checkpointer
from dlassign.runtime.workdir import WorkdirLock
from dlassign.training.evaluation import predict, restore_run
from dlassign.training.setup import compile_steps


def check_output(output: str, overwrite: bool) -> None:
    """Refuses an `output` that already holds checkpoints, unless `overwrite` and they are one
    earlier port's (step 0 alone: a training run's steps are never replaced).

    Raises:
      PortingError: names `output`, what it holds and what to do.
    """
    target = os.path.join(output, "checkpoints")
    held = sorted(os.listdir(target)) if os.path.isdir(target) else []
    if not held:
        return
    if held != ["0"]:
        raise PortingError(f"--output={output} holds other checkpoints ({', '.join(held)} in "
                           f"{target}), not a port's; choose a new or empty --output")
    if not overwrite:
        raise PortingError(f"--output={output} already holds ported weights; pass --overwrite "
                           "to replace them, or choose another --output")


def port(arch: str, state_dict: dict[str, np.ndarray], config, replace_head: bool, output: str,
         source: str, overwrite: bool = False) -> dict:
    """Converts `state_dict` for `config`'s dataset and writes it as a Flax checkpoint in
    `output/checkpoints` (step 0) that `init_checkpoint`, evaluate and export read.

    With `overwrite`, an earlier port in `output` is replaced once the new checkpoint is
    written whole (it is written beside it, then moved into place), so a failed port leaves
    the earlier one as it was.

    Returns:
      The variables written, {"params", "batch_stats"}.

    Raises:
      PortingError: `output` holds checkpoints that may not be replaced (`check_output`).
    """
    check_output(output, overwrite)
    num_classes = dataset_info(config.data.name).num_classes
    variables = torch_to_flax(state_dict, arch, num_classes, replace_head,
                              rng=jax.random.PRNGKey(config.seed))
    with config.unlocked():
        config.model.name = arch
    meta = {"kind": "variables", "arch": arch, "source": source, "num_classes": num_classes,
            "config": config.to_dict()}
    tree = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    target = os.path.join(output, "checkpoints")
    # the writer of `output`: holds it, and so tidies what an interrupted port left there
    with WorkdirLock(output):
        if not os.path.isdir(target) or not os.listdir(target):
            with Checkpointer(target) as ckpt:
                ckpt.save(0, tree, meta)
            return variables
        staging = tempfile.mkdtemp(prefix=".port-", dir=output)
        try:
            with Checkpointer(os.path.join(staging, "checkpoints")) as ckpt:
                ckpt.save(0, tree, meta)
            os.replace(target, os.path.join(staging, "replaced"))
            os.replace(os.path.join(staging, "checkpoints"), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return variables


def verify(arch: str, state_dict: dict[str, np.ndarray], output: str) -> dict:
    """Predictions of the torch model and of the ported checkpoint on the whole test split."""
    import torch

    run, state, _ = restore_run(output)
    _, eval_step = compile_steps(run, state)
    flax_preds, _ = predict(state, run.dataset.test, eval_step, run.mesh,
                            run.config.eval_batch_size)
    model = build(arch, run.dataset.num_classes)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    model.eval()
    norm = run.dataset.normalizer
    torch_preds = []
    with torch.no_grad():
        for i in range(0, len(run.dataset.test), 500):
            x = run.dataset.test.images[i:i + 500].astype(np.float32) / 255.0
            x = (x - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
            logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
            torch_preds.append(logits.argmax(1).numpy())
    torch_preds = np.concatenate(torch_preds)
    labels = run.dataset.test.labels
    return {"num_examples": int(labels.size),
            "agreement": float(np.mean(torch_preds == flax_preds)),
            "torch_accuracy": float(np.mean(torch_preds == labels)),
            "flax_accuracy": float(np.mean(flax_preds == labels))}


def export(workdir: str, arch: str | None, path: str) -> None:
    """Writes the newest weights of a training or `port` directory as a torch state dict."""
    run, state, _ = restore_run(workdir)
    write_state_dict(flax_to_torch(state.variables, arch or run.config.model.name), path)
    logging.info("wrote %s", path)
