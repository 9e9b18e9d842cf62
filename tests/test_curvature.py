"""Curvature during training (`curvature.every_steps`): the logged top Hessian eigenvalue is the
one a cold-started Lanczos finds on the same checkpoint and sample, at the right steps, in
results.json and TensorBoard, once each across a kill and resume; bad values are one line."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlassign.analysis.hessian import (
    dataset_hvp,
    lanczos,
    model_batch_loss,
    power_iteration,
    ritz,
    tracking,
)
from dlassign.data import eval_batches, stratified_subset
from dlassign.errors import ConfigError
from dlassign.runtime import parallel
from dlassign.training.config_validation import validate_train_config
from dlassign.training.evaluation import restore_run
from dlassign.training.trainer import train_and_evaluate
from tests.helpers import tiny_config
from tests.test_faults import cli, one_line_error
from tests.test_summaries import ROOT, read_events, steps_of


def cold_lanczos_top(workdir: str, step: int, num_examples: int, seed: int = 0,
                     order: int = 40) -> float:
    """The top Ritz value of a cold-started Lanczos on checkpoint `step` of `workdir`, on the
    stratified sample of `num_examples` training examples chosen by `seed`, built here
    independently of the tracker."""
    run, state, _ = restore_run(workdir, step)
    train = run.dataset.train
    sample = train.take(stratified_subset(train.labels, num_examples / len(train), seed))
    devices = run.mesh.devices.size
    size = -(-len(sample) // devices) * devices
    sharding = parallel.batch_sharding(run.mesh)
    batches = [parallel.global_batch(b, sharding) for b in eval_batches(sample, size)]
    batch_loss = model_batch_loss(run.model, state.variables, run.config.loss,
                                  run.dataset.normalizer)
    matvec, x0, _ = dataset_hvp(batch_loss, state.params, batches)  # counts the rows itself
    tri, _ = lanczos(matvec, int(x0.size), order, jax.random.PRNGKey(123))
    return float(ritz(tri)[0].max())


@pytest.mark.slow  # about 20 s on 2 cores
def test_logged_eigenvalue_matches_cold_lanczos_at_the_right_steps_and_in_tensorboard(tmp_path):
    """An MLP on the embedded digits (1,347 training examples: 42 steps of 32 a epoch), the
    curvature every 10 steps with the trace: entries at 10..40, the last within 1% of a cold
    Lanczos on that step's checkpoint, the same values in TensorBoard."""
    config = tiny_config({"num_epochs": 1, "checkpoint_every_steps": 10,
                          "curvature.every_steps": 10, "curvature.num_examples": 200,
                          "curvature.trace_samples": 4})
    results = train_and_evaluate(config, str(tmp_path), hooks=tracking.hooks(config))
    total = results["steps"]
    assert total == 42
    entries = results["curvature"]
    assert [e["step"] for e in entries] == [10, 20, 30, 40]
    for e in entries:
        # a cold start: Lanczos (at most cold_iters steps, 30) and its check, then at most
        # power_iters (10) power steps; warm: at most power_iters
        assert 1 <= e["iterations"] <= 30 + 1 + 10 and e["top_eigenvalue"] > 0
        assert e["seconds"] > 0
        assert e["converged"] == (e["residual"] <= 1e-3)
        assert np.isfinite(e["trace"]) and e["trace_standard_error"] >= 0
    # every measurement reached tol (1e-3): the cold first from Lanczos (9 steps and its
    # residual), the warm ones within power_iters (refined by Lanczos from the last vector)
    assert all(e["converged"] for e in entries)
    assert max(e["iterations"] for e in entries[1:]) <= 10
    # step 40: a warm-started measurement (three before it)
    assert entries[-1]["top_eigenvalue"] == pytest.approx(
        cold_lanczos_top(str(tmp_path), 40, 200), rel=1e-2)

    scalars, _ = read_events(tmp_path / "train")
    for name in ("top_eigenvalue", "residual", "converged", "trace", "iterations"):
        assert steps_of(scalars, f"curvature/{name}") == [10, 20, 30, 40], name
        np.testing.assert_allclose([v for _, v in scalars[f"curvature/{name}"]],
                                   [e[name] for e in entries], rtol=1e-6)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["curvature"] == entries


def test_off_by_default_and_the_trainer_does_not_change(tmp_path):
    """every_steps=0 measures nothing; with curvature on, the trained parameters are the same
    (the measurement steps become sync points, nothing else)."""
    off_config = tiny_config({"num_epochs": 1})
    on_config = tiny_config({"num_epochs": 1, "curvature.every_steps": 7})
    assert tracking.hooks(off_config) == []
    off = train_and_evaluate(off_config, str(tmp_path / "off"), hooks=tracking.hooks(off_config))
    on = train_and_evaluate(on_config, str(tmp_path / "on"), hooks=tracking.hooks(on_config))
    assert "curvature" not in off and [e["step"] for e in on["curvature"]] == [7, 14, 21, 28,
                                                                                35, 42]
    assert on["test"]["accuracy"] == off["test"]["accuracy"]
    assert on["test"]["loss"] == pytest.approx(off["test"]["loss"], rel=1e-5)
    scalars, _ = read_events(tmp_path / "off" / "train")
    assert not any(t.startswith("curvature/") for t in scalars)


def test_curvature_asked_for_without_its_hook_is_one_line(tmp_path):
    """The trainer runs the hooks its caller passes: a config that asks for curvature, passed
    without the hook, fails before training, naming the field and the way to pass it."""
    config = tiny_config({"num_epochs": 1, "curvature.every_steps": 7})
    with pytest.raises(ConfigError, match=r"^curvature.every_steps=7 asks for curvature during "
                                          r"training, a hook the caller passes"):
        train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_power_iteration_warm_start():
    """Started from the top eigenvector, power iteration stops after one product (its residual
    is already below tol); a zero start counts as none (a Lanczos start); the values agree with
    the cold start."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(50, 50)))
    eig = np.concatenate([[10.0, 6.0], rng.uniform(-1, 3, 48)])
    h = jnp.asarray((q * eig) @ q.T, jnp.float32)
    calls = []

    def matvec(v):
        calls.append(1)
        return h @ v

    cold = power_iteration(matvec, 50, 1, jax.random.PRNGKey(0), max_iters=200, tol=1e-5)
    cold_calls = len(calls)
    calls.clear()
    warm = power_iteration(matvec, 50, 1, jax.random.PRNGKey(1), max_iters=200, tol=1e-5,
                           start=cold.vectors[0])
    assert len(calls) == warm.products == 1 < cold_calls == cold.products
    assert cold.all_converged and warm.all_converged
    assert cold.values[0] == pytest.approx(10.0, rel=1e-5)
    assert warm.values[0] == pytest.approx(10.0, rel=1e-5)
    zero = power_iteration(matvec, 50, 2, jax.random.PRNGKey(2), max_iters=300, tol=1e-5,
                           start=np.zeros(50, np.float32))
    np.testing.assert_allclose(zero.values, [10.0, 6.0], rtol=1e-4)


def test_power_iteration_with_fewer_products_than_pairs():
    """A budget below k (one product, two pairs) spans fewer Krylov directions than pairs asked
    for: each pair still comes back, with its residual and marked unconverged."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    h = jnp.asarray((q * np.linspace(-2.0, 9.0, 20)) @ q.T, jnp.float32)
    pairs = power_iteration(lambda v: h @ v, 20, 3, jax.random.PRNGKey(0), max_iters=1,
                            tol=1e-6)
    assert pairs.values.shape == (3,) and pairs.vectors.shape == (3, 20)
    assert np.all(np.isfinite(pairs.residuals)) and not pairs.all_converged
    np.testing.assert_allclose(pairs.vectors @ pairs.vectors.T, np.eye(3), atol=1e-5)


@pytest.mark.parametrize("field,value,words", [
    ("every_steps", -1, "curvature.every_steps=-1 is invalid; expected an integer >= 0"),
    ("every_steps", 2.5, "curvature.every_steps=2.5 is invalid"),
    ("num_examples", 0, "curvature.num_examples=0 is invalid; expected an integer >= 1"),
    ("power_iters", 1, "curvature.power_iters=1 is invalid; expected an integer >= 2"),
    ("cold_iters", 0, "curvature.cold_iters=0 is invalid; expected an integer >= 2"),
    ("tol", 0.0, "curvature.tol=0.0 is invalid; expected a number > 0 and < 1"),
    ("tol", float("nan"), "curvature.tol=nan is invalid"),
    ("trace_samples", 1, "curvature.trace_samples=1 is invalid; expected 0 (no trace) or at "
                         "least 2"),
    ("trace_samples", -3, "curvature.trace_samples=-3 is invalid"),
])
def test_bad_curvature_values_are_one_line(field, value, words):
    config = tiny_config()
    config.curvature = ml_collections.ConfigDict({**config.curvature.to_dict(), field: value})
    with pytest.raises(ConfigError) as e:
        validate_train_config(config)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


def test_unknown_curvature_field_is_named():
    config = tiny_config()
    with config.unlocked():
        config.curvature.every = 5
    with pytest.raises(ConfigError, match="^curvature.every is not a field of curvature; its "
                                          "fields are every_steps, num_examples"):
        validate_train_config(config)


@pytest.mark.slow
def test_bad_curvature_value_on_the_command_line_is_one_line():
    out = cli("experiments.train", "--config=configs/base.py",
              "--config.curvature.power_iters=1", "--workdir=/nonexistent/never")
    one_line_error(out, "curvature.power_iters=1", ">= 2")


def curvature_cli(workdir, failpoint=None):
    env = {k: v for k, v in os.environ.items() if k != "DLASSIGN_FAILPOINT"}
    if failpoint:
        env["DLASSIGN_FAILPOINT"] = failpoint
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config=configs/base.py",
         "--config.num_epochs=2", "--config.checkpoint_every_steps=10",
         "--config.log_every_steps=4", "--config.curvature.every_steps=5",
         "--config.curvature.num_examples=200", "--config.num_cpu_devices=2",
         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)


@pytest.mark.slow
def test_curvature_survives_a_kill_and_resume_once_each(tmp_path):
    """SIGKILL at step 27 (checkpoint 20; curvature at 25 already logged), then resume: the
    entries of steps 5..20 come from the checkpoint, 25 and on are measured again, each step
    once in results.json and in TensorBoard, with the values of an uninterrupted run (within
    the power iteration's tolerance: the first measurement after the resume starts cold)."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    out = curvature_cli(reference)
    assert out.returncode == 0, out.stderr[-2000:]
    killed = curvature_cli(resumed, "after_step:27")
    assert killed.returncode == -signal.SIGKILL
    before, _ = read_events(resumed / "train")
    assert steps_of(before, "curvature/top_eigenvalue") == [5, 10, 15, 20, 25]
    out = curvature_cli(resumed)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step 20" in out.stderr

    want = json.loads((reference / "results.json").read_text())
    got = json.loads((resumed / "results.json").read_text())
    total = want["steps"]  # 2 x 1347 // 64
    assert total == 42
    steps = list(range(5, total + 1, 5))
    assert [e["step"] for e in got["curvature"]] == steps == [e["step"] for e in
                                                             want["curvature"]]
    # 5..20 are the killed run's measurements, kept in checkpoint 20
    np.testing.assert_allclose([e["top_eigenvalue"] for e in got["curvature"][:4]],
                               [v for _, v in before["curvature/top_eigenvalue"][:4]], rtol=1e-6)
    np.testing.assert_allclose([e["top_eigenvalue"] for e in got["curvature"]],
                               [e["top_eigenvalue"] for e in want["curvature"]], rtol=5e-3)
    scalars, _ = read_events(resumed / "train")
    assert steps_of(scalars, "curvature/top_eigenvalue") == steps
    np.testing.assert_allclose([v for _, v in scalars["curvature/top_eigenvalue"]],
                               [e["top_eigenvalue"] for e in got["curvature"]], rtol=1e-6)


@pytest.mark.slow
def test_two_processes_measure_what_one_process_measures(tmp_path):
    """`experiments.launch` with two processes of two devices against one process of four:
    the same sample, placed with `parallel.global_batch` over the mesh, the same values."""
    from tests.test_multiprocess import launched, ok, results, run

    args = ["experiments.train", "--config=configs/base.py", "--config.num_epochs=1",
            "--config.log_every_steps=7", "--config.checkpoint_every_steps=7",
            "--config.curvature.every_steps=7", "--config.curvature.num_examples=200",
            "--config.curvature.trace_samples=3"]
    ok(run(*args, f"--workdir={tmp_path / 'one'}", "--config.num_cpu_devices=4",
           "--config.mesh.num_devices=4"))
    ok(launched(2, *args, f"--workdir={tmp_path / 'two'}"))
    one, two = results(tmp_path / "one")["curvature"], results(tmp_path / "two")["curvature"]
    assert [e["step"] for e in one] == [e["step"] for e in two] == [7, 14, 21]
    for name in ("top_eigenvalue", "trace"):
        np.testing.assert_allclose([e[name] for e in two], [e[name] for e in one], rtol=1e-4)
