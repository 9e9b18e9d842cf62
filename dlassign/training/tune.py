"""Grid search with stratified k-fold cross-validation.

Every cell trains its k folds through the training loop's runner (`loop.run_steps`), either as
one vmapped program (a [K, ...] stack of states and [K, B, ...] batches, which fills an
accelerator) or one fold after another (faster on a CPU, whose cores one fold already keeps
busy; docs/performance.md). Fold training sets differ in size by at most a few examples; every
fold takes `min_k |train_k| // B` steps per epoch from its own seeded permutation, so the folds
see equally many examples, and both modes give the same numbers.

Normalisation statistics ('standardize') come from the whole training split, not each fold's
training part; with 'scale' (the MNIST configs) there are no statistics to leak. `tune.mode`
chooses vmapped or sequential folds (see `sequential_folds`).

Each cell's folds write TensorBoard runs, `WORKDIR/cells/NN_<values>/fold<k>/{train,validation}`:
the training curves (from the metrics the runner brings back at the end, so no extra sync), the
fold's validation score, and the cell's config as hyperparameters for TensorBoard's hparams view
(`cell_hparams`: the grid's values numeric where they are numbers).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dlassign.data import Dataset, Split, prepare, stratified_kfold
from dlassign.data.batching import epoch_permutation
from dlassign.errors import DlassignError, one_of
from dlassign.runtime import parallel
from dlassign.runtime.files import write_json, write_text
from dlassign.runtime.workdir import WorkdirLock, check_workdir
from dlassign.training import loop, summaries
from dlassign.training.config_validation import flatten_grid, validate_tune_config
from dlassign.training.evaluation import predict
from dlassign.training.optim import learning_rate_schedule
from dlassign.training.setup import Run, make_tx, setup
from dlassign.training.steps import make_eval_step, make_train_step, stacked_or_single
from dlassign.training.train_state import (
    TrainState,
    create_train_state,
    init_compiler_options,
    init_variables,
)
from dlassign.training.trainer import train_and_evaluate


def grid_cells(grid) -> list[dict[str, object]]:
    """Every combination of the grid: [{'model.dense_width': 32, 'model.activation': 'relu'}...]."""
    axes = flatten_grid(grid)
    return [dict(zip([p for p, _ in axes], combo))
            for combo in itertools.product(*[v for _, v in axes])]


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict
                    ) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-path fields replaced."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for path, value in overrides.items():
            node = config
            *parents, leaf = path.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def _fold_steps_per_epoch(fold_indices: list[np.ndarray], batch_size: int) -> int:
    """Every fold takes as many steps per epoch as the smallest fold's training set fills."""
    return min(len(ix) for ix in fold_indices) // batch_size


def _fold_batches(train: Split, indices: np.ndarray, fold: int, steps: int, batch_size: int,
                  seed: int, num_epochs: int) -> Iterator[dict]:
    """[B, ...] batches of one fold; its epoch e is permutation (seed, 1000 * (fold + 1) + e)."""
    for epoch in range(num_epochs):
        perm = indices[epoch_permutation(len(indices), seed, 1000 * (fold + 1) + epoch)]
        for i in range(steps):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            yield {"image": train.images[idx], "label": train.labels[idx]}


def _stacked_folds(per_fold: list[Iterator[dict]]) -> Iterator[dict]:
    """[K, B, ...] batches: the folds' batches of each step, stacked."""
    for group in zip(*per_fold):
        yield {k: np.stack([b[k] for b in group]) for k in group[0]}


def _padded_folds(train: Split, val_indices: list[np.ndarray], batch_size: int):
    """[K, B, ...] evaluation batches over every fold's validation set, padded and masked."""
    longest = max(len(ix) for ix in val_indices)
    total = -(-longest // batch_size) * batch_size
    idx = np.zeros((len(val_indices), total), np.int64)
    mask = np.zeros((len(val_indices), total), bool)
    for k, ix in enumerate(val_indices):
        idx[k, :len(ix)], mask[k, :len(ix)] = ix, True
    for s in range(0, total, batch_size):
        sl = idx[:, s:s + batch_size]
        yield {"image": train.images[sl], "label": train.labels[sl],
               "mask": mask[:, s:s + batch_size]}


def cell_hparams(grid, overrides: dict) -> dict:
    """A cell's grid values as TensorBoard hyperparameters: a grid axis whose every value is a
    sequence of one number (a width `(32,)`) gives that number, so that the hparams view sorts
    and plots it; every other value as it is (`summaries.hparams_of` writes a sequence as text)."""
    one_number = lambda v: (isinstance(v, (list, tuple)) and len(v) == 1
                            and isinstance(v[0], (int, float)) and not isinstance(v[0], bool))
    scalar = {path for path, values in flatten_grid(grid)
              if isinstance(values, list) and all(one_number(v) for v in values)}
    return {path: value[0] if path in scalar else value for path, value in overrides.items()}


def cell_name(index: int, overrides: dict) -> str:
    """The folder of a grid cell's TensorBoard runs: its index and values, e.g.
    '03_dense_width=64,activation=tanh'."""
    value = lambda v: "x".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    name = ",".join(f"{path.split('.')[-1]}={value(v)}" for path, v in overrides.items())
    return f"{index:02d}_" + re.sub(r"[^A-Za-z0-9._=,+-]", "", name)[:80]


STEP_METRICS = ("loss", "accuracy", "grad_norm")

class SharedPrograms:
    """The compiled steps of one grid search: made by `tune()` for its cells, dropped with it.

    Cells whose models have the same parameter structure form a group with one train and one
    eval program, the cell's model chosen inside by an index argument (`lax.switch` over the
    group's distinct models): cells that differ in an activation, and in a width where padding
    is exact (`_Padding`): a narrower cell runs in its model's widest variant, its variables
    zero-padded to the widest shapes and the padding masked to zero in every forward pass, so
    padded units add nothing and get no gradient (and stay zero: the optimizers are
    elementwise, clipped by a global norm, which zeros leave alone). Before a narrower cell
    joins, its own model and the padded one are compared on a random probe batch in inference
    and training mode; a cell they disagree on (a width that moves a flattened layout or a
    normalisation's groups, a dropout mask drawn over the padded shape) keeps programs of its
    own shapes. Compiling once per group instead of once per cell is most of a short cell's
    cold time; the shared steps run somewhat slower than a cell's own (docs/performance.md),
    which pays for cells of seconds, as in the main job's grids, not for cells that train for
    minutes. A cell's initial state is its own model's (padded), compiled once per distinct
    program.
    """

    def __init__(self, runs: Sequence[Run], sequential: bool, share: bool = True):
        abstract = [_abstract_variables(run) for run in runs]
        families: dict[tuple, list[int]] = {}
        for i, run in enumerate(runs):  # share=False: a group per cell
            families.setdefault(_family_key(run, abstract[i]) if share else (i,), []).append(i)
        self._cells: dict[int, tuple[_Group, int]] = {}
        self._compiled_inits: dict[tuple, object] = {}
        self.groups: list[list[int]] = []  # the runs that share programs, by index
        for family in families.values():
            for members, group in _by_width([runs[i] for i in family],
                                            [abstract[i] for i in family],
                                            sequential, self._compiled_inits):
                self._cells.update({family[j]: (group, k) for k, j in enumerate(members)})
                self.groups.append([family[j] for j in members])

    def cell(self, i: int) -> CellPrograms:
        """The programs of `runs[i]`."""
        group, j = self._cells[i]
        return group.cell(j)


def _abstract_variables(run: Run):
    """The shapes and dtypes of `run`'s model variables (an abstract trace, no compute)."""
    return jax.eval_shape(lambda rng: init_variables(run.model, rng, (1, *run.input_shape[1:])),
                          jax.random.PRNGKey(0))


def _shapes(abstract) -> tuple:
    return tuple(a.shape for a in jax.tree.leaves(abstract))


def _family_key(run: Run, abstract) -> tuple:
    """What a group's cells have in common: the whole config but the model's own fields, the
    mesh, and the variables' structure, dtypes and ranks (their sizes may differ)."""
    config = run.config.to_dict()
    model = config.pop("model")
    config.pop("tune", None)
    return (json.dumps(config, sort_keys=True, default=str), model["name"],
            tuple(d.id for d in run.mesh.devices.flat), run.mesh.axis_names,
            jax.tree.structure(abstract),
            tuple((a.ndim, str(a.dtype)) for a in jax.tree.leaves(abstract)))


def _by_width(runs: list[Run], abstract: list, sequential: bool, compiled_inits: dict):
    """A family's groups as (member indices, `_Group`): one over every width where padding to
    the widest is exact, one per set of equal shapes for the rest."""
    shapes = [_shapes(a) for a in abstract]
    group = lambda ix, *wide: (ix, _Group([runs[i] for i in ix], sequential, compiled_inits,
                                          *wide))
    apart = lambda ix: [group([i for i in ix if shapes[i] == s])
                        for s in dict.fromkeys(shapes[i] for i in ix)]
    everyone = list(range(len(runs)))
    covers = lambda s, t: all(m >= n for a, b in zip(s, t) for m, n in zip(a, b))
    widest = next((i for i in everyone if all(covers(shapes[i], t) for t in shapes)), None)
    if len(set(shapes)) == 1 or widest is None:
        return apart(everyone)
    wide = _widened(runs, shapes, widest)
    fits = [i for i in everyone if wide[i] is not None]
    while len({shapes[i] for i in fits}) > 1:  # some to pad
        padded = group(fits, [wide[i] for i in fits],
                       _Padding.of([abstract[i] for i in fits], abstract[widest]))
        wrong = [i for k, i in enumerate(fits) if shapes[i] != shapes[widest]
                 and not padded[1].agrees(k)]
        if not wrong:
            return [padded, *apart([i for i in everyone if i not in fits])]
        logging.info("grid cells %s keep programs of their own widths: padded to the widest, "
                     "their models compute otherwise", [runs[i].config.model.to_dict()
                                                        for i in wrong])
        fits = [i for i in fits if i not in wrong]
    return apart(everyone)


def _widened(runs: list[Run], shapes: list[tuple], widest: int) -> list:
    """Each run's model with the widest run's value of every field that sets a variable's size
    (found by tracing the widest model with each other value), or None where that model's
    shapes are not the widest's."""
    key = lambda config: json.dumps(config.to_dict(), sort_keys=True, default=str)
    base = runs[widest].config
    built = {key(run.config): (run.model, s) for run, s in zip(runs, shapes)}

    def model_of(config):  # one setup per distinct config
        if key(config) not in built:
            try:
                run = setup(config, runs[widest].dataset)
                built[key(config)] = (run.model, _shapes(_abstract_variables(run)))
            except (DlassignError, ValueError):  # a combination its fields do not allow
                built[key(config)] = (None, None)
        return built[key(config)]

    differs = lambda run, f: run.config.model.get(f) != base.model.get(f)
    fields = sorted({f for run in runs for f in run.config.model if differs(run, f)})
    sizing = [f for f in fields if any(
        model_of(apply_overrides(base, {f"model.{f}": run.config.model[f]}))[1] != shapes[widest]
        for run in runs if differs(run, f))]
    out = []
    for run in runs:
        model, own = model_of(apply_overrides(
            run.config, {f"model.{f}": base.model[f] for f in sizing if differs(run, f)}))
        out.append(model if own == shapes[widest] else None)
    return out


@dataclasses.dataclass(frozen=True)
class _Padding:
    """How a group's cells of several widths run in their models' widest variants: `sizes`, for
    each variable leaf (by its path) that some cell has narrower, every cell's own size per
    axis [cells, ndim]; `widest`, the abstract variables of the widest shapes."""

    sizes: dict[str, np.ndarray]
    widest: object

    @classmethod
    def of(cls, abstract: list, widest) -> _Padding:
        flat = [jax.tree_util.tree_flatten_with_path(a)[0] for a in abstract]
        sizes = {}
        for k, (path, wide) in enumerate(jax.tree_util.tree_flatten_with_path(widest)[0]):
            table = np.array([leaves[k][1].shape for leaves in flat], np.int32).reshape(
                len(flat), wide.ndim)
            if (table != np.array(wide.shape)).any():
                sizes[jax.tree_util.keystr(path)] = table
        return cls(sizes, widest)

    def mask(self, variables, index):
        """`variables` with everything outside cell `index`'s own sizes set to zero (where its
        gradient is zero too)."""
        def one(path, a):
            table = self.sizes.get(jax.tree_util.keystr(path))
            if table is None:
                return a
            own = jnp.asarray(table)[index]
            keep = functools.reduce(jnp.logical_and, [
                jax.lax.broadcasted_iota(jnp.int32, a.shape, d) < own[d] for d in range(a.ndim)])
            return jnp.where(keep, a, jnp.zeros((), a.dtype))

        return jax.tree_util.tree_map_with_path(one, variables)

    def pad(self, variables: dict) -> dict:
        """A cell's own variables zero-padded at the end of each axis to the widest shapes."""
        pad = lambda a, w: jnp.pad(a, [(0, n - m) for m, n in zip(a.shape, w.shape)])
        return {col: jax.tree.map(pad, tree, self.widest[col]) if tree else tree
                for col, tree in variables.items()}


def _probe_forward(apply):
    """`(variables, x) -> (logits in inference, logits in training)`, as the steps call it."""
    def forward(variables, x):
        rngs = {"dropout": jax.random.PRNGKey(0)}
        inference = apply(variables, x, train=False)
        if "batch_stats" in variables:
            training, _ = apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
        else:
            training = apply(variables, x, train=True, rngs=rngs)
        return inference, training

    return forward


@dataclasses.dataclass
class CellPrograms:
    """One cell's run, optimizer and steps: `train(state, batch, steps)`, `evaluate(state,
    batch)` and `init(rng) -> TrainState` (rng [K, 2] when the folds are vmapped)."""

    run: Run
    sequential: bool
    tx: optax.GradientTransformation
    train: Callable
    evaluate: Callable
    init: Callable


class _Group:
    """The programs of cells that share them (`SharedPrograms`): `models[j]` is what cell j
    applies (its own model, or its widest variant with `padding`)."""

    def __init__(self, runs: list[Run], sequential: bool, compiled_inits: dict,
                 models: list | None = None, padding: _Padding | None = None):
        run = runs[0]
        self.runs, self.sequential, self.padding = runs, sequential, padding
        self.models = tuple(models or [r.model for r in runs])
        self._distinct = list(dict.fromkeys(self.models))  # a switch branch each
        self._branch = np.array([self._distinct.index(m) for m in self.models], np.int32)
        self.tx = make_tx(run)  # one object: the state's optimizer is part of a program's key
        self._compiled_inits, self._probe = compiled_inits, None
        train_step, eval_step = make_train_step(run.step_config), make_eval_step(run.step_config)
        if sequential:
            train, evaluate = stacked_or_single(train_step), eval_step
        else:
            train = stacked_or_single(jax.vmap(train_step), label_ndim=2)  # [K, B] labels
            evaluate = jax.vmap(eval_step)
        self._train = jax.jit(self._choosing(train, "grid_train_step"), donate_argnums=1)
        self._evaluate = jax.jit(self._choosing(evaluate, "grid_eval_step"))

    def apply(self, variables, *args, index, **kwargs):
        """`models[index].apply` (on variables masked to cell `index`'s sizes); an index traced
        as a program's argument makes the group's models one program, which runs the chosen
        one's operations alone."""
        if self.padding is not None:
            variables = self.padding.mask(variables, index)
        if len(self._distinct) == 1:
            return self._distinct[0].apply(variables, *args, **kwargs)
        return jax.lax.switch(jnp.asarray(self._branch)[index],
                              [functools.partial(m.apply, **kwargs) for m in self._distinct],
                              variables, *args)

    def _choosing(self, fn, name: str):
        """`fn(state, ...)` as `name(index, state, ...)`, its states applying `models[index]`."""
        def call(index, state, *args):
            out = fn(state.replace(apply_fn=functools.partial(self.apply, index=index)), *args)
            return jax.tree.map(lambda x: x.replace(apply_fn=self.apply)
                                if isinstance(x, TrainState) else x,
                                out, is_leaf=lambda x: isinstance(x, TrainState))

        call.__name__ = call.__qualname__ = name  # the program's name in logs and profiles
        return call

    def agrees(self, j: int) -> bool:
        """Whether cell j's padded run computes what its own model does: both forward passes on
        one random probe batch, from random variables (the padding random too, which the mask
        must hide). Normal weights scaled by their fan-in, other collections in [0.5, 1.5]."""
        run, sizes = self.runs[j], self.padding.sizes
        if self._probe is None:  # one program and one probe for the group's cells
            rng = np.random.default_rng(0)

            def random(path, a):
                if jax.tree_util.keystr(path).startswith("['params']"):
                    scale = 1 / np.sqrt(max(1, int(np.prod(a.shape[:-1]))))
                    return (scale * rng.standard_normal(a.shape)).astype(a.dtype)
                return rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)

            program = jax.jit(lambda i, v, x: _probe_forward(
                functools.partial(self.apply, index=i))(v, x))
            wide = jax.tree_util.tree_map_with_path(random, self.padding.widest)
            x = rng.standard_normal((4, *run.input_shape[1:])).astype(np.float32)
            self._probe = program, wide, x
        program, wide, x = self._probe

        def own_part(path, a):
            table = sizes.get(jax.tree_util.keystr(path))
            return a if table is None else a[tuple(slice(0, n) for n in table[j])]

        own = jax.tree_util.tree_map_with_path(own_part, wide)
        expected = jax.jit(_probe_forward(run.model.apply))(own, x)
        got = program(np.int32(j), wide, x)
        tolerance = 1e-4 if run.config.get("dtype", "float32") == "float32" else 3e-2
        return all(np.max(np.abs(np.float32(a) - np.float32(b)))
                   <= tolerance * (np.max(np.abs(np.float32(a))) + 1e-6)
                   for a, b in zip(expected, got))

    def cell(self, j: int) -> CellPrograms:
        run, index = self.runs[j], np.int32(j)
        # The programs see the group's apply_fn, the same for every cell (a static field of the
        # state, hence part of the programs' trace key); the states outside apply the cell's.
        own = (run.model.apply if self.padding is None
               else functools.partial(self.apply, index=index))

        def train(state, batch, steps=None):
            new, metrics = self._train(index, state.replace(apply_fn=self.apply), batch, steps)
            return new.replace(apply_fn=own), metrics

        def evaluate(state, batch):
            return self._evaluate(index, state.replace(apply_fn=self.apply), batch)

        return CellPrograms(run, self.sequential, self.tx, train, evaluate,
                            self._initializer(run, own))

    def _initializer(self, run: Run, apply_fn):
        """`rng -> TrainState`, the cell's own initial state (padded to the group's widest
        shapes, the optimizer state of the padded parameters) replicated over its mesh, compiled
        once per distinct program: cells whose models differ only in a parameter-free function
        (an activation) lower to the same program, the unused forward pass dropped."""
        tx, compiled, padding = self.tx, None, self.padding

        def grid_initial_state(rng):
            s = create_train_state(run.model, tx, rng, run.input_shape)
            if padding is None:
                return s.step, s.params, s.batch_stats, s.opt_state, s.rng
            padded = padding.pad({"params": s.params, "batch_stats": s.batch_stats})
            return s.step, padded["params"], padded["batch_stats"], tx.init(padded["params"]), s.rng

        def state(rng) -> TrainState:
            nonlocal compiled
            if compiled is None:
                lowered = jax.jit(jax.vmap(grid_initial_state) if rng.ndim == 2
                                  else grid_initial_state,
                                  out_shardings=parallel.replicated(run.mesh),
                                  compiler_options=init_compiler_options()).lower(rng)
                key = (lowered.as_text(), tuple(d.id for d in run.mesh.devices.flat))
                if key not in self._compiled_inits:
                    self._compiled_inits[key] = lowered.compile()
                compiled = self._compiled_inits[key]
            step, params, batch_stats, opt_state, state_rng = compiled(rng)
            return TrainState(step=step, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, rng=state_rng, apply_fn=apply_fn, tx=tx)

        return state


def _write_fold_runs(logdir: str, per_fold: list[dict[str, np.ndarray]], log_every: int,
                     schedule, accuracies: np.ndarray, losses: np.ndarray, hparams: dict) -> None:
    """Each fold's TensorBoard runs under `logdir/fold<k>` (replacing any earlier attempt's),
    `hparams` on each: `train`, the training metrics averaged over each `log_every` steps, and
    `validation`, the fold's validation accuracy and loss at its last step."""
    if jax.process_index() != 0:
        return
    for k, series in enumerate(per_fold):
        fold_dir = os.path.join(logdir, f"fold{k}")
        shutil.rmtree(fold_dir, ignore_errors=True)  # a cell redone after an interruption
        total = len(series["loss"])
        ends = sorted({*range(log_every, total + 1, log_every), total})
        with summaries.Summaries(fold_dir, hparams).open(0) as board:
            lo = 0
            for end in ends:
                board.scalars(end, {**{m: float(np.mean(series[m][lo:end])) for m in STEP_METRICS},
                                    "learning_rate": float(schedule(end - 1))}, "train")
                lo = end
            board.scalars(total, {"accuracy": accuracies[k], "loss": losses[k]}, "validation")


def cross_validate(config: ml_collections.ConfigDict, dataset: Dataset,
                   folds: list[tuple[np.ndarray, np.ndarray]], sequential: bool = False,
                   where: str = "", logdir: str | None = None,
                   hparams: dict | None = None, programs: CellPrograms | None = None) -> dict:
    """Trains one grid cell on every fold and scores each fold's validation set.

    The folds train through the training loop's runner (`loop.run_steps`: call plan, batch
    placement, non-finite guard), as one vmapped program or one fold after another.

    Args:
      config: the cell's training config.
      dataset: the prepared dataset; only its training split is used.
      folds: (train indices, validation indices) pairs from `stratified_kfold`.
      sequential: train the folds one after another instead of as one vmapped program.
      where: names the cell in errors, e.g. "grid cell {'model.dense_width': 32}: ".
      logdir: where the folds' TensorBoard runs go (`fold<k>` each); None: none are written.
      hparams: the cell's hyperparameters (`cell_hparams`), written with the rest of `config`
        as those runs' hyperparameters.
      programs: the cell's run and steps from its grid's `SharedPrograms` (for the same
        `sequential`); None: the cell's own.

    Returns:
      fold_accuracies (list), mean, std, fold_losses (each fold's mean validation loss),
      train_time_s.

    Raises:
      NumericalError: a fold's step was not finite; names the cell, the fold and the step.
    """
    if programs is None:
        programs = SharedPrograms([setup(config, dataset)], sequential).cell(0)
    elif programs.sequential != sequential:
        raise ValueError(f"{where}programs for sequential={programs.sequential} folds given "
                         f"to a cross-validation with sequential={sequential}")
    run, step, evaluate, init = programs.run, programs.train, programs.evaluate, programs.init
    k = len(folds)
    train_ix, val_ix = [f[0] for f in folds], [f[1] for f in folds]
    rngs = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(config.seed), i) for i in range(k)])

    per_call = int(config.get("steps_per_call", 0)) or loop.AUTO_MOST_STEPS
    steps = _fold_steps_per_epoch(train_ix, config.batch_size)
    plan = list(loop.call_plan(0, steps * config.num_epochs, per_call, ()))
    stacked = int(per_call > 1)
    fold_batches = [_fold_batches(dataset.train, ix, i, steps, config.batch_size, config.seed,
                                  config.num_epochs) for i, ix in enumerate(train_ix)]
    schedule = learning_rate_schedule(config.optimizer, run.total_steps, run.steps_per_epoch)
    unsaved = lambda: "grid-search folds keep no checkpoints; finished cells stay in results.json"
    logged = []  # each run_steps' per-step host metrics, for the TensorBoard runs
    keep = (lambda state, step, host: logged.append(host)) if logdir is not None else None
    start = time.perf_counter()
    if sequential:
        sharding = parallel.batch_sharding(run.mesh, stacked)  # [S,] B
        states = []
        for i in range(k):
            state = init(rngs[i])
            guard = loop.Guard(loop.leaf_names(state.params), f"{where}fold {i}: ",
                               learning_rate=schedule, saved=unsaved)
            states.append(loop.run_steps(
                step, state, loop.fixed_calls(plan, fold_batches[i], per_call, sharding), guard,
                on_sync=keep))
    else:
        state = init(rngs)
        one = jax.tree.map(lambda x: x[0], state.params)
        guard = loop.Guard(loop.leaf_names(one), where, folds=True, learning_rate=schedule,
                           saved=unsaved)
        calls = loop.fixed_calls(plan, _stacked_folds(fold_batches), per_call,
                                 parallel.batch_sharding(run.mesh, stacked + 1))  # [S,] K, B
        state = loop.run_steps(step, state, calls, guard, on_sync=keep)
    jax.block_until_ready(state if not sequential else states)
    train_time = time.perf_counter() - start

    correct, loss = np.zeros(k), np.zeros(k)
    sizes = np.asarray([len(ix) for ix in val_ix])
    if sequential:
        for i in range(k):
            preds, mean_loss = predict(states[i], dataset.train.take(val_ix[i]), evaluate,
                                       run.mesh, config.eval_batch_size)
            correct[i] = np.sum(preds == dataset.train.labels[val_ix[i]])
            loss[i] = mean_loss * sizes[i]
    else:
        sharding = parallel.batch_sharding(run.mesh, 1)
        for batch in _padded_folds(dataset.train, val_ix, config.eval_batch_size):
            out = parallel.to_host(evaluate(state, parallel.global_batch(batch, sharding)))
            correct += np.sum((out["pred"] == batch["label"]) & batch["mask"], axis=1)
            loss += out["loss_sum"]
    acc = correct / sizes
    if logdir is not None:
        # sequential: one list of per-step metrics per fold; vmapped: one, with a fold axis
        per_fold = [{m: np.array([float(h[m] if sequential else h[m][i])
                                  for h in logged[i if sequential else 0]])
                     for m in STEP_METRICS} for i in range(k)]
        _write_fold_runs(logdir, per_fold, int(config.get("log_every_steps", 0)) or steps,
                         schedule, acc, loss / sizes,
                         {**summaries.hparams_of(config), **summaries.hparams_of(hparams or {})})
    return {"fold_accuracies": acc.tolist(), "mean": float(acc.mean()), "std": float(acc.std()),
            "fold_losses": (loss / sizes).tolist(), "train_time_s": train_time}


FOLD_MODES = ("auto", "vmap", "sequential")


def sequential_folds(mode: str) -> bool:
    """'auto' trains folds one after another on CPUs and as one vmapped program elsewhere.

    On a CPU the cores are already busy with one fold and batched matmuls over the fold axis run
    less efficiently than plain ones (docs/performance.md); an accelerator has the idle width
    that vmap fills.
    """
    if mode not in FOLD_MODES:
        raise one_of("tune.mode", mode, FOLD_MODES)
    return mode == "sequential" or (mode == "auto" and jax.default_backend() == "cpu")


def _without_grid(config: dict) -> str:
    config = copy.deepcopy(config)
    config.get("tune", {}).pop("grid", None)
    return json.dumps(config, sort_keys=True, default=str)


def tune(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the grid of `config.tune.grid` with k-fold CV, then retrains the best cell.

    Writes into `workdir`: results.json (one entry per cell with its parameters, fold accuracies,
    mean and std; the best cell; its test metrics after retraining on the whole training split),
    results.md (a table) and heatmap.png. Finished cells are kept in results.json as they
    complete, and a rerun skips them.
    """
    validate_tune_config(config)
    check_workdir(workdir)
    with WorkdirLock(workdir):
        return _tune(config, workdir)


def _tune(config: ml_collections.ConfigDict, workdir: str) -> dict:
    dataset = prepare(config.data, config.seed)
    folds = stratified_kfold(dataset.train.labels, config.tune.num_folds, config.seed)
    path = os.path.join(workdir, "results.json")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if _without_grid(previous.get("config", {})) != _without_grid(config.to_dict()):
            raise DlassignError(f"{path} holds the results of a different config; use a new "
                                "workdir or the config that wrote it")
        done = {json.dumps(c["params"], sort_keys=True): c for c in previous.get("cells", [])}
    cells, grid = [], grid_cells(config.tune.grid)
    todo = [i for i, o in enumerate(grid) if json.dumps(o, sort_keys=True) not in done]
    sequential = sequential_folds(config.tune.get("mode", "auto"))
    logging.info("grid of %d cells, %d to train", len(grid), len(todo))
    shared = SharedPrograms([setup(apply_overrides(config, grid[i]), dataset) for i in todo],
                            sequential, config.tune.get("share_programs", True))
    logging.info("%d cells to train, in %d group(s) of shared programs", len(todo),
                 len(shared.groups))
    for i, overrides in enumerate(grid):
        key = json.dumps(overrides, sort_keys=True)
        if key in done:
            cells.append(done[key])
            continue
        logging.info("cell %d/%d %s", i + 1, len(grid), overrides)
        cv = cross_validate(apply_overrides(config, overrides), dataset, folds,
                            sequential=sequential, where=f"grid cell {overrides}: ",
                            logdir=os.path.join(workdir, "cells", cell_name(i, overrides)),
                            hparams=cell_hparams(config.tune.grid, overrides),
                            programs=shared.cell(todo.index(i)))
        logging.info("  fold accuracies %s mean %.4f std %.4f (%.1fs)",
                     ", ".join(f"{a:.4f}" for a in cv["fold_accuracies"]), cv["mean"], cv["std"],
                     cv["train_time_s"])
        cells.append({"params": overrides, **cv})
        write_json(path, {"config": config.to_dict(), "cells": cells, "complete": False})
    del shared  # its programs and buffers go before the best cell is trained again
    best = max(cells, key=lambda c: c["mean"])
    logging.info("best cell %s: mean CV accuracy %.4f", best["params"], best["mean"])
    final = train_and_evaluate(apply_overrides(config, best["params"]),
                               os.path.join(workdir, "best"), dataset)
    results = {
        "config": config.to_dict(),
        "num_folds": config.tune.num_folds,
        "cells": cells,
        "best": {"params": best["params"], "cv_mean": best["mean"], "cv_std": best["std"]},
        "test": {k: final["test"][k] for k in
                 ("accuracy", "precision_macro", "recall_macro", "f1_macro", "num_examples")},
        "best_train_time_s": final["train_time_s"],
        "complete": True,
    }
    write_json(path, results)
    from dlassign.report import grid_heatmap, grid_table

    write_text(os.path.join(workdir, "results.md"), grid_table(results))
    grid_heatmap(results, os.path.join(workdir, "heatmap.png"))
    return results
