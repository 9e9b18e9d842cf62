"""The step profiler (benchmarks/profile_step.py): its HLO parsing and its time shares."""

import gzip
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from benchmarks.profile_step import hlo_ops, op_times

ROOT = Path(__file__).resolve().parents[1]


def _trace(directory: Path, events: list[dict]) -> None:
    path = directory / "plugins" / "profile" / "run"
    path.mkdir(parents=True)
    with gzip.open(path / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_shares_split_overlapping_time_and_add_up_to_the_busy_time(tmp_path):
    ops = {"a": {"opcode": "fusion", "operands": []}, "b": {"opcode": "fusion", "operands": []},
           "loop": {"opcode": "while", "operands": ["a", "b"]}}
    _trace(tmp_path, [
        {"ph": "X", "name": "a", "ts": 0, "dur": 4000},      # alone for 2 ms, then with b
        {"ph": "X", "name": "b", "ts": 2000, "dur": 4000},   # with a for 2 ms, then alone
        {"ph": "X", "name": "a", "ts": 10000, "dur": 1000},  # the second step's a, alone
        {"ph": "X", "name": "loop", "ts": 0, "dur": 11000},  # control flow: left out
        {"ph": "X", "name": "PjitFunction", "ts": 0, "dur": 500},  # not an op
        {"ph": "i", "name": "a", "ts": 3000},                # not a complete event
    ])
    times = op_times(str(tmp_path), ops, steps=2)
    assert set(times) == {"a", "b"}
    assert times["a"] == pytest.approx({"ms": 2.5, "share_ms": 2.0, "calls": 1.0})
    assert times["b"] == pytest.approx({"ms": 2.0, "share_ms": 1.5, "calls": 0.5})
    # 7 ms of the trace have some op running: 3.5 ms per step
    assert times["a"]["share_ms"] + times["b"]["share_ms"] == pytest.approx(3.5)


def test_an_asynchronous_dot_ends_when_its_first_consumer_starts(tmp_path):
    # XLA:CPU's Eigen dots: the event is the launch; the result's first user starts when the
    # product is done, and the runtime logs "end: d" only after starting that user
    ops = {"d": {"opcode": "dot", "operands": ["x"]},
           "view": {"opcode": "bitcast", "operands": ["d"]},       # not in the trace
           "f": {"opcode": "fusion", "operands": ["view", "g"]},
           "g": {"opcode": "fusion", "operands": []},
           "lone": {"opcode": "dot", "operands": []}}               # no traced consumer
    _trace(tmp_path, [
        {"ph": "X", "name": "d", "ts": 0, "dur": 100},
        {"ph": "X", "name": "g", "ts": 500, "dur": 1000},    # runs beside d
        {"ph": "X", "name": "f", "ts": 3000, "dur": 1000},
        {"ph": "X", "name": "end: d", "ts": 4100, "dur": 1},
        {"ph": "X", "name": "lone", "ts": 5000, "dur": 100},
        {"ph": "X", "name": "end: lone", "ts": 6000, "dur": 1},
    ])
    times = op_times(str(tmp_path), ops, steps=1)
    assert times["d"]["ms"] == pytest.approx(3.0)              # 0 to f's start
    assert times["d"]["share_ms"] == pytest.approx(2.5)        # 1 ms of it shared with g
    assert times["f"] == pytest.approx({"ms": 1.0, "share_ms": 1.0, "calls": 1.0})
    assert times["lone"]["ms"] == pytest.approx(1.0)           # up to its end marker


def test_missing_trace_is_named(tmp_path):
    with pytest.raises(RuntimeError, match="no \\*.trace.json.gz under"):
        op_times(str(tmp_path), {}, steps=1)


def test_hlo_ops_reads_opcodes_shapes_and_sources_of_a_compiled_program():
    def f(x, w):
        def body(carry):
            i, y = carry
            return i + 1, jnp.tanh(y @ w)
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]

    x = jnp.ones((4, 8))
    ops = hlo_ops(jax.jit(f).lower(x, jnp.ones((8, 8))).compile().as_text())
    loops = [op for op in ops.values() if op["opcode"] == "while"]
    assert loops and loops[0]["shape"].startswith("(")  # a tuple result type
    products = [op for op in ops.values() if op["source"].endswith("dot_general")]
    # the product's instruction (and the fusion around it, if any), layout {1,0} dropped
    assert products and {op["shape"] for op in products} == {"f32[4,8]"}
    assert {op["opcode"] for op in products} <= {"dot", "fusion"}
    assert all(op["kind"] for op in ops.values() if op["opcode"] == "fusion")


@pytest.mark.slow
def test_profile_step_runs_and_names_the_layers_and_the_optimizer(tmp_path):
    out = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--models=mlp128", "--steps=8",
         "--steps_per_call=4", "--batch_size=32", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    sources = {r["source"] for r in rows}
    assert any("dense0/dot_general" in s for s in sources)
    assert any(s.startswith("optimizer/") for s in sources)
    assert all(r["share_ms"] <= r["ms"] + 1e-9 and r["calls"] > 0 for r in rows)


def test_step_rewrites_times_each_plain_form_in_its_own_program(tmp_path):
    """Each plain form changes the compiled step (the benchmark checks that itself and stops
    otherwise) and gets a row."""
    out = tmp_path / "rewrites.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_rewrites", "--models=lenet5", "--rounds=1",
         "--steps=2", "--steps_per_call=1", "--batch_size=8", f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["rewrite"] for r in rows] == ["dense", "pool_first"]
    assert all(r["ours"] > 0 and r["plain"] > 0 for r in rows)


def test_checkpoint_save_times_each_save_of_a_real_train_state(tmp_path):
    out = tmp_path / "saves.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.checkpoint_save", "--models=lenet5", "--saves=2",
         f"--json={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["model"] == "lenet5" and len(row["each"].split(", ")) == 2
    assert 0.2 < row["mib"] < 2 and row["median"] > 0  # 62k parameters and their moments


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
