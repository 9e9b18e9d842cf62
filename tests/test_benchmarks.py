"""The benchmarks: the step harness's FLOP count and roofline, the end-to-end pair's settings,
and small runs of each script."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_steps_flops_are_the_models_arithmetic_for_the_whole_batch():
    """The MLP 784-128-10's step at batch 128: its five matrix products (forward, both weight
    gradients, the hidden layer's input gradient) at 2 FLOPs a multiply-add, plus elementwise
    work and Adam, a few percent; counted before partitioning, so the whole batch's."""
    from benchmarks.step import step_flops

    batch = 128
    products = 2 * (2 * batch * (784 * 128 + 128 * 10) + batch * 128 * 10)
    flops = step_flops("mlp128", batch)
    assert products < flops < 1.1 * products, (flops, products)
    # twice the batch: the products double, Adam does not
    assert 1.9 < step_flops("mlp128", 2 * batch) / flops < 2.0


@pytest.mark.slow
def test_step_harness_prints_throughput_and_roofline(tmp_path):
    out = tmp_path / "step.json"
    stdout = _run("benchmarks.step", "--models=mlp128", "--rounds=1", "--steps=1",
                  "--min_round_s=0.01", "--batch_size=16", "--eval_batch_size=16",
                  "--steps_per_call=2", "--peak_size=256", f"--json={out}")
    assert "| model | GFLOP/step | ours GFLOP/s | ours of JAX peak |" in stdout
    (row,) = json.loads(out.read_text())
    assert row["model"] == "mlp128" and row["jax_peak"] > 0 and row["torch_peak"] > 0
    assert row["ours_gflops"] == pytest.approx(
        row["gflop"] * max(row["ours_1"], row["ours_k"]) / 16)
    assert row["torch_of_peak"] == pytest.approx(row["torch_gflops"] / row["torch_peak"])


def test_step_harness_names_an_unknown_model():
    result = subprocess.run([sys.executable, "-m", "benchmarks.step", "--models=mlp128,nope"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown 'nope'" in result.stderr and "mlp128" in result.stderr


@pytest.mark.slow
def test_hessian_and_memory_benchmarks_run(tmp_path):
    _run("benchmarks.hessian", "--models=lenet5", "--batch_size=8", "--rounds=1", "--steps=1",
         f"--json={tmp_path / 'hessian.json'}")
    (row,) = json.loads((tmp_path / "hessian.json").read_text())
    assert row["hvp_ms"] > 0 and row["torch_hvp_ms"] > 0
    _run("benchmarks.memory", "--models=mlp128", "--batch_size=8", "--steps_per_call=2",
         f"--json={tmp_path / 'memory.json'}")
    (row,) = json.loads((tmp_path / "memory.json").read_text())
    assert row["ours_mb"] > 0 and row["torch_mb"] > 0 and row["xla_mb"] > 0


def test_end_to_end_gives_the_pytorch_script_our_configs_settings():
    from benchmarks.end_to_end import commands

    args = SimpleNamespace(data_dir="/mnist", num_epochs=2, subset_fraction=1.0)
    flags = lambda cmd: dict(a[2:].split("=", 1) for a in cmd if a.startswith("--"))
    ours, theirs = map(flags, commands("cnn", args, "/w"))
    assert ours["config"] == "configs/mnist_cnn.py" and ours["config.num_epochs"] == "2"
    assert ours["config.data.data_dir"] == theirs["data_dir"] == "/mnist"
    assert {k: theirs[k] for k in ("model", "optimizer", "learning_rate", "weight_decay",
                                   "schedule", "dropout", "random_crop", "batch_size")} == {
        "model": "cnn", "optimizer": "adamw", "learning_rate": "0.002", "weight_decay": "0.0001",
        "schedule": "cosine", "dropout": "0.3", "random_crop": "2", "batch_size": "128"}
    _, theirs = map(flags, commands("lenet5", args, "/w"))
    assert (theirs["model"], theirs["optimizer"], theirs["pad_to"], theirs["channels"]) == (
        "lenet5", "sgd", "32", "3")
    _, theirs = map(flags, commands("mlp", args, "/w"))
    assert (theirs["dropout"], theirs["random_crop"]) == ("0.2", "0")


def test_end_to_end_torch_shifts_each_image_by_at_most_the_padding():
    import torch

    from benchmarks.end_to_end_torch import shift

    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = shift(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    assert out.shape == x.shape
    for b in range(2):  # each image is one window of its edge-padded self, all channels alike
        assert any(torch.equal(out[b], padded[b, :, i:i + 6, j:j + 6])
                   for i in range(5) for j in range(5))


@pytest.mark.slow
def test_end_to_end_runs_both_processes_and_prints_the_table(tmp_path):
    from tests.test_data import write_mnist

    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist", n_train=256, n_test=50)
    out = tmp_path / "end_to_end.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.end_to_end", f"--data_dir={tmp_path / 'mnist'}",
         "--models=lenet5", "--modes=cold", "--num_epochs=1", "--repeats=1", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| LeNet-5, 32x32x3 (mnist_ported.py:lenet5) | cold |" in result.stdout
    (row,) = json.loads(out.read_text())
    assert row["ours_s"] > 0 and row["torch_s"] > 0 and len(row["ours_runs"]) == 1
    assert 0 <= row["ours_acc"] <= 1 and 0 <= row["torch_acc"] <= 1
