"""The training loop: `train_and_evaluate(config, workdir)`, resumable and sharded.

The loop is thin: batches are a pure function of (seed, step), the step is a pure jitted function,
and the state lives in Orbax checkpoints under `workdir/checkpoints`. A run started in a workdir
that holds checkpoints continues from the newest intact one and ends with the same parameters as a
run that was never interrupted.

With `data.validation_fraction` the run scores its held-out validation part every
`eval_every_steps` (default: each epoch) and, with `checkpoint_best`, keeps the best of those
states in `workdir/best`. Every run writes TensorBoard event files (`summaries`) and `curves.png`
into its workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from dlassign.analysis.hessian import tracking
from dlassign.data import (
    Dataset,
    Split,
    eval_batches,
    hold_out_validation,
    prepare,
    steps_per_epoch,
    train_batches,
)
from dlassign.errors import CheckpointError, ConfigError
from dlassign.models import architecture, get_model, placement
from dlassign.report import confusion_matrix_figure, training_curves_png
from dlassign.runtime import parallel
from dlassign.runtime.checkpoint import (
    RUNTIME_FIELDS,
    Checkpointer,
    config_differences,
    load_variables,
)
from dlassign.runtime.files import write_json
from dlassign.runtime.workdir import WorkdirLock, check_workdir
from dlassign.training import loop, summaries
from dlassign.training.config_validation import validate_train_config
from dlassign.training.metrics import classification_metrics, prediction_collapse
from dlassign.training.optim import learning_rate_schedule, make_optimizer
from dlassign.training.steps import StepConfig, make_eval_step, make_train_step, stacked_or_single
from dlassign.training.train_state import (
    TrainState,
    create_train_state,
    init_compiler_options,
)

# Compute dtypes. float32 leaves Flax's promotion alone (so float64 parameters, for Hessians and
# parity checks, compute in float64); bfloat16 computes in bfloat16 with float32 parameters.
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
INPUT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model of `config.model` (its `name` plus the module's own fields)."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return get_model(config.model.name, num_classes=num_classes,
                     dtype=DTYPES[config.get("dtype", "float32")], **kwargs)


@dataclasses.dataclass
class Run:
    """Everything static about one training run."""

    config: ml_collections.ConfigDict
    dataset: Dataset
    model: object
    mesh: Mesh
    step_config: StepConfig
    steps_per_epoch: int
    total_steps: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.config.batch_size, *self.dataset.image_shape)


def setup(config: ml_collections.ConfigDict, dataset: Dataset | None = None) -> Run:
    """Validates the config, loads the data and builds the model and mesh; no compute yet."""
    validate_train_config(config, dataset.image_shape[0] if dataset else None)
    dataset = dataset or prepare(config.data, config.seed)
    if dataset.validation is None:  # a dataset passed in: hold the validation part out here
        dataset = hold_out_validation(dataset, config.data.get("validation_fraction", 0.0),
                                      config.seed)
    mesh_cfg = config.get("mesh", {})
    # placed for the platform of the devices the mesh is made of
    model, num_devices = placement(build_model(config, dataset.num_classes),
                                   parallel.requested_devices(mesh_cfg.get("num_devices", 0)),
                                   platform=jax.devices()[0].platform,
                                   impl=config.get("impl", "auto"),
                                   input_shape=(config.batch_size, *dataset.image_shape))
    if num_devices == 0:
        abstract = jax.eval_shape(lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *dataset.image_shape)), train=False))

        def step_flops():
            flops = parallel.forward_flops(lambda v, x: model.apply(v, x, train=False),
                                           abstract, (config.batch_size, *dataset.image_shape))
            return 3 * flops if flops else None  # forward + backward

        num_devices = parallel.auto_num_devices(
            parallel.tree_size(abstract["params"]),
            mesh_cfg.get("cpu_data_parallel_max_params", 1_000_000), step_flops,
            mesh_cfg.get("cpu_data_parallel_min_step_flops", 0.0))
    mesh = parallel.make_mesh(num_devices)
    parallel.check_divisible(config.batch_size, mesh, "batch_size")
    parallel.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
    spe = steps_per_epoch(len(dataset.train), config.batch_size)
    step_config = StepConfig(loss=config.loss, normalizer=dataset.normalizer,
                             random_crop=config.data.get("random_crop", 0),
                             dtype=INPUT_DTYPES[config.get("dtype", "float32")])
    return Run(config, dataset, model, mesh, step_config, spe, spe * config.num_epochs)


def make_tx(run: Run):
    return make_optimizer(run.config.optimizer, run.total_steps, run.steps_per_epoch,
                          architecture(run.config.model.name).head)


def make_state(run: Run, variables: dict | None = None, before_init=None) -> TrainState:
    """A fresh train state created directly with its shardings (no full copy on one device).

    `before_init`, when given, is called with the state's shapes, dtypes and shardings
    (`jax.ShapeDtypeStruct` leaves, the same static fields) before the initialiser compiles."""
    tx, rng = make_tx(run), jax.random.PRNGKey(run.config.seed)
    # the key is an argument, not a constant: one compiled program (and cache entry) per
    # architecture and shape, whatever the seed
    make = lambda v, key: create_train_state(run.model, tx, key, run.input_shape, v)
    abstract = jax.eval_shape(make, variables, rng)
    shardings = parallel.state_shardings(run.mesh, abstract, run.config.mesh.get("shard_params",
                                                                                False))
    if before_init is not None:
        before_init(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 abstract, shardings))
    return jax.jit(make, out_shardings=shardings,
                   compiler_options=init_compiler_options())(variables, rng)


def state_tree(state: TrainState) -> dict:
    """The checkpointed part of a state, as a plain dict."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def abstract_tree(state: TrainState) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state_tree(state))


def compile_steps(run: Run, state: TrainState):
    """jit-compiled train and eval steps with a donated state and explicit shardings.

    The train step takes one batch, or batches stacked on a leading axis and the number of them
    to run, for several steps in one call (`steps.stacked_or_single`; each form compiles on
    first use)."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(stacked_or_single(make_train_step(run.step_config)), donate_argnums=0,
                         out_shardings=(state_sharding, parallel.replicated(run.mesh)))
    eval_step = jax.jit(make_eval_step(run.step_config))
    return train_step, eval_step


def _abstract_batch(run: Run, rows: int, mask: bool = False, slots: int = 1) -> dict:
    """The shapes, dtypes and shardings of a training (or, with `mask`, evaluation) batch of
    `rows` rows, stacked `slots` deep for a training call of several steps."""
    per_call = 1 if mask else slots
    lead = (per_call,) if per_call > 1 else ()
    sharding = parallel.batch_sharding(run.mesh, int(per_call > 1))
    split = run.dataset.train
    spec = lambda shape, dtype: jax.ShapeDtypeStruct((*lead, *shape), dtype, sharding=sharding)
    batch = {"image": spec((rows, *run.dataset.image_shape), split.images.dtype),
             "label": spec((rows,), split.labels.dtype)}
    if mask:
        batch["mask"] = spec((rows,), np.bool_)
    return batch


class CompileAhead:
    """Compiles a run's train and eval steps on two background threads from the state's
    shapes (`make_state`'s `before_init`), while the initialiser compiles and runs and a
    checkpoint is read; XLA compiles without the GIL. The steps' first calls then find their
    programs compiled: the train step for the first calls' slots (one step each, or the
    config's fixed `steps_per_call`). `several(k)` compiles the train step for k steps per
    call when the run's `loop.Pacer` asks. The eval program's memory estimate is kept for
    `check_memory`."""

    def __init__(self, run: Run, abstract_state):
        self.train_step, self.eval_step = compile_steps(run, abstract_state)
        self.memory = None
        self.train_seconds = 0.0  # what compiling the first calls' train step took
        self._run, self._abstract_state = run, abstract_state
        eval_batch = _abstract_batch(run, run.config.eval_batch_size, mask=True)
        first_slots = run.config.get("steps_per_call", 0) or 1
        logging.info("compiling the train step (%d per call) and the eval step", first_slots)
        self.started = time.perf_counter()  # when the compiling began

        def train():
            self._compile_train(first_slots)

        def evaluate():
            self.memory = self.eval_step.lower(abstract_state, eval_batch).compile(
            ).memory_analysis()

        # not daemons: a run that fails before joining them exits after they finish, never
        # with XLA compiling while the interpreter shuts down
        self._threads = [threading.Thread(target=_quietly(f), name=f"compile-{f.__name__}")
                         for f in (train, evaluate)]
        for t in self._threads:
            t.start()

    def _compile_train(self, slots: int) -> None:
        started = time.perf_counter()
        batch = _abstract_batch(self._run, self._run.config.batch_size, slots=slots)
        self.train_step.lower(self._abstract_state, batch,
                              jax.ShapeDtypeStruct((), np.int32)).compile()
        self.train_seconds = time.perf_counter() - started

    def several(self, slots: int):
        """Compiles the train step for `slots` steps per call: on a started background thread
        (returned), or, in a run of several processes, before returning (so that every process
        plans the same calls; the returned thread has finished)."""
        thread = threading.Thread(target=_quietly(lambda: self._compile_train(slots)),
                                  name=f"compile-train-{slots}")
        thread.start()
        if jax.process_count() > 1:
            thread.join()
        return thread

    def join(self) -> None:
        for t in self._threads:
            t.join()


def _slowest(seconds: float) -> float:
    """The largest of every process's `seconds` (one process: `seconds`)."""
    if jax.process_count() == 1:
        return seconds
    from jax.experimental import multihost_utils

    return float(np.max(multihost_utils.process_allgather(np.float64(seconds))))


def _quietly(f):
    """`f` with its exceptions dropped: a program that fails to compile ahead is compiled
    (and its error raised) by its first call."""

    def run():
        try:
            f()
        except Exception:  # noqa: BLE001
            pass

    return run


def available_memory() -> int | None:
    """Bytes the first device can still allocate: the accelerator's free memory, or the host's
    MemAvailable on the CPU (None when unknown)."""
    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_disk(state: TrainState, workdir: str) -> None:
    """Fails before training, in one line, where the disk has no room for a checkpoint.

    Raises:
      ConfigError: names the workdir, with the sizes.
    """
    size = sum(x.nbytes for x in jax.tree.leaves(state_tree(state)))
    free = shutil.disk_usage(workdir).free
    if free < 2 * size:  # a save writes the new step before the oldest is dropped
        raise ConfigError(f"workdir {workdir!r} has {free / 2**20:.0f} MiB free; a checkpoint "
                          f"of this run takes {size / 2**20:.0f} MiB and a save needs room for "
                          "two")


def check_memory(run: Run, stats) -> None:
    """Fails in one line where an evaluation batch cannot fit in memory, by XLA's own estimate
    of the compiled eval program (`stats`: its `memory_analysis()`, None when unknown), or where
    a fixed `steps_per_call` stacks more batches than half the memory holds.

    Raises:
      ConfigError: names eval_batch_size or steps_per_call, with the sizes.
    """
    n = run.config.eval_batch_size
    have = available_memory()
    if stats is not None and have is not None:
        per_device = (stats.temp_size_in_bytes + stats.argument_size_in_bytes
                      + stats.output_size_in_bytes)
        need = per_device * (run.mesh.devices.size if jax.local_devices()[0].platform == "cpu"
                             else 1)  # CPU host devices share the host's memory
        if need > have:
            raise ConfigError(f"eval_batch_size={n} needs about {need / 2**30:.1f} GiB to "
                              f"evaluate, {have / 2**30:.1f} GiB are available; lower "
                              "eval_batch_size")
    k = min(run.config.get("steps_per_call", 0), run.total_steps)
    if have is not None and k > 1:
        images = run.dataset.train.images
        batch = run.config.batch_size * (images[0].nbytes + run.dataset.train.labels[0].nbytes)
        need = (loop.PREFETCH + 1) * k * batch  # the calls placed ahead and the one running
        if need > have / 2:
            raise ConfigError(f"steps_per_call={k} stacks batches of {k * batch / 2**20:.0f} MiB "
                              f"per call, {need / 2**30:.1f} GiB with the calls placed ahead; "
                              f"{have / 2**30:.1f} GiB are available; lower steps_per_call, or "
                              "0 to let the run choose")


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


def initial_variables(run: Run) -> dict | None:
    """Starting weights: `init_checkpoint`, or torchvision's `torchvision_weights`, or None.

    Raises:
      CheckpointError: the weights do not fit the configured model (names the first key).
    """
    config = run.config
    if config.get("init_checkpoint"):
        variables, meta = load_variables(config.init_checkpoint)
        source = f"init_checkpoint {config.init_checkpoint!r}"
        arch = meta.get("arch") or meta.get("config", {}).get("model", {}).get("name")
        if arch and arch != config.model.name:
            raise CheckpointError(f"{source} holds {arch!r} weights; this run's model is "
                                  f"{config.model.name!r}")
    elif config.get("torchvision_weights"):
        from dlassign.porting import torch_to_flax, torchvision_state_dict

        state_dict = torchvision_state_dict(config.model.name, config.torchvision_weights)
        variables = torch_to_flax(state_dict, config.model.name, run.dataset.num_classes,
                                  replace_head=True, rng=jax.random.PRNGKey(config.seed))
        source = f"torchvision {config.model.name} {config.torchvision_weights}"
    else:
        return None
    want = jax.eval_shape(lambda: run.model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *run.dataset.image_shape)), train=False))
    want = traverse_util.flatten_dict(dict(want))
    have = traverse_util.flatten_dict(variables)
    for key, spec in want.items():
        if key not in have:
            raise CheckpointError(f"{source} lacks {'/'.join(key)} that {config.model.name} "
                                  "needs")
        if tuple(np.shape(have[key])) != tuple(spec.shape):
            raise CheckpointError(f"{source}: {'/'.join(key)} has shape "
                                  f"{tuple(np.shape(have[key]))}, the model needs "
                                  f"{tuple(spec.shape)}")
    cast = lambda a, s: jnp.asarray(a, s.dtype)
    logging.info("starting from %s", source)
    return traverse_util.unflatten_dict({k: cast(have[k], want[k]) for k in want})


def _format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_meta(run: Run, history: list, train_time: float, changes: list[dict],
             validation: list | None = None, curvature: list | None = None,
             pacing: dict | None = None) -> dict:
    """The JSON meta saved with a checkpoint; `changes` are the config changes resumes made,
    `validation` the validation scores so far, `curvature` the curvature measured so far,
    `pacing` the steps per call chosen (`loop.Pacer.record`)."""
    return {"config": run.config.to_dict(), "history": history, "train_time_s": train_time,
            "dataset": run.dataset.name, "image_shape": list(run.dataset.image_shape),
            "config_changes": changes, "validation": list(validation or []),
            "curvature": list(curvature or []), "pacing": pacing}


# Config fields added after checkpoints were written, and the value a checkpoint written
# without one ran with.
ADDED_FIELDS = {"data": {"validation_fraction": 0.0}}


def _with_added_fields(saved: dict, added: dict = ADDED_FIELDS) -> dict:
    out = dict(saved)
    for key, value in added.items():
        if isinstance(value, dict):
            out[key] = _with_added_fields(out.get(key) or {}, value)
        else:
            out.setdefault(key, value)
    return out


def _resume_changes(config, meta: dict, directory: str) -> list[dict]:
    """The config changes a resumed run carries: those recorded before, plus this run's
    differences from the config the checkpoint was written with.

    Raises:
      CheckpointError: the training config differs and `continue_with_changes` is not set.
    """
    changes = list(meta.get("config_changes", []))
    diffs = config_differences(_with_added_fields(meta.get("config", {})), config.to_dict(),
                               fields=None, ignore=RUNTIME_FIELDS)
    if not diffs:
        return changes
    if not config.get("continue_with_changes", False):
        raise CheckpointError(
            f"{directory} holds a run started with another training config ({'; '.join(diffs)}). "
            "Use a new workdir, rerun with the config that wrote it, or pass "
            "--config.continue_with_changes=true to continue with the new values")
    logging.warning("continuing from step %d with changed config: %s", meta.get("step", 0),
                    "; ".join(diffs))
    return changes + [{"step": int(meta.get("step", 0)), "changes": diffs}]


def _train(run: Run, state: TrainState, ckpt: Checkpointer, ahead: CompileAhead,
           board: summaries.Summaries | None = None, best: Checkpointer | None = None):
    """Resumes from `ckpt`'s newest intact checkpoint, if any, and trains to the last step
    with `ahead`'s compiled steps through `loop.run_steps`, logging (to `board` too),
    validating and checkpointing as configured, the best validated state into `best`, and
    measuring the curvature at the multiples of `curvature.every_steps`
    (`tracking.CurvatureTracker`); an interrupt saves the finished steps first.

    Returns:
      (state, eval_step, history, train_time, config changes made by resumes, validation
      history, curvature history, the steps per call chosen: `loop.Pacer.record`).
    """
    config = run.config
    board = board or summaries.Summaries(None)
    history, train_time, changes, validation = [], 0.0, [], []
    curvature = []  # one entry per measurement (tracking.CurvatureTracker.measure)
    pacing = None  # the steps per call chosen by the run that wrote the checkpoint
    restored = ckpt.restore_latest(abstract_tree(state), config.to_dict())
    if restored is not None:
        tree, meta = restored
        changes = _resume_changes(config, meta, ckpt.directory)
        state = state.replace(**tree)
        history, train_time = meta.get("history", []), meta.get("train_time_s", 0.0)
        validation = meta.get("validation", [])
        curvature = tracking.resumed_entries(meta.get("curvature", []), int(state.step))
        pacing = meta.get("pacing")
        logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    train_step, eval_step = ahead.train_step, ahead.eval_step
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

    start = int(state.step)
    board.open(start)
    log_every = config.get("log_every_steps", 100) or run.steps_per_epoch
    ckpt_every = config.get("checkpoint_every_steps", 0) or run.steps_per_epoch
    eval_every = ((config.get("eval_every_steps", 0) or run.steps_per_epoch)
                  if run.dataset.validation is not None else 0)
    tracker = tracking.CurvatureTracker(config.get("curvature", {}), run.model, config.loss,
                                        run.dataset, run.mesh, config.seed,
                                        config.eval_batch_size)
    boundaries = [*range(log_every, run.total_steps, log_every),
                  *range(ckpt_every, run.total_steps, ckpt_every),
                  *(range(eval_every, run.total_steps, eval_every) if eval_every else ()),
                  *tracker.boundaries(run.total_steps)]
    newest_best = best.newest_meta() if best is not None else None
    best_accuracy = newest_best[1].get("validation_accuracy") if newest_best else None
    pacer = loop.Pacer(start, run.total_steps, boundaries, config.get("steps_per_call", 0),
                       config.get("max_call_seconds", float("inf")), pacing,
                       compile_several=ahead.several, agree=_slowest,
                       compile_seconds=_slowest(ahead.train_seconds))
    calls = loop.paced_calls(
        pacer, train_batches(run.dataset.train, config.batch_size, config.seed, start,
                             run.total_steps - start),
        lambda slots: parallel.batch_sharding(run.mesh, int(slots > 1)))
    clock = {"start": time.perf_counter(), "step": start}

    def on_sync(state, step, host):
        nonlocal train_time
        now = time.perf_counter()
        rate = (step - clock["step"]) / max(now - clock["start"], 1e-9)
        train_time += now - clock["start"]
        entry = {"step": step, "epoch": step / run.steps_per_epoch,
                 **{k: float(np.mean([m[k] for m in host]))
                    for k in ("loss", "accuracy", "grad_norm")}}
        history.append(entry)
        logging.info("step %d/%d epoch %.2f loss %.4f acc %.4f %.0f ex/s ETA %s", step,
                     run.total_steps, entry["epoch"], entry["loss"], entry["accuracy"],
                     rate * config.batch_size,
                     _format_eta((run.total_steps - step) / max(rate, 1e-9)))
        board.scalars(step, {**{k: entry[k] for k in ("loss", "accuracy", "grad_norm")},
                             "learning_rate": float(schedule(step - 1)),
                             "examples_per_second": rate * config.batch_size}, "train")
        if tracker.due(step):
            curvature.append(tracker.measure(state, step))
            board.scalars(step, tracking.board_scalars(curvature[-1]), "train", "curvature/")
        if eval_every and (step % eval_every == 0 or step == run.total_steps):
            validate(state, step)
        board.flush()  # everything up to a checkpoint is on disk before the checkpoint
        if step % ckpt_every == 0 or step == run.total_steps:
            ckpt.save(step, state_tree(state),
                      run_meta(run, history, train_time, changes, validation, curvature,
                               pacer.record()))
        clock.update(start=time.perf_counter(), step=step)

    def validate(state, step):
        nonlocal best_accuracy
        scores = validation_metrics(run, state, eval_step)
        validation.append({"step": step, "epoch": step / run.steps_per_epoch, **scores})
        board.scalars(step, scores, "validation")
        logging.info("step %d validation loss %.4f acc %.4f (%d examples)", step,
                     scores["loss"], scores["accuracy"], len(run.dataset.validation))
        if best is not None and (best_accuracy is None or scores["accuracy"] > best_accuracy) \
                and step not in best.steps():
            best_accuracy = scores["accuracy"]
            best.save(step, state_tree(state),
                      dict(run_meta(run, history, train_time, changes, validation, curvature,
                               pacer.record()),
                           validation_accuracy=best_accuracy))

    def saved() -> str:
        steps = ckpt.steps()
        return (f"the last checkpoint (step {steps[-1]}) in {ckpt.directory} is intact" if steps
                else "no checkpoint was written yet")

    # one small program for the logged learning rate, not one per operation of the schedule
    schedule = jax.jit(learning_rate_schedule(config.optimizer, run.total_steps,
                                              run.steps_per_epoch))
    guard = loop.Guard(loop.leaf_names(state.params), learning_rate=schedule, saved=saved)
    try:
        state = loop.run_steps(
            train_step, state, calls, guard, pacer=pacer,
            sync=lambda step: (step % log_every == 0 or step % ckpt_every == 0
                               or bool(eval_every) and step % eval_every == 0
                               or tracker.due(step)),
            on_sync=on_sync)
    except loop.Interrupted as stop:
        # Keep the finished steps: checkpoint the last good state before leaving.
        state = stop.state
        if int(state.step) > (ckpt.steps() or [0])[-1]:
            ckpt.save(int(state.step), state_tree(state),
                      run_meta(run, history, train_time, changes, validation, curvature,
                               pacer.record()))
            logging.warning("interrupted: saved step %d; rerun the same command to resume",
                            int(state.step))
        raise KeyboardInterrupt from None
    return (state, eval_step, history, train_time, changes, validation, curvature,
            pacer.record())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Dataset | None = None) -> dict:
    """Trains (resuming from `workdir` when it holds checkpoints), evaluates the test split.

    Writes `workdir/results.json`: the config, test metrics (accuracy, precision_macro,
    recall_macro, f1_macro as fractions), a collapse check, parameter count, training time,
    the logged history, the validation history (with the best checkpoint's step when
    `checkpoint_best`) and the curvature history (`curvature.every_steps`: step, top_eigenvalue,
    iterations, seconds, and the trace with `curvature.trace_samples`); TensorBoard event files
    (`summaries`: training scalars at each log step, validation and test metrics, curvature/
    scalars, the test confusion matrix) and `curves.png` (loss and accuracy against steps).

    Args:
      config: a training config (see configs/).
      workdir: where checkpoints and results go.
      dataset: an already prepared dataset (tests and tuning pass one to skip loading).

    Returns:
      The results dict.
    """
    check_workdir(workdir)
    run = setup(config, dataset)
    ahead = []  # the steps compile on background threads while the initialiser runs
    state = make_state(run, initial_variables(run),
                       before_init=lambda abstract: ahead.append(CompileAhead(run, abstract)))
    keep_best = config.get("checkpoint_best", False) and run.dataset.validation is not None
    # closed on success and on any failure: lets the checkpoints being written finish
    with WorkdirLock(workdir), Checkpointer(os.path.join(workdir, "checkpoints"),
                                            config.get("keep_checkpoints", 3)) as ckpt, \
            (Checkpointer(os.path.join(workdir, "best"), 1) if keep_best
             else contextlib.nullcontext()) as best, summaries.Summaries(workdir, config) as board:
        state, eval_step, history, train_time, changes, validation, curvature, pacing = _train(
            run, state, ckpt, ahead[0], board, best)
        test = evaluate(state, run.dataset.test, eval_step, run.mesh, config.eval_batch_size,
                        run.dataset.num_classes)
        step = int(state.step)
        board.scalars(step, {k: test[k] for k in ("loss", "accuracy", "precision_macro",
                                                  "recall_macro", "f1_macro")}, "test")
        board.figure("confusion_matrix", lambda: confusion_matrix_figure(
            test["confusion_matrix"], f"{config.model.name}, step {step}, test accuracy "
            f"{test['accuracy']:.4f}"), step, "test")
        newest_best = best.newest_meta() if keep_best else None
        if jax.process_index() == 0:
            training_curves_png(history, validation, os.path.join(workdir, "curves.png"),
                                f"{config.model.name} on {run.dataset.name}")
    n_params = parallel.tree_size(state.params)
    logging.info("test accuracy %.4f, macro F1 %.4f", test["accuracy"], test["f1_macro"])
    results = {
        "config": config.to_dict(),
        "model": config.model.name,
        "dataset": run.dataset.name,
        "num_params": n_params,
        "num_devices": int(run.mesh.devices.size),
        "steps": int(state.step),
        "train_time_s": train_time,
        "test": test,
        "prediction_collapse": test["collapse"],
        "history": history,
        "validation": validation,
        "curvature": curvature,
        "config_changes": changes,
        "pacing": pacing,
    }
    if newest_best is not None:
        results["best_checkpoint"] = {"step": newest_best[0], "validation_accuracy":
                                      newest_best[1].get("validation_accuracy")}
    write_json(os.path.join(workdir, "results.json"), results)
    return results
