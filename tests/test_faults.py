"""Faults found by hand, replayed: every bad input to an entry point ends in one line, exit 2,
no traceback, naming what was wrong; random damage to any local file format or checkpoint
file is a named error, never a crash (hypothesis)."""

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlassign.data import load_split
from dlassign.errors import CheckpointError, DataError
from dlassign.runtime.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist_idx(folder: Path, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(
            idx_bytes(rng.integers(0, 255, (n, 28, 28))))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n) % 10))


def write_svhn_mat(folder: Path, n: int = 4) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        savemat(folder / f"{split}_32x32.mat",
                {"X": rng.integers(0, 255, (32, 32, 3, n)).astype(np.uint8),
                 "y": (np.arange(n) % 10 + 1)[:, None]})


def cli(module: str, *args: str):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def one_line_error(out, *needles: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def _cases(tmp: Path):
    """(entry point, arguments, words the error must hold) for each fault."""
    (tmp / "bad_config.py").write_text("def get_config(:\n")
    (tmp / "a_file").write_text("not a directory")
    idx = tmp / "idx_cut"
    idx.mkdir()
    write_mnist_idx(idx)
    (idx / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    npz = tmp / "npz_cut"
    npz.mkdir()
    buffer = io.BytesIO()
    np.savez(buffer, x_train=np.zeros((5, 28, 28), np.uint8), y_train=np.zeros(5, np.uint8),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.zeros(2, np.uint8))
    (npz / "mnist.npz").write_bytes(buffer.getvalue()[:200])
    empty_mat = tmp / "mat_empty"
    empty_mat.mkdir()
    for split in ("train", "test"):
        (empty_mat / f"{split}_32x32.mat").write_bytes(b"")
    mat73 = tmp / "mat73"
    mat73.mkdir()
    for split in ("train", "test"):
        (mat73 / f"{split}_32x32.mat").write_bytes(
            b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 ." + b"\0" * 200)
    work = str(tmp / "work")
    return [
        ("experiments.train", ["--config=configs/nope.py", f"--workdir={work}"],
         ["configs/nope.py", "no such file"]),
        ("experiments.train", [f"--config={tmp}/bad_config.py", f"--workdir={work}"],
         ["bad_config.py", "line 1"]),
        ("experiments.train", ["--config=configs/base.py", "--config.foo=1", f"--workdir={work}"],
         ["'foo'", "optimizer", "batch_size"]),
        ("experiments.train", ["--config=configs/base.py", "--config.optimizer.lr=1",
                               f"--workdir={work}"], ["'optimizer.lr'", "learning_rate"]),
        ("experiments.train", ["--config=configs/base.py", f"--workdir={tmp}/a_file"],
         ["a_file", "is a file"]),
        ("experiments.train", ["--config=configs/base.py", "--config.optimizer.learning_rate=nan",
                               f"--workdir={work}"], ["optimizer.learning_rate=nan", "finite"]),
        ("experiments.train", ["--config=configs/base.py", "--config.data.subset_fraction=nan",
                               f"--workdir={work}"], ["data.subset_fraction=nan"]),
        ("experiments.train", ["--config=configs/mnist_mlp.py", f"--config.data.data_dir={idx}",
                               f"--workdir={work}"], ["train-images-idx3-ubyte", "cut short"]),
        ("experiments.train", ["--config=configs/mnist_mlp.py", f"--config.data.data_dir={npz}",
                               f"--workdir={work}"], ["mnist.npz"]),
        ("experiments.train", ["--config=configs/svhn.py:lenet5",
                               f"--config.data.data_dir={empty_mat}", f"--workdir={work}"],
         ["train_32x32.mat"]),
        ("experiments.train", ["--config=configs/svhn.py:lenet5",
                               f"--config.data.data_dir={mat73}", f"--workdir={work}"],
         ["train_32x32.mat", "MATLAB (v5)"]),
        ("experiments.evaluate", [f"--workdir={tmp}/a_file"], ["a_file"]),
    ]


@pytest.mark.slow
def test_bad_input_to_an_entry_point_is_one_line_exit_2(tmp_path):
    for module, args, needles in _cases(tmp_path):
        out = cli(module, *args)
        one_line_error(out, *needles)
    assert not (tmp_path / "work" / "checkpoints").exists()  # all refused before any training


def test_state_dict_of_the_wrong_rank_is_named(tmp_path):
    torch = pytest.importorskip("torch")
    from dlassign.porting.torch_models import build

    state = build("lenet5").state_dict()
    state["conv1.weight"] = state["conv1.weight"][0]
    torch.save(state, tmp_path / "lenet5.pth")
    out = cli("experiments.port_weights", "--arch=lenet5",
              f"--torch_checkpoint={tmp_path}/lenet5.pth", f"--output={tmp_path}/out")
    one_line_error(out, "conv1.weight", "3-d", "4-d")


def _damage(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(data[: max(0, len(data) - cut)] if cut >= 0 else data + b"\0" * -cut)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    return bytes(data)


damage = st.tuples(st.integers(-64, 4096),
                   st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                            max_size=8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["idx", "idx.gz", "npz", "mat"]), change=damage,
       victim=st.integers(0, 3))
def test_damaged_local_files_raise_data_error_only(fmt, change, victim):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        if fmt.startswith("idx"):
            write_mnist_idx(folder)
            files = sorted(folder.iterdir())
            if fmt == "idx.gz":
                for f in files:
                    f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
                    f.unlink()
                files = sorted(folder.iterdir())
            name, splits = "mnist", ("train", "test")
        elif fmt == "npz":
            np.savez(folder / "mnist.npz", x_train=np.zeros((5, 28, 28), np.uint8),
                     y_train=np.arange(5), x_test=np.zeros((2, 28, 28), np.uint8),
                     y_test=np.arange(2))
            files, name, splits = [folder / "mnist.npz"], "mnist", ("train", "test")
        else:
            write_svhn_mat(folder)
            files, name, splits = sorted(folder.iterdir()), "svhn_cropped", ("train", "test")
        target = files[victim % len(files)]
        target.write_bytes(_damage(target.read_bytes(), *change))
        for split in splits:
            try:
                load_split(name, split, data_dir=str(folder))
            except DataError:
                pass


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    state = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(8, np.float32)}
    with Checkpointer(str(folder)) as ckpt:
        ckpt.save(1, state, {"config": {}})
        ckpt.save(2, {k: v + 1 for k, v in state.items()}, {"config": {}})
    return folder, state


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(change=damage, victim=st.integers(0, 1000))
def test_damaged_checkpoint_files_fall_back_or_raise_checkpoint_error(saved_checkpoint, change,
                                                                      victim):
    folder, state = saved_checkpoint
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "checkpoints"
        shutil.copytree(folder, copy)
        files = sorted(p for p in (copy / "2").rglob("*") if p.is_file())
        target = files[victim % len(files)]
        target.write_bytes(_damage(target.read_bytes(), *change))
        abstract = {k: np.zeros_like(v) for k, v in state.items()}
        with Checkpointer(str(copy)) as ckpt:
            try:
                tree, meta = ckpt.restore_latest(abstract)
            except CheckpointError:
                return
        # whatever was damaged, what comes back is a verified checkpoint
        expected = state if meta["step"] == 1 else {k: v + 1 for k, v in state.items()}
        for k in state:
            np.testing.assert_array_equal(np.asarray(tree[k]), expected[k])
        assert os.path.isdir(copy)


def test_a_step_without_its_manifest_is_incomplete_and_skipped(saved_checkpoint, tmp_path, caplog):
    """A kill after Orbax renamed a step into place but before the manifest was written leaves
    a step that never finished saving: restoring falls back to the step before it."""
    folder, state = saved_checkpoint
    copy = tmp_path / "checkpoints"
    shutil.copytree(folder, copy)
    (copy / "2" / "dlassign_files.json").unlink()
    with Checkpointer(str(copy)) as ckpt:
        tree, meta = ckpt.restore_latest({k: np.zeros_like(v) for k, v in state.items()})
    assert meta["step"] == 1
    np.testing.assert_array_equal(np.asarray(tree["w"]), state["w"])
    assert any("its save never finished" in r.getMessage() for r in caplog.records)


def test_checkpoint_meta_is_strict_json_with_non_finite_numbers_as_null(tmp_path):
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the meta JSON"))

    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, {"w": np.ones(2, np.float32)},
                  {"history": [{"loss": float("nan"), "grad_norm": float("inf")}], "ok": 0.5})
        meta = ckpt.read_meta(1)
    on_disk = strict((tmp_path / "1" / "meta" / "metadata").read_text())
    assert on_disk["history"] == meta["history"] == [{"loss": None, "grad_norm": None}]
    assert on_disk["ok"] == 0.5
