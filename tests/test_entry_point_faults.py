"""Bad flags to the analysis and porting entry points, replayed through the real entry points:
one `error:` line naming the flag and what is valid, exit 2, no traceback, before any work
(hypothesis fuzzes the numeric flags); every JSON the project writes is strict."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlassign.errors import NumericalError
from dlassign.runtime.files import finite_or_none, write_json
from tests.test_faults import ROOT, cli, one_line_error

MISSING = "/nonexistent/workdir"  # flags are checked before the workdir is read


@pytest.mark.parametrize("flag,needles", [
    ("--batch_size=0", ["--batch_size=0", "positive integer"]),
    ("--batch_size=-1", ["--batch_size=-1", "positive integer"]),
    ("--top_k=0", ["--top_k=0", "positive integer"]),
    ("--lanczos_order=0", ["--lanczos_order=0", "positive integer"]),
    ("--num_draws=0", ["--num_draws=0", "positive integer"]),
    ("--num_examples=0", ["--num_examples=0", "positive integer"]),
    ("--power_iters=0", ["--power_iters=0", "positive integer"]),
    ("--trace_samples=0", ["--trace_samples=0", ">= 2"]),
    ("--trace_samples=1", ["--trace_samples=1", ">= 2"]),
    ("--step=-1", ["--step=-1"]),
    ("--tol=0", ["--tol", "relative residual in (0, 1)"]),
])
def test_hessian_spectrum_bad_flags(flag, needles):
    one_line_error(cli("experiments.hessian_spectrum", f"--workdir={MISSING}", flag), *needles)


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize("flag,needles", [
    ("--batch_size=0", ["--batch_size=0", "positive integer"]),
    ("--sample_size=0", ["--sample_size=0", "positive integer"]),
    ("--span=inf", ["--span=inf", "positive finite"]),
    ("--span=nan", ["--span=nan", "positive finite"]),
    ("--span=0", ["--span=0", "positive finite"]),
    ("--lanczos_order=0", ["--lanczos_order=0", ">= 10"]),
    ("--lanczos_order=9", ["--lanczos_order=9", ">= 10"]),
    ("--num_points=4", ["--num_points=4", "odd"]),
    ("--num_points=1", ["--num_points=1", ">= 3"]),
    ("--dims=3", ["--dims=3"]),
    ("--out={a_file}", ["--out=", "a_file is a file; expected a directory"]),
    ("--out={a_file}/sub", ["--out=", "a_file is a file"]),
])
def test_landscape_bad_flags(a_file, flag, needles):
    one_line_error(cli("experiments.landscape", f"--workdir={MISSING}",
                       flag.format(a_file=a_file)), *needles)


def lenet5_safetensors(path: Path, seed: int) -> dict:
    """A random LeNet-5 state dict in torch's layout, written without torch."""
    from safetensors.numpy import save_file

    shapes = {"conv1.weight": (6, 3, 5, 5), "conv1.bias": (6,), "conv2.weight": (16, 6, 5, 5),
              "conv2.bias": (16,), "fc1.weight": (120, 400), "fc1.bias": (120,),
              "fc2.weight": (84, 120), "fc2.bias": (84,), "fc3.weight": (10, 84),
              "fc3.bias": (10,)}
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    save_file(state, str(path))
    return state


def test_port_weights_bad_outputs(tmp_path, a_file):
    weights = tmp_path / "lenet5.safetensors"
    lenet5_safetensors(weights, 0)
    port = ["--arch=lenet5", f"--torch_checkpoint={weights}"]
    for args, needles in [
        ([*port, f"--output={a_file}"], ["--output=", "a_file is a file"]),
        (["--from_workdir=x", "--export=/missing/dir/x.safetensors"],
         ["--export=/missing/dir/x.safetensors", "/missing/dir does not exist"]),
        (["--from_workdir=x", f"--export={tmp_path}/x.npz"],
         ["x.npz", "expected one of .pth, .pt, .safetensors"]),
        (["--export=x.safetensors"], ["--export needs --from_workdir"]),
    ]:
        one_line_error(cli("experiments.port_weights", *args), *needles)


def test_port_weights_twice_is_refused_and_overwrite_replaces(tmp_path):
    from dlassign.runtime.checkpoint import Checkpointer

    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    lenet5_safetensors(first, 0)
    state = lenet5_safetensors(second, 1)
    out = tmp_path / "ported"
    args = ["--arch=lenet5", f"--output={out}"]
    done = cli("experiments.port_weights", *args, f"--torch_checkpoint={first}")
    assert done.returncode == 0, done.stderr[-2000:]
    again = cli("experiments.port_weights", *args, f"--torch_checkpoint={second}")
    one_line_error(again, f"--output={out} already holds ported weights", "--overwrite")
    replaced = cli("experiments.port_weights", *args, f"--torch_checkpoint={second}",
                   "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert sorted(set(os.listdir(out)) - {".lock"}) == ["checkpoints", "port.json"]  # no staging
    with Checkpointer(str(out / "checkpoints")) as ckpt:
        assert ckpt.steps() == [0]
        tree, meta = ckpt.restore_raw(0)
    assert meta["source"] == str(second)
    # conv1's torch OIHW weight is Flax's HWIO kernel
    np.testing.assert_array_equal(np.asarray(tree["params"]["conv1"]["kernel"]),
                                  state["conv1.weight"].transpose(2, 3, 1, 0))
    training = tmp_path / "training" / "checkpoints"
    (training / "7").mkdir(parents=True)
    refused = cli("experiments.port_weights", "--arch=lenet5", f"--torch_checkpoint={second}",
                  f"--output={training.parent}", "--overwrite")
    one_line_error(refused, "holds other checkpoints", "not a port's")
    assert sorted(os.listdir(training)) == ["7"]


def test_compare_names_a_damaged_or_foreign_results_json(tmp_path, a_file):
    contents = {"cut": '{"model": "mlp", ', "not_training": '{"steps": 3}', "a_list": "[1, 2]",
                "binary": b"\xff\xfe\x00"}
    for name, text in contents.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / "results.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        out = cli("experiments.compare", str(tmp_path / name), f"--output={tmp_path}/cmp")
        one_line_error(out, f"{path}")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("experiments.compare", str(tmp_path / "empty")), "has no results.json")
    one_line_error(cli("experiments.compare", str(tmp_path / "cut"), f"--output={a_file}"),
                   "a_file is a file")


def test_config_help_lists_every_field_and_configs_resolve_from_any_directory(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run(*args):
        return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    listed = run("experiments.train", "--config=configs/base.py", "--config_help",
                 "--config.optimizer.learning_rate=0.25")
    assert listed.returncode == 0, listed.stderr[-2000:]
    lines = listed.stdout.splitlines()
    assert "--config.optimizer.learning_rate=0.25" in lines  # overrides shown applied
    assert "--config.batch_size=64" in lines and "--config.data.name=digits" in lines
    from configs import base

    def count(node):
        return sum(count(v) if hasattr(v, "keys") else 1 for v in node.values())

    assert len([x for x in lines if x.startswith("--config.")]) == count(base.get_config())
    default = run("experiments.sharpness", "--config_help")  # its default configs/sharpness.py
    assert default.returncode == 0 and "--config.lanczos_order=40" in default.stdout
    bad = run("experiments.train", "--config=configs/base.py", f"--workdir={tmp_path}/w",
              "--config.num_epochs=-1")
    one_line_error(bad, "num_epochs=-1")  # the installed configs/base.py was read
    one_line_error(run("experiments.train", "--config_help"), "--config_help needs --config")
    one_line_error(run("experiments.landscape", "--config_help"), "takes no --config")


def _no_traceback(out) -> None:
    assert out.returncode in (0, 2), out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if out.returncode == 2:
        assert len([x for x in out.stderr.splitlines() if x.startswith("error:")]) == 1


counts = st.integers(-3, 12)
spans = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                  st.sampled_from(["inf", "-inf", "nan", "1e400", "0"]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.fixed_dictionaries({
    "num_examples": counts, "batch_size": counts, "lanczos_order": counts, "num_draws": counts,
    "top_k": counts, "power_iters": counts, "trace_samples": counts, "step": counts}))
def test_hessian_spectrum_numeric_flags_fuzzed(flags):
    _no_traceback(cli("experiments.hessian_spectrum", f"--workdir={MISSING}",
                      *(f"--{k}={v}" for k, v in flags.items())))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.fixed_dictionaries({
    "num_points": counts, "dims": counts, "sample_size": counts, "batch_size": counts,
    "lanczos_order": st.integers(-3, 40), "points_per_call": counts, "span": spans}))
def test_landscape_numeric_flags_fuzzed(flags):
    _no_traceback(cli("experiments.landscape", f"--workdir={MISSING}",
                      *(f"--{k}={v}" for k, v in flags.items() if v is not None)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    out = cli("experiments.train", "--config=configs/base.py", f"--workdir={workdir}",
              "--config.num_epochs=1", "--config.num_cpu_devices=1")
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


def _strict(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flags=st.fixed_dictionaries({
    "num_examples": st.integers(1, 80), "batch_size": st.sampled_from([3, 16, 64]),
    "lanczos_order": st.integers(1, 12), "num_draws": st.integers(1, 2),
    "top_k": st.integers(1, 3), "power_iters": st.integers(1, 5),
    "trace_samples": st.integers(2, 4)}),
       bad=st.sampled_from([None, None, "num_examples", "batch_size", "lanczos_order",
                            "num_draws", "top_k", "power_iters", "trace_samples"]),
       bad_value=st.integers(-2, 1))
def test_hessian_spectrum_on_a_checkpoint_fuzzed(trained, flags, bad, bad_value):
    """Against a real checkpoint, with at most one flag out of range: exit 0 with strict,
    finite JSON, or one error line."""
    if bad:
        flags[bad] = bad_value
    (trained / "hessian_spectrum.json").unlink(missing_ok=True)
    out = cli("experiments.hessian_spectrum", f"--workdir={trained}",
              *(f"--{k}={v}" for k, v in flags.items()))
    _no_traceback(out)
    if out.returncode == 0:
        result = _strict(trained / "hessian_spectrum.json")
        assert len(result["top_eigenvalues"]) == flags["top_k"]
        assert math.isfinite(result["trace"]) and math.isfinite(result["trace_standard_error"])


@pytest.mark.slow
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flags=st.fixed_dictionaries({
    "directions": st.sampled_from(["eigen", "random"]), "num_points": st.sampled_from([3, 5]),
    "sample_size": st.integers(1, 80), "batch_size": st.sampled_from([16, 64]),
    "lanczos_order": st.integers(10, 14),
    "span": st.one_of(st.none(), st.floats(1e-3, 3.0), spans)}),
       bad=st.sampled_from([None, None, "num_points", "sample_size", "batch_size",
                            "lanczos_order"]),
       bad_value=st.integers(-2, 4))
def test_landscape_on_a_checkpoint_fuzzed(trained, tmp_path_factory, flags, bad, bad_value):
    if bad:
        flags[bad] = bad_value
    out_dir = tmp_path_factory.mktemp("landscape")
    out = cli("experiments.landscape", f"--workdir={trained}", f"--out={out_dir}",
              *(f"--{k}={v}" for k, v in flags.items() if v is not None))
    _no_traceback(out)
    if out.returncode == 0:
        result = _strict(out_dir / f"landscape_{flags['directions']}_1d.json")
        assert len(result["losses"]) == flags["num_points"]


def test_write_json_refuses_non_finite_numbers_naming_file_and_key(tmp_path):
    path = tmp_path / "r.json"
    with pytest.raises(NumericalError, match=r"r.json not written: runs.1.loss is nan; JSON "
                                             r"holds only finite numbers"):
        write_json(str(path), {"runs": [{"loss": 1.0}, {"loss": float("nan")}]})
    with pytest.raises(NumericalError, match=r"top is inf"):
        write_json(str(path), {"top": np.float64("inf")})
    assert not path.exists() and not (tmp_path / "r.json.tmp").exists()
    assert finite_or_none({"a": [1.0, float("-inf")], "b": (float("nan"), "x")}) == {
        "a": [1.0, None], "b": [None, "x"]}
    write_json(str(path), {"ok": [0.5, None]})
    assert _strict(path) == {"ok": [0.5, None]}


@pytest.mark.parametrize("args,needle", [
    (["--processes=x", "--", "experiments.train"], "--processes"),
    (["--processes=2", "--", "experiments.nope.sub"], "experiments.nope.sub"),
    (["--processes=2", "--", "experiments.common"], "not an entry point"),
    (["--processes=0", "--", "experiments.train"], "--processes=0"),
])
def test_launch_bad_flags_and_entry_points(args, needle):
    """The launcher checks its flags and the entry point before starting anything."""
    out = subprocess.run([sys.executable, "-m", "experiments.launch", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "FATAL" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], out.stderr[-2000:]
