"""Evaluating a saved checkpoint: rebuild the run from the config stored with it, restore, score."""

from __future__ import annotations

import os

import ml_collections

from dlassign.errors import CheckpointError
from dlassign.report import confusion_matrix_png, per_class_table
from dlassign.runtime.checkpoint import Checkpointer
from dlassign.runtime.files import write_json
from dlassign.training.trainer import abstract_tree, compile_steps, evaluate, make_state, setup


def restore_run(workdir: str, step: int | None = None, overrides: dict | None = None,
                dataset=None):
    """Rebuilds the run of a training workdir and restores a checkpoint into it.

    Args:
      workdir: a directory written by `experiments.train`.
      step: the checkpoint step (None: the newest intact one).
      overrides: dotted config fields to change, e.g. {"data.data_dir": DIR} when the data moved.
      dataset: the in-memory `Dataset` the run trained on, when it was not loaded from the
        config's data section (None: load it from the config).

    Returns:
      (run, state, meta).
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{workdir!r} holds no checkpoints/ directory; expected a workdir "
                              "written by experiments.train")
    with Checkpointer(ckpt_dir) as ckpt:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {ckpt_dir}")
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
        run = setup(config, dataset)
        state = make_state(run)
        if first_meta.get("kind") == "variables":  # an experiments.port_weights output
            abstract = {k: v for k, v in abstract_tree(state).items()
                        if k in ("params", "batch_stats")}
            tree, meta = ckpt.restore(step or steps[-1], abstract)
        elif step is None:
            tree, meta = ckpt.restore_latest(abstract_tree(state), config.to_dict())
        else:
            tree, meta = ckpt.restore(step, abstract_tree(state))
    return run, state.replace(**tree), meta


def evaluate_checkpoint(workdir: str, step: int | None = None, overrides: dict | None = None
                        ) -> dict:
    """Scores the test split with a checkpoint; writes eval.json, eval_per_class.md and
    confusion_matrix.png into `workdir`."""
    run, state, meta = restore_run(workdir, step, overrides)
    _, eval_step = compile_steps(run, state)
    metrics = evaluate(state, run.dataset.test, eval_step, run.mesh, run.config.eval_batch_size,
                       run.dataset.num_classes)
    result = {"step": int(state.step), "model": run.config.model.name,
              "dataset": run.dataset.name, "test": metrics}
    write_json(os.path.join(workdir, "eval.json"), result)
    with open(os.path.join(workdir, "eval_per_class.md"), "w") as f:
        f.write(f"# {run.config.model.name} on {run.dataset.name}, step {int(state.step)}\n\n")
        f.write(per_class_table(metrics))
    confusion_matrix_png(metrics["confusion_matrix"], os.path.join(workdir,
                                                                   "confusion_matrix.png"),
                         f"{run.config.model.name}, test accuracy {metrics['accuracy']:.4f}")
    return result
