"""Training, checkpoints, resume, evaluation and k-fold tuning on small synthetic or real data."""

import json
import os

import jax
import numpy as np
import pytest

from dlassign.data import stratified_kfold
from dlassign.errors import NumericalError
from dlassign.runtime.checkpoint import Checkpointer
from dlassign.training.evaluation import evaluate_checkpoint
from dlassign.training.setup import abstract_tree, make_state, setup, state_tree
from dlassign.training.trainer import train_and_evaluate
from dlassign.training.tune import cross_validate, tune
from tests.helpers import (
    checkpoint_steps,
    restore_checkpoint,
    synthetic_dataset,
    tiny_config,
)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_mlp_learns_synthetic_task(tmp_path):
    config = tiny_config({"mesh.cpu_data_parallel_min_step_flops": 0.0})
    results = train_and_evaluate(config, str(tmp_path), synthetic_dataset())
    assert results["test"]["accuracy"] >= 0.95
    assert results["num_devices"] == 8  # data parallel over every CPU host device
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
        assert 0.0 <= on_disk["test"][key] <= 1.0
    assert on_disk["config"]["model"]["hidden_sizes"] == [32]
    assert on_disk["prediction_collapse"]["collapsed"] is False


def test_tiny_steps_run_on_one_cpu_device():
    """A step far below mesh.cpu_data_parallel_min_step_flops is not worth an all-reduce."""
    from dlassign.training.setup import setup

    data = synthetic_dataset()
    assert setup(tiny_config(), data).mesh.devices.size == 1
    big = tiny_config({"mesh.cpu_data_parallel_min_step_flops": 1.0})
    assert setup(big, data).mesh.devices.size == 8
    capped = tiny_config({"mesh.cpu_data_parallel_min_step_flops": 1.0,
                          "mesh.cpu_data_parallel_max_params": 10})
    assert setup(capped, data).mesh.devices.size == 1


@pytest.mark.slow
def test_cnn_learns_synthetic_task(tmp_path):
    config = tiny_config({"num_epochs": 4})
    config.model = {"name": "cnn", "conv_features": (4, 8), "dense_width": 16, "padding": "same"}
    results = train_and_evaluate(config, str(tmp_path), synthetic_dataset(size=12))
    assert results["test"]["accuracy"] >= 0.95


def test_step_reports_the_gradient_norm_and_its_finiteness():
    """With SGD at learning rate 1, the first step moves the parameters by minus the gradient."""
    from dlassign.training.setup import compile_steps

    data = synthetic_dataset()
    run = setup(tiny_config({"optimizer.name": "sgd", "optimizer.learning_rate": 1.0}), data)
    state = make_state(run)
    before = leaves(state.params)
    step, _ = compile_steps(run, state)
    batch = {"image": data.train.images[:32], "label": data.train.labels[:32]}
    new, metrics = step(state, batch)
    grads = [b - a for a, b in zip(leaves(new.params), before)]
    np.testing.assert_allclose(float(metrics["grad_norm"]),
                               np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2))
                                           for g in grads)), rtol=1e-5)
    assert bool(metrics["finite"])
    assert np.asarray(metrics["leaf_finite"]).tolist() == [True] * len(before)
    # A NaN in the first layer's bias reaches every gradient: nothing moves, every leaf flagged.
    params = jax.tree.map(np.array, new.params)
    params["dense0"]["bias"][0] = np.nan
    bad, metrics = step(new.replace(params=jax.tree.map(jax.numpy.asarray, params)), batch)
    assert not bool(metrics["finite"]) and not np.asarray(metrics["leaf_finite"]).any()
    for x, y in zip(leaves(bad.params), leaves(params)):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_restores_identical_state(tmp_path):
    run = setup(tiny_config(), synthetic_dataset())
    state = make_state(run)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(0, state_tree(state), {"config": run.config.to_dict()})
        restored, meta = ckpt.restore(0, abstract_tree(state))
    for a, b in zip(leaves(state_tree(state)), leaves(restored)):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert meta["step"] == 0
    manifest = json.loads((tmp_path / "0" / "dlassign_files.json").read_text())
    assert any(name.startswith("state/ocdbt.process_0/") for name in manifest)


def test_checkpointer_keeps_the_newest_and_the_best_scored_step(tmp_path):
    """Orbax's preservation policies: the newest `keep` steps and the highest score, the first
    on a tie; an unscored or NaN step never counts as the best; a new reader finds the same."""
    state = {"w": np.arange(3.0, dtype=np.float32)}
    scores = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.9, 5: float("nan"), 6: None, 7: 0.6}
    with Checkpointer(str(tmp_path), keep=2, best="validation_accuracy") as ckpt:
        assert ckpt.best() is None
        for step, score in scores.items():
            ckpt.save(step, state, {}, score)
        assert ckpt.steps() == [2, 6, 7]
        assert ckpt.best() == (2, 0.9)
    with Checkpointer(str(tmp_path), best="validation_accuracy") as reader:
        assert reader.best() == (2, 0.9) and reader.read_meta(2)["validation_accuracy"] == 0.9
    with Checkpointer(str(tmp_path / "unscored"), keep=2, best="validation_accuracy") as ckpt:
        ckpt.save(1, state, {})
        assert ckpt.best() is None


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, monkeypatch, steps_per_call):
    data = synthetic_dataset()
    config = lambda: tiny_config({"steps_per_call": steps_per_call})
    full = tmp_path / "full"
    train_and_evaluate(config(), str(full), data)

    # Interrupt the second run after 10 steps (KeyboardInterrupt checkpoints the last state).
    import dlassign.training.compile_ahead as train_module

    real_compile = train_module.compile_steps

    def interrupting_compile(run, state):
        train_step, eval_step = real_compile(run, state)
        calls = {"n": 0}

        def step(state, batch, *steps):
            calls["n"] += 1
            if calls["n"] > 10 // steps_per_call:
                raise KeyboardInterrupt
            return train_step(state, batch, *steps)

        return step, eval_step

    resumed = tmp_path / "resumed"
    monkeypatch.setattr(train_module, "compile_steps", interrupting_compile)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config(), str(resumed), data)
    assert checkpoint_steps(resumed / "checkpoints")[-1] == 10
    monkeypatch.setattr(train_module, "compile_steps", real_compile)
    result = train_and_evaluate(config(), str(resumed), data)

    run = setup(config(), data)
    abstract = abstract_tree(make_state(run))
    final_steps = checkpoint_steps(full / "checkpoints")[-1]
    a, _ = restore_checkpoint(full / "checkpoints", abstract, final_steps)
    b, _ = restore_checkpoint(resumed / "checkpoints", abstract, final_steps)
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_array_equal(x, y)
    full_result = json.loads((full / "results.json").read_text())
    assert result["test"]["accuracy"] == full_result["test"]["accuracy"]


def test_call_plan_keeps_boundaries_and_resumes_on_the_same_calls():
    from dlassign.training.loop import call_plan

    full = list(call_plan(0, 23, 4, [10, 20, 20]))
    assert full == [(1, 4), (5, 4), (9, 2), (11, 4), (15, 4), (19, 2), (21, 3)]
    for first, n in full:  # resuming after any call makes the calls the full run makes
        assert list(call_plan(first + n - 1, 23, 4, [10, 20])) == [c for c in full
                                                                   if c[0] > first]
    # From a step inside a call (steps_per_call changed between runs): a short call first.
    assert list(call_plan(12, 20, 4, [10])) == [(13, 2), (15, 4), (19, 2)]
    assert list(call_plan(0, 5, 1, [])) == [(s, 1) for s in range(1, 6)]


def test_a_short_call_runs_only_its_steps():
    """A call with fewer steps than slots leaves the state as that many single steps do."""
    from dlassign.training.setup import compile_steps

    data = synthetic_dataset()
    run = setup(tiny_config({"optimizer.name": "adam"}), data)
    state = make_state(run)
    step, _ = compile_steps(run, state)
    batches = [{"image": data.train.images[i:i + 32], "label": data.train.labels[i:i + 32]}
               for i in (0, 32, 64)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    short, metrics = step(make_state(run).replace(apply_fn=state.apply_fn, tx=state.tx),
                          stacked, np.int32(2))
    assert int(short.step) == 2 and float(metrics["loss"][2]) == 0.0
    for batch in batches[:2]:
        state, single = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"][1]), float(single["loss"]), rtol=1e-6)
    for x, y in zip(leaves(short), leaves(state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("leading", [0, 1])  # one step's batch; steps stacked in front
def test_each_process_contributes_its_rows_of_the_batch_axis(monkeypatch, leading):
    from dlassign.runtime import parallel

    mesh = parallel.make_mesh(8)
    images = np.arange(2 * 8 * 3).reshape(2, 8, 3)[0 if leading == 0 else slice(None)]
    seen = {}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "make_array_from_process_local_data",
                        lambda sharding, x: seen.setdefault("rows", x))
    parallel.global_batch({"image": images}, parallel.batch_sharding(mesh, leading))
    want = images[4:] if leading == 0 else images[:, 4:]
    np.testing.assert_array_equal(seen["rows"], want)


@pytest.mark.slow
def test_steps_per_call_trains_like_single_steps(tmp_path):
    """Four steps per call (a scan) give the history and parameters of one step per call."""
    data = synthetic_dataset()
    out = {}
    for k in (1, 4):
        config = tiny_config({"steps_per_call": k, "log_every_steps": 8,
                              "checkpoint_every_steps": 8})
        result = train_and_evaluate(config, str(tmp_path / str(k)), data)
        run = setup(config, data)
        tree, _ = restore_checkpoint(tmp_path / str(k) / "checkpoints",
                                     abstract_tree(make_state(run)), 24)
        out[k] = result["history"], leaves(tree["params"])
    assert [h["step"] for h in out[4][0]] == [8, 16, 24]
    for a, b in zip(out[1][0], out[4][0], strict=True):
        assert a["step"] == b["step"]
        np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]],
                                   rtol=1e-5)
    for x, y in zip(out[1][1], out[4][1], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("min_flops", [1e30, 1.0])  # one device, then all eight
def test_non_finite_step_leaves_the_whole_state_unchanged(min_flops):
    """Adam's moments and count, BatchNorm's statistics and the parameters stay as they were;
    only the step counter moves. A finite step after it updates everything again."""
    from dlassign.training.setup import compile_steps

    data = synthetic_dataset()
    config = tiny_config({"optimizer.name": "adam",
                          "mesh.cpu_data_parallel_min_step_flops": min_flops})
    config.model = {"name": "resnet18", "stage_sizes": (1, 1, 1, 1)}  # has BatchNorm
    run = setup(config, data)
    state = make_state(run)
    step, _ = compile_steps(run, state)
    batch = {"image": data.train.images[:32], "label": data.train.labels[:32]}
    good, metrics = step(state, batch)  # the step donates its input: keep host copies
    assert bool(metrics["finite"])
    host = jax.device_get(good)
    params = jax.tree.map(np.array, host.params)
    params["fc"]["bias"][0] = np.nan
    bad, metrics = step(good.replace(params=jax.tree.map(jax.numpy.asarray, params)), batch)
    assert not bool(metrics["finite"]) and int(bad.step) == int(host.step) + 1
    for got, want in ((bad.params, params), (bad.opt_state, host.opt_state),
                      (bad.batch_stats, host.batch_stats)):
        for x, y in zip(leaves(got), leaves(want), strict=True):
            np.testing.assert_array_equal(x, y)
    fixed, metrics = step(bad.replace(params=jax.tree.map(jax.numpy.asarray, host.params)), batch)
    assert bool(metrics["finite"])
    for got, want in ((fixed.opt_state[0].mu, host.opt_state[0].mu),
                      (fixed.batch_stats, host.batch_stats)):
        assert all(not np.array_equal(x, y) for x, y in zip(leaves(got), leaves(want)))


def test_non_finite_loss_stops_with_step(tmp_path):
    config = tiny_config({"optimizer.learning_rate": 1e30, "optimizer.name": "sgd"})
    with pytest.raises(NumericalError, match=r"diverged at step \d+ at learning rate 1e\+30: "
                                             r"loss (nan|inf)") as e:
        train_and_evaluate(config, str(tmp_path), synthetic_dataset())
    saved = checkpoint_steps(tmp_path / "checkpoints")
    if saved:
        assert f"the last checkpoint (step {saved[-1]})" in str(e.value)
    else:
        assert "no checkpoint was written yet" in str(e.value)
    # Every checkpoint written before the error is finite.
    run = setup(config, synthetic_dataset())
    for step in checkpoint_steps(tmp_path / "checkpoints"):
        tree, _ = restore_checkpoint(tmp_path / "checkpoints", abstract_tree(make_state(run)),
                                     step)
        assert all(np.all(np.isfinite(x)) for x in leaves(tree["params"]))


@pytest.mark.slow
def test_evaluate_checkpoint_reproduces_training_metrics(tmp_path):
    config = tiny_config()
    results = train_and_evaluate(config, str(tmp_path))  # embedded digits, loaded for real
    out = evaluate_checkpoint(str(tmp_path))
    assert out["test"]["accuracy"] == results["test"]["accuracy"]
    assert out["test"]["num_examples"] == 450  # every test image, none dropped
    for name in ("eval.json", "eval_per_class.md", "confusion_matrix.png"):
        assert os.path.getsize(tmp_path / name) > 0


@pytest.mark.slow
def test_vmapped_folds_match_sequential_folds():
    data = synthetic_dataset(n_train=240)
    folds = stratified_kfold(data.train.labels, 3, seed=0)
    config = tiny_config({"num_epochs": 2})
    vmapped = cross_validate(config, data, folds)
    sequential = cross_validate(config, data, folds, sequential=True)
    np.testing.assert_allclose(vmapped["fold_accuracies"], sequential["fold_accuracies"],
                               atol=1.0 / 80 + 1e-9)
    assert vmapped["mean"] > 0.9


def _compiled(caplog, name: str) -> int:
    """How many programs named `name` were compiled (or read from the compilation cache) while
    `caplog` listened under `jax.log_compiles`."""
    return sum(f"compilation of jit({name})" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("vmapped", [False, True])
def test_a_cells_initial_state_is_its_own_state_bitwise(vmapped, caplog):
    import logging

    from dlassign.training.train_state import create_train_state, init_compiler_options
    from dlassign.training.tune import SharedPrograms

    data = synthetic_dataset(n_train=240)
    rng = jax.random.PRNGKey(3)
    rngs = jax.numpy.stack([rng, jax.random.fold_in(rng, 1)]) if vmapped else rng
    runs = [setup(tiny_config({"model.activation": a}), data) for a in ("relu", "tanh", "sigmoid")]
    shared = SharedPrograms(runs, sequential=not vmapped)
    for i, run in enumerate(runs):
        cell = shared.cell(i)
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            state = cell.init(rngs)
        make = lambda r: create_train_state(run.model, cell.tx, r, run.input_shape)  # noqa: B023
        # each cell's own state as setup.make_state compiles it
        direct = jax.jit(jax.vmap(make) if vmapped else make,
                         compiler_options=init_compiler_options())(rngs)
        assert state.apply_fn == run.model.apply and state.tx is cell.tx
        assert jax.tree.structure(state) == jax.tree.structure(direct)
        for a, b in zip(leaves(state), leaves(direct)):
            assert a.dtype == b.dtype and np.array_equal(a, b)  # bitwise
    assert _compiled(caplog, "grid_initial_state") == 1  # the activations' forward pass dropped


@pytest.mark.parametrize("sequential", [True, False])
def test_a_grids_cells_share_programs_and_score_as_their_configs_alone(sequential, caplog):
    """Cells that differ in activation share one train and one eval program and score exactly
    as their configs trained alone; share=False compiles a program per cell."""
    import logging

    from dlassign.training.tune import SharedPrograms

    data = synthetic_dataset(n_train=240)
    folds = stratified_kfold(data.train.labels, 3, seed=0)
    configs = [tiny_config({"num_epochs": 2, "model.activation": a}) for a in ("relu", "tanh")]
    shared = SharedPrograms([setup(c, data) for c in configs], sequential)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        in_grid = [cross_validate(c, data, folds, sequential=sequential, programs=shared.cell(i))
                   for i, c in enumerate(configs)]
    assert _compiled(caplog, "grid_train_step") == 1
    assert _compiled(caplog, "grid_eval_step") == 1
    caplog.clear()
    apart = SharedPrograms([setup(c, data) for c in configs], sequential, share=False)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        cross_validate(configs[1], data, folds, sequential=sequential, programs=apart.cell(1))
        cross_validate(configs[0], data, folds, sequential=sequential, programs=apart.cell(0))
    assert _compiled(caplog, "grid_train_step") == 2  # share=False: a program per cell
    for i in (0, 1):
        alone = cross_validate(configs[i], data, folds, sequential=sequential)
        assert in_grid[i]["fold_losses"] == alone["fold_losses"]
        assert in_grid[i]["fold_accuracies"] == alone["fold_accuracies"]


@pytest.mark.parametrize("sequential", [True, False])
def test_cells_of_several_widths_share_programs_padded_and_score_as_alone(sequential, caplog):
    """Narrower cells run zero-padded in the widest model, one program for the grid; their
    scores are their own configs' up to rounding (the padded matmuls sum in another order)."""
    import logging

    from dlassign.training.tune import SharedPrograms

    data = synthetic_dataset(n_train=240)
    folds = stratified_kfold(data.train.labels, 3, seed=0)
    configs = [tiny_config({"num_epochs": 2, "model.hidden_sizes": w, "model.activation": a})
               for w in ((16,), (32,)) for a in ("relu", "sigmoid")]
    shared = SharedPrograms([setup(c, data) for c in configs], sequential)
    assert shared.groups == [[0, 1, 2, 3]]
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        in_grid = [cross_validate(c, data, folds, sequential=sequential, programs=shared.cell(i))
                   for i, c in enumerate(configs)]
    assert _compiled(caplog, "grid_train_step") == 1
    assert _compiled(caplog, "grid_eval_step") == 1
    for i in (0, 1):  # the narrow ones; sigmoid(0) = 0.5, so only the mask keeps padding out
        alone = cross_validate(configs[i], data, folds, sequential=sequential)
        np.testing.assert_allclose(in_grid[i]["fold_losses"], alone["fold_losses"], rtol=1e-5)
        np.testing.assert_allclose(in_grid[i]["fold_accuracies"], alone["fold_accuracies"],
                                   atol=1 / 80 + 1e-9)  # one validation example of 80


def test_padded_units_add_nothing_and_get_no_gradient():
    """A narrow cell's variables outside its own sizes, whatever they hold, change nothing it
    computes and get a zero gradient (sigmoid(0) = 0.5: the mask, not zero weights, does it)."""
    from dlassign.training.tune import SharedPrograms, _abstract_variables

    data = synthetic_dataset(n_train=64)
    runs = [setup(tiny_config({"model.hidden_sizes": w, "model.activation": "sigmoid"}), data)
            for w in ((8,), (32,))]
    shared = SharedPrograms(runs, sequential=True)
    assert shared.groups == [[0, 1]]
    group, _ = shared._cells[0]
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 16))
    wide = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype),
                        group.padding.widest)  # random padding, not zeros
    out = lambda v: group.apply(v, x, index=0, train=False)
    grads = jax.grad(lambda v: jax.numpy.sum(out(v) ** 2))(wide)["params"]
    hidden, bias, last = (grads["dense0"]["kernel"], grads["dense0"]["bias"],
                          grads["head"]["kernel"])
    assert hidden.shape == (64, 32) and last.shape == (32, 4)
    assert np.all(hidden[:, 8:] == 0) and np.all(bias[8:] == 0) and np.all(last[8:] == 0)
    assert np.all(hidden[:, :8] != 0) and np.all(last[:8] != 0)
    own = jax.tree.map(lambda a, o: a[tuple(slice(0, n) for n in o.shape)], wide,
                       _abstract_variables(runs[0]))
    np.testing.assert_allclose(out(wide), runs[0].model.apply(own, x, train=False),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out(wide), out(group.padding.mask(wide, 0)))


def test_cells_whose_padding_would_compute_otherwise_keep_their_own_programs():
    """The probe check: a CNN's last convolution feeds a flatten, so its channels cannot be
    padded at the end (the flattened order moves), nor can dropout (its mask is drawn over the
    padded shape); the first convolution's channels can."""
    from dlassign.training.tune import SharedPrograms

    data = synthetic_dataset(n_train=64)

    def groups(overrides):
        configs = [tiny_config({"model.name": "cnn", "model.padding": "same", **o})
                   for o in overrides]
        for c in configs:
            del c.model["hidden_sizes"]
        return SharedPrograms([setup(c, data) for c in configs], sequential=True).groups

    assert groups([{"model.conv_features": f} for f in ((4, 8), (4, 16), (8, 16))]) == [
        [1, 2], [0]]
    assert groups([{"model.dense_width": w, "model.dropout": d}
                   for w in (16, 32) for d in (0.0, 0.5)]) == [[0, 2, 3], [1]]


def test_tune_keeps_no_programs_between_grid_searches():
    """A grid's shared programs live in its `tune()` call alone (`SharedPrograms`): the module
    holds no container or memoised function that could carry them into the next call."""
    from dlassign.training import tune as tune_module

    held = [name for name, value in vars(tune_module).items() if not name.startswith("__")
            and (isinstance(value, (dict, list, set)) or hasattr(value, "cache_info"))]
    assert held == []


@pytest.mark.slow
@pytest.mark.parametrize("sequential", [False, True])
def test_folds_in_calls_of_several_steps_match_one_step_per_call(sequential):
    data = synthetic_dataset(n_train=240)
    folds = stratified_kfold(data.train.labels, 3, seed=0)
    runs = [cross_validate(tiny_config({"num_epochs": 2, "steps_per_call": k}), data, folds,
                           sequential=sequential)
            for k in (1, 3)]  # 2 epochs of 5 steps: calls of 3, 3, 3 and 1
    np.testing.assert_allclose(runs[0]["fold_losses"], runs[1]["fold_losses"], rtol=1e-5)
    np.testing.assert_allclose(runs[0]["fold_accuracies"], runs[1]["fold_accuracies"],
                               atol=1e-9)
    assert runs[0]["mean"] > 0.9


@pytest.mark.parametrize("mode", ["vmap", "sequential"])
def test_nan_in_one_fold_stops_the_grid_naming_cell_fold_and_step(tmp_path, monkeypatch, mode):
    from dlassign.training import tune as tune_module

    real = tune_module._fold_batches

    def poisoned(train, indices, fold, *args):
        for i, batch in enumerate(real(train, indices, fold, *args)):
            if fold == 1 and i == 6:  # step 7 of fold 1: a label no class has gives a NaN loss
                batch = dict(batch, label=np.full_like(batch["label"], 99))
            yield batch

    monkeypatch.setattr(tune_module, "_fold_batches", poisoned)
    config = tiny_config({"num_epochs": 2, "log_every_steps": 0, "steps_per_call": 4})
    with config.unlocked():
        config.tune = {"num_folds": 3, "mode": mode,
                       "grid": {"model": {"activation": ["relu", "tanh"]}}}
    with pytest.raises(NumericalError) as e:
        tune(config, str(tmp_path))
    message = str(e.value)
    assert "grid cell {'model.activation': 'relu'}" in message
    assert "fold 1" in message and "step 7" in message and "loss nan" in message
    assert not (tmp_path / "best").exists()  # the run stopped at the first cell


@pytest.mark.slow
def test_tune_writes_table_heatmap_and_best_test_metrics(tmp_path):
    config = tiny_config({"num_epochs": 2, "log_every_steps": 0})
    with config.unlocked():
        config.tune = {"num_folds": 2, "mode": "vmap",
                       "grid": {"model": {"activation": ["relu", "tanh"]}}}
    results = tune(config, str(tmp_path))
    assert len(results["cells"]) == 2
    for cell in results["cells"]:
        assert len(cell["fold_accuracies"]) == 2
        assert cell["mean"] == pytest.approx(np.mean(cell["fold_accuracies"]))
        assert cell["std"] == pytest.approx(np.std(cell["fold_accuracies"]))
        assert len(cell["fold_losses"]) == 2 and all(0 < x < 10 for x in cell["fold_losses"])
    best = max(results["cells"], key=lambda c: c["mean"])
    assert results["best"]["params"] == best["params"]
    assert 0.5 < results["test"]["accuracy"] <= 1.0 and results["test"]["num_examples"] == 450
    table = (tmp_path / "results.md").read_text()
    assert "**(best)**" in table and "| val loss |" in table
    assert (tmp_path / "heatmap.png").stat().st_size > 1000


def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    import jax.numpy as jnp

    from dlassign.training.setup import build_model

    config = tiny_config({"dtype": "bfloat16", "num_epochs": 4})
    results = train_and_evaluate(config, str(tmp_path), synthetic_dataset())
    assert results["test"]["accuracy"] >= 0.95
    model = build_model(config, 4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1), jnp.bfloat16))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    logits = model.apply(variables, jnp.zeros((2, 8, 8, 1), jnp.bfloat16))
    assert logits.dtype == jnp.float32


def test_host_allocator_keeps_freed_pages(monkeypatch):
    """The thresholds take (so a step's buffers reuse the last step's pages), or the opt-out
    leaves glibc alone; a large block freed and allocated again faults no new pages."""
    import ctypes
    import resource
    import sys

    from dlassign.runtime import host

    monkeypatch.setattr(host, "_done", False)
    monkeypatch.setenv("DLASSIGN_HOST_ALLOCATOR", "0")
    assert not host.keep_freed_memory()
    monkeypatch.delenv("DLASSIGN_HOST_ALLOCATOR")
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert host.keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 64 << 20

    def touch():
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)

    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < (size >> 12) // 10
