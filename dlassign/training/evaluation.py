"""Scoring a state on a split (`predict`, `evaluate`, `validation_metrics`), and a saved
checkpoint: rebuild the run from the config stored with it, restore, score."""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dlassign.data import Split, eval_batches
from dlassign.errors import CheckpointError, ConfigError, one_of
from dlassign.report import confusion_matrix_png, per_class_table
from dlassign.runtime import parallel
from dlassign.runtime.checkpoint import Checkpointer
from dlassign.runtime.files import write_json, write_text
from dlassign.training import loop
from dlassign.training.metrics import classification_metrics, prediction_collapse
from dlassign.training.setup import (
    Run,
    abstract_state,
    abstract_tree,
    compile_steps,
    make_state,
    setup,
)
from dlassign.training.train_state import TrainState


def predict(state: TrainState, split: Split, eval_step, mesh: Mesh, batch_size: int
            ) -> tuple[np.ndarray, float]:
    """Predictions for every example of `split` (padded, masked last batch) and the mean loss."""
    preds, loss_sum, count = [], 0.0, 0
    for batch in loop.prefetch(eval_batches(split, batch_size), parallel.batch_sharding(mesh)):
        out = parallel.to_host(eval_step(state, batch))
        mask = parallel.to_host(batch["mask"])
        preds.append(out["pred"][mask])
        loss_sum += float(out["loss_sum"])
        count += int(out["count"])
    return np.concatenate(preds), loss_sum / max(count, 1)


def evaluate(state: TrainState, split: Split, eval_step, mesh: Mesh, batch_size: int,
             num_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1, loss, and a collapse check over a whole split."""
    preds, loss = predict(state, split, eval_step, mesh, batch_size)
    metrics = classification_metrics(split.labels, preds, num_classes)
    metrics["loss"] = loss
    metrics["collapse"] = prediction_collapse(preds, num_classes)
    metrics["confusion_matrix"] = np.bincount(
        split.labels.astype(np.int64) * num_classes + preds,
        minlength=num_classes**2).reshape(num_classes, num_classes).tolist()
    if metrics["collapse"]["collapsed"]:
        c = metrics["collapse"]
        logging.warning("PREDICTIONS COLLAPSED: %.1f%% of %d predictions fall in classes %s; "
                        "the model is not separating the classes", 100 * c["share"], len(preds),
                        c["top_classes"])
    return metrics


def validation_metrics(run: Run, state: TrainState, eval_step) -> dict:
    """Loss, accuracy and macro F1 over the whole validation split (padded, masked batches)."""
    split = run.dataset.validation
    preds, loss = predict(state, split, eval_step, run.mesh, run.config.eval_batch_size)
    metrics = classification_metrics(split.labels, preds, run.dataset.num_classes)
    return {"loss": loss, "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"]}


WHICH = ("latest", "best")  # a training workdir's newest checkpoint, or its best scored one
BEST_METRIC = "validation_accuracy"  # what `checkpoint_best` ranks the checkpoints by


def _fit_mesh_to_this_machine(config) -> None:
    """Checkpoints restore on any devices: a mesh size the run used that this machine (or
    this set of processes) cannot form is left open instead."""
    mesh = config.get("mesh")
    wanted = mesh.get("num_devices", 0) if mesh is not None else 0
    have = jax.device_count()
    feasible = wanted in (0, have) if jax.process_count() > 1 else wanted <= have
    if not feasible:
        logging.info("the run used mesh.num_devices=%d; %d devices here: using all of them",
                     wanted, have)
        mesh.num_devices = 0


def restore_run(workdir: str, step: int | None = None, overrides: dict | None = None,
                dataset=None, which: str = "latest"):
    """Rebuilds the run of a training workdir and restores a checkpoint into it.

    Args:
      workdir: a directory written by `experiments.train`.
      step: the checkpoint step (None: the newest intact one).
      overrides: dotted config fields to change, e.g. {"data.data_dir": DIR} when the data moved.
      dataset: the in-memory `Dataset` the run trained on, when it was not loaded from the
        config's data section (None: load it from the config).
      which: 'latest' (the newest intact checkpoint, or `step`) or 'best' (the one with the
        highest validation accuracy, kept by a run with `checkpoint_best`).

    Returns:
      (run, state, meta).
    """
    if which not in WHICH:
        raise one_of("which", which, WHICH)
    if which == "best" and step is not None:
        raise ConfigError(f"which='best' with step={step}: the best checkpoint is one step; "
                          "give either")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{workdir!r} holds no checkpoints/ directory; expected a workdir "
                              "written by experiments.train")
    with Checkpointer(ckpt_dir, best=BEST_METRIC if which == "best" else None) as ckpt:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {ckpt_dir}")
        if which == "best":
            best = ckpt.best()
            if best is None:
                raise CheckpointError(
                    f"no checkpoint in {ckpt_dir} was scored on a validation split; a run keeps "
                    "its best checkpoint with --config.checkpoint_best=true and a "
                    "data.validation_fraction above 0")
            step = best[0]
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {ckpt_dir}; steps "
                                  f"present: {', '.join(map(str, steps))}")
        if step is None:
            newest = ckpt.newest_meta()
            if newest is None:
                raise CheckpointError(f"no checkpoint in {ckpt_dir} has readable metadata")
            first_meta = newest[1]
        else:
            first_meta = ckpt.read_meta(step)
        config = ml_collections.ConfigDict(first_meta["config"])
        if overrides:
            config.update_from_flattened_dict(overrides)
        _fit_mesh_to_this_machine(config)
        run = setup(config, dataset)
        if first_meta.get("kind") == "variables":  # an experiments.port_weights output:
            state = make_state(run)  # weights only, the rest of the state starts fresh
            abstract = {k: v for k, v in abstract_tree(state).items()
                        if k in ("params", "batch_stats")}
            tree, meta = ckpt.restore(step or steps[-1], abstract)
        else:  # the whole state is restored: into its shapes and shardings, no initialiser
            state = abstract_state(run)
            if step is None:
                tree, meta = ckpt.restore_latest(abstract_tree(state), config.to_dict())
            else:
                tree, meta = ckpt.restore(step, abstract_tree(state))
    return run, state.replace(**tree), meta


def evaluate_checkpoint(workdir: str, step: int | None = None, overrides: dict | None = None,
                        which: str = "latest") -> dict:
    """Scores the test split with a checkpoint; writes eval.json, eval_per_class.md and
    confusion_matrix.png into `workdir` (eval_best.json, eval_best_per_class.md and
    confusion_matrix_best.png for `which='best'`, the best checkpoint by validation
    accuracy)."""
    run, state, meta = restore_run(workdir, step, overrides, which=which)
    tail = "" if which == "latest" else f"_{which}"
    _, eval_step = compile_steps(run, state)
    metrics = evaluate(state, run.dataset.test, eval_step, run.mesh, run.config.eval_batch_size,
                       run.dataset.num_classes)
    result = {"step": int(state.step), "which": which, "model": run.config.model.name,
              "dataset": run.dataset.name, "test": metrics}
    if "validation_accuracy" in meta:
        result["validation_accuracy"] = meta["validation_accuracy"]
    write_json(os.path.join(workdir, f"eval{tail}.json"), result)
    write_text(os.path.join(workdir, f"eval{tail}_per_class.md"),
               f"# {run.config.model.name} on {run.dataset.name}, step {int(state.step)}"
               f"{' (best by validation accuracy)' if which == 'best' else ''}\n\n"
               + per_class_table(metrics))
    confusion_matrix_png(metrics["confusion_matrix"],
                         os.path.join(workdir, f"confusion_matrix{tail}.png"),
                         f"{run.config.model.name}, test accuracy {metrics['accuracy']:.4f}")
    return result
