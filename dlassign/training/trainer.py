"""The training loop: `train_and_evaluate(config, workdir)`, resumable and sharded.

The loop is thin: batches are a pure function of (seed, step), the step is a pure jitted function,
and the state lives in Orbax checkpoints under `workdir/checkpoints`. A run started in a workdir
that holds checkpoints continues from the newest intact one and ends with the same parameters as a
run that was never interrupted.

With `data.validation_fraction` the run scores its held-out validation part every
`eval_every_steps` (default: each epoch) and, with `checkpoint_best`, checkpoints each of those
states and keeps the best one in `workdir/checkpoints` beside the newest. Every run writes
TensorBoard event files (`summaries`) and `curves.png` into its workdir. The loop runs its
periodic work as hooks (`hooks`): progress, validation, checkpointing, and those the caller
passes, such as curvature tracking.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from dlassign.data import Dataset, train_batches
from dlassign.errors import ConfigError
from dlassign.report import confusion_matrix_figure, training_curves_png
from dlassign.runtime import parallel
from dlassign.runtime.checkpoint import Checkpointer
from dlassign.runtime.files import write_json
from dlassign.runtime.workdir import WorkdirLock, check_workdir
from dlassign.training import hooks as hooks_lib
from dlassign.training import loop, summaries
from dlassign.training.compile_ahead import CompileAhead
from dlassign.training.evaluation import BEST_METRIC, evaluate
from dlassign.training.initial import initial_variables
from dlassign.training.optim import learning_rate_schedule
from dlassign.training.preflight import check_disk, check_memory
from dlassign.training.resume import restore
from dlassign.training.setup import Run, make_state, setup
from dlassign.training.train_state import TrainState


def _check_hooks(config, hooks: Sequence[hooks_lib.Hook]) -> None:
    """Curvature tracking is a hook its caller passes; a config that asks for it without one
    fails before anything runs.

    Raises:
      ConfigError: names curvature.every_steps and how to pass the hook.
    """
    every = config.get("curvature", {}).get("every_steps", 0)
    if every and not any(h.name == "curvature" for h in hooks):
        raise ConfigError(
            f"curvature.every_steps={every} asks for curvature during training, a hook the "
            "caller passes: train through experiments.train, or pass "
            "hooks=[CurvatureHook(config.curvature)] (hessian.tracking) to train_and_evaluate")


def _train(run: Run, state: TrainState, ckpt: Checkpointer, ahead: CompileAhead,
           board: summaries.Summaries, keep_best: bool,
           extra: Sequence[hooks_lib.Hook]) -> tuple[TrainState, dict]:
    """Resumes from `ckpt`'s newest intact checkpoint, if any, and trains to the last step
    with `ahead`'s compiled steps through `loop.run_steps`, running the hooks (progress, the
    caller's `extra`, validation, checkpointing) where they are due; an interrupt saves the
    finished steps first.

    Returns:
      (state, what the hooks recorded with the config changes and the steps per call chosen).
    """
    config = run.config
    state, meta, changes = restore(ckpt, state, config)
    waited = time.perf_counter()
    ahead.join()  # the steps' programs, compiled while the state was made and restored
    logging.info("train and eval steps compiled %.1f s after they started (%.1f s waited)",
                 time.perf_counter() - ahead.started, time.perf_counter() - waited)
    check_memory(run, ahead.memory)
    check_disk(state, os.path.dirname(ckpt.directory))
    logging.info("%s: %d parameters, %d train / %d test examples, %d steps (%d per epoch), "
                 "%d devices", config.model.name, parallel.tree_size(state.params),
                 len(run.dataset.train), len(run.dataset.test), run.total_steps,
                 run.steps_per_epoch, run.mesh.devices.size)

    start, total = int(state.step), run.total_steps
    board.open(start)
    # one small program for the logged learning rate, not one per operation of the schedule
    schedule = jax.jit(learning_rate_schedule(config.optimizer, total, run.steps_per_epoch))
    pacer = None

    def record() -> dict:
        out = {"config": config.to_dict(), "dataset": run.dataset.name,
               "image_shape": list(run.dataset.image_shape), "config_changes": changes,
               "pacing": pacer.record()}
        for hook in hooks:
            out.update(hook.record())
        return out

    progress = hooks_lib.Progress(config.get("log_every_steps", 100) or run.steps_per_epoch,
                                  schedule)
    eval_every = ((config.get("eval_every_steps", 0) or run.steps_per_epoch)
                  if run.dataset.validation is not None else 0)
    validation = hooks_lib.Validation(eval_every, ahead.eval_step)
    saving = hooks_lib.Checkpointing(
        ckpt, config.get("checkpoint_every_steps", 0) or run.steps_per_epoch, record, board.flush,
        scored=validation if keep_best else None)
    hooks = [progress, *extra, validation, saving]
    for hook in hooks:
        hook.begin(run, board, start, meta)
    pacer = loop.Pacer(start, total, hooks_lib.boundaries(hooks, total),
                       config.get("steps_per_call", 0),
                       config.get("max_call_seconds", float("inf")), meta.get("pacing"),
                       compile_several=ahead.several, agree=loop.slowest,
                       compile_seconds=loop.slowest(ahead.train_seconds))
    calls = loop.paced_calls(
        pacer, train_batches(run.dataset.train, config.batch_size, config.seed, start,
                             total - start),
        lambda slots: parallel.batch_sharding(run.mesh, int(slots > 1)))

    def on_sync(state, step, host):
        progress.add(host)
        for hook in hooks:
            if hook.due(step, total):
                hook(state, step)
        board.flush()
        progress.restart_clock(step)

    guard = loop.Guard(loop.leaf_names(state.params), learning_rate=schedule,
                       saved=saving.saved)
    try:
        state = loop.run_steps(ahead.train_step, state, calls, guard, pacer=pacer,
                               sync=hooks_lib.periodic(hooks), on_sync=on_sync)
    except loop.Interrupted as stop:
        saving.save_interrupted(stop.state)
        raise KeyboardInterrupt from None
    return state, record()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Dataset | None = None,
                       hooks: Sequence[hooks_lib.Hook] = ()) -> dict:
    """Trains (resuming from `workdir` when it holds checkpoints), evaluates the test split.

    Writes `workdir/results.json`: the config, test metrics (accuracy, precision_macro,
    recall_macro, f1_macro as fractions), a collapse check, parameter count, training time,
    the logged history, the validation history (with the best checkpoint's step when
    `checkpoint_best`) and each hook's entries (the curvature tracker's under `curvature`:
    step, top_eigenvalue, iterations, seconds, and the trace with `curvature.trace_samples`);
    TensorBoard event files (`summaries`: training scalars at each log step, validation and
    test metrics, the hooks' scalars, the test confusion matrix) and `curves.png` (loss and
    accuracy against steps).

    Args:
      config: a training config (see configs/).
      workdir: where checkpoints and results go.
      dataset: an already prepared dataset (tests and tuning pass one to skip loading).
      hooks: periodic hooks to run besides progress, validation and checkpointing
        (`hooks.Hook`; curvature tracking when `curvature.every_steps` is set).

    Returns:
      The results dict.
    """
    check_workdir(workdir)
    _check_hooks(config, hooks)
    run = setup(config, dataset)
    ahead = []  # the steps compile on background threads while the initialiser runs
    state = make_state(run, initial_variables(run),
                       before_init=lambda abstract: ahead.append(CompileAhead(run, abstract)))
    keep_best = config.get("checkpoint_best", False) and run.dataset.validation is not None
    # closed on success and on any failure: lets the checkpoints being written finish
    with WorkdirLock(workdir), Checkpointer(
            os.path.join(workdir, "checkpoints"), config.get("keep_checkpoints", 3),
            best=BEST_METRIC if keep_best else None) as ckpt, \
            summaries.Summaries(workdir, config) as board:
        state, record = _train(run, state, ckpt, ahead[0], board, keep_best, hooks)
        test = evaluate(state, run.dataset.test, ahead[0].eval_step, run.mesh,
                        config.eval_batch_size, run.dataset.num_classes)
        step = int(state.step)
        board.scalars(step, {k: test[k] for k in ("loss", "accuracy", "precision_macro",
                                                  "recall_macro", "f1_macro")}, "test")
        board.figure("confusion_matrix", lambda: confusion_matrix_figure(
            test["confusion_matrix"], f"{config.model.name}, step {step}, test accuracy "
            f"{test['accuracy']:.4f}"), step, "test")
        best = ckpt.best()
        if jax.process_index() == 0:
            training_curves_png(record["history"], record["validation"],
                                os.path.join(workdir, "curves.png"),
                                f"{config.model.name} on {run.dataset.name}")
    logging.info("test accuracy %.4f, macro F1 %.4f", test["accuracy"], test["f1_macro"])
    results = {
        "config": config.to_dict(),
        "model": config.model.name,
        "dataset": run.dataset.name,
        "num_params": parallel.tree_size(state.params),
        "num_devices": int(run.mesh.devices.size),
        "steps": step,
        "train_time_s": record["train_time_s"],
        "test": test,
        "prediction_collapse": test["collapse"],
        **{k: v for k, v in record.items() if k not in ("config", "dataset", "image_shape",
                                                          "train_time_s")},
    }
    if best is not None:
        results["best_checkpoint"] = {"step": best[0], "validation_accuracy": best[1]}
    write_json(os.path.join(workdir, "results.json"), results)
    return results
