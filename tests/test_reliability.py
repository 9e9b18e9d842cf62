"""Runs survive SIGKILL, damaged checkpoints are caught, bad input fails fast and clearly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlassign.errors import CheckpointError
from dlassign.runtime.checkpoint import Checkpointer
from dlassign.runtime.workdir import WorkdirLock
from dlassign.training.setup import abstract_tree, make_state, setup
from dlassign.training.trainer import train_and_evaluate
from tests.helpers import checkpoint_steps, restore_checkpoint, synthetic_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "experiments.train", "--config=configs/base.py",
         "--config.num_epochs=3", "--config.checkpoint_every_steps=10",
         "--config.log_every_steps=10", "--config.num_cpu_devices=2"]


def _env(failpoint=None) -> dict:
    env = dict(os.environ)
    env.pop("DLASSIGN_FAILPOINT", None)
    if failpoint:
        env["DLASSIGN_FAILPOINT"] = failpoint
    return env


def train_cli(workdir, failpoint=None, extra=()):
    return subprocess.run(TRAIN + [f"--workdir={workdir}", *extra], cwd=ROOT,
                          env=_env(failpoint), capture_output=True, text=True, timeout=300)


def evaluate_cli(workdir):
    return subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def final_state(workdir):
    """(step, SHA-256 of every array's path, dtype, shape and bytes) of the newest checkpoint."""
    import hashlib

    import jax

    with Checkpointer(str(Path(workdir) / "checkpoints")) as ckpt:
        step = ckpt.steps()[-1]
        tree, _ = ckpt.restore_raw(step)
    h = hashlib.sha256()
    for path, leaf in sorted((jax.tree_util.keystr(p), x)
                             for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]):
        h.update(f"{path}:{leaf.dtype}{leaf.shape}".encode() + np.ascontiguousarray(leaf).tobytes())
    return step, h.hexdigest()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    out = train_cli(workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", ["after_step:15", "checkpoint_write:30", "after_step:42"])
def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(reference, tmp_path, failpoint):
    killed = train_cli(tmp_path, failpoint)
    assert killed.returncode == -signal.SIGKILL
    steps_left = checkpoint_steps(tmp_path / "checkpoints")
    kill_step = int(failpoint.split(":")[1])
    assert steps_left and max(steps_left) < kill_step  # the killed step's checkpoint never landed
    resumed = train_cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stderr
    assert final_state(tmp_path) == final_state(reference)  # same step, same SHA-256 of state
    a = json.loads((tmp_path / "results.json").read_text())["test"]
    b = json.loads((reference / "results.json").read_text())["test"]
    assert a == b


@pytest.mark.slow
def test_same_seed_same_metrics(reference, tmp_path):
    again = train_cli(tmp_path)
    assert again.returncode == 0
    assert final_state(tmp_path) == final_state(reference)


def _damage_latest(workdir) -> int:
    ckpt_dir = Path(workdir) / "checkpoints"
    latest = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    # One flipped byte in the middle of every data file of the state (OCDBT's d/ folders).
    files = [p for p in (ckpt_dir / str(latest) / "state").rglob("*")
             if p.is_file() and p.parent.name == "d"]
    assert files
    for victim in files:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    return latest


def test_damaged_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    data = synthetic_dataset()
    config = tiny_config()
    train_and_evaluate(config, str(tmp_path), data)
    latest = _damage_latest(tmp_path)
    run = setup(config, data)
    # the holder of the workdir (the training run) moves damage aside; a reader only falls back
    with WorkdirLock(str(tmp_path)), Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
        state, meta = ckpt.restore_latest(abstract_tree(make_state(run)), config.to_dict())
    assert meta["step"] < latest
    assert any("falling back" in r.getMessage() for r in caplog.records)
    # moved aside, not deleted: the step number is free to be written again
    assert not (tmp_path / "checkpoints" / str(latest)).exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "damaged_checkpoints").iterdir()] == [
        str(latest)]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["arrays", "metadata", "stray_step", "temporary"])
def test_any_damage_to_the_newest_step_resumes_to_the_uninterrupted_result(reference, tmp_path,
                                                                          damage):
    """The run is killed after step 15 (checkpoint 10 on disk), then its newest step is
    damaged; the rerun sets the damage aside, retrains, writes that step number again, and ends
    bitwise where an uninterrupted run ends."""
    killed = train_cli(tmp_path, "after_step:25")
    assert killed.returncode == -signal.SIGKILL
    ckpt_dir = tmp_path / "checkpoints"
    if damage == "arrays":
        _damage_latest(tmp_path)
    elif damage == "metadata":
        (ckpt_dir / "20" / "meta" / "metadata").write_text('{"step": 2')
    elif damage == "stray_step":
        (ckpt_dir / "24").mkdir()
        (ckpt_dir / "24" / "junk").write_bytes(b"\x00" * 10)
    else:
        (ckpt_dir / "30.orbax-checkpoint-tmp-1234").mkdir()
    resumed = train_cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert final_state(tmp_path) == final_state(reference)
    assert not list(ckpt_dir.glob("*orbax-checkpoint-tmp*"))
    if damage != "temporary":
        assert list((tmp_path / "damaged_checkpoints").iterdir())
    evaluated = subprocess.run([sys.executable, "-m", "experiments.evaluate",
                                f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    data = synthetic_dataset()
    config = tiny_config({"keep_checkpoints": 1})
    train_and_evaluate(config, str(tmp_path), data)
    _damage_latest(tmp_path)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train_and_evaluate(config, str(tmp_path), data)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    data = synthetic_dataset()
    train_and_evaluate(tiny_config(), str(tmp_path), data)
    other = tiny_config({"model.hidden_sizes": (64,), "model.activation": "tanh"})
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(other, str(tmp_path), data)
    msg = str(e.value)
    assert "model.hidden_sizes: checkpoint has [32], this run has [64]" in msg
    assert "model.activation: checkpoint has 'relu', this run has 'tanh'" in msg


@pytest.mark.slow
def test_one_vs_eight_devices_agree(tmp_path):
    data = synthetic_dataset()
    one = train_and_evaluate(tiny_config({"mesh.num_devices": 1}), str(tmp_path / "one"), data)
    eight = train_and_evaluate(tiny_config({"mesh.num_devices": 8}), str(tmp_path / "eight"), data)
    assert (one["num_devices"], eight["num_devices"]) == (1, 8)
    np.testing.assert_allclose([h["loss"] for h in one["history"]],
                               [h["loss"] for h in eight["history"]], rtol=1e-5)
    run = setup(tiny_config(), data)
    abstract = abstract_tree(make_state(run))
    a, _ = restore_checkpoint(tmp_path / "one" / "checkpoints", abstract)
    b, _ = restore_checkpoint(tmp_path / "eight" / "checkpoints", abstract)
    for x, y in zip(jax_leaves(a["params"]), jax_leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_batch_minor_cnn_on_one_device_agrees_with_nhwc_on_eight(tmp_path):
    """The CPU's default for the CNN (batch-minor, one device) against the layout `setup` gives
    it on a mesh of eight (NHWC): the same losses and parameters, and no all-gather."""
    import dataclasses

    import jax

    from dlassign.runtime import parallel
    from dlassign.training.setup import compile_steps

    data = synthetic_dataset(size=12)
    model = {"name": "cnn", "conv_features": (4, 8), "dense_width": 16, "padding": "same"}
    configs = {}
    for n in (0, 8):
        configs[n] = tiny_config({"mesh.num_devices": n, "num_epochs": 1})
        configs[n].model = dict(model)
    runs = {n: setup(c, data) for n, c in configs.items()}
    from dlassign.kernels import Placed

    assert runs[0].mesh.devices.size == 1 and runs[0].model.layout.batch_minor
    assert runs[8].mesh.devices.size == 8 and not runs[8].model.layout.batch_minor
    for batch_minor in (True, False):  # batch-minor would all-gather the sharded patches
        placed = runs[8].model
        model = Placed(placed.model, dataclasses.replace(placed.layout, batch_minor=batch_minor))
        run = dataclasses.replace(runs[8], model=model)
        state = make_state(run)
        step, _ = compile_steps(run, state)
        batch = jax.device_put({"image": data.train.images[:32], "label": data.train.labels[:32]},
                               parallel.batch_sharding(run.mesh))
        assert ("all-gather" in step.lower(state, batch).compile().as_text()) == batch_minor
    results = {n: train_and_evaluate(c, str(tmp_path / str(n)), data) for n, c in configs.items()}
    np.testing.assert_allclose([h["loss"] for h in results[0]["history"]],
                               [h["loss"] for h in results[8]["history"]], rtol=1e-5)
    abstract = abstract_tree(make_state(runs[0]))
    a, _ = restore_checkpoint(tmp_path / "0" / "checkpoints", abstract)
    b, _ = restore_checkpoint(tmp_path / "8" / "checkpoints", abstract)
    for x, y in zip(jax_leaves(a["params"]), jax_leaves(b["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_sharded_checkpoint_restores_on_one_device(tmp_path):
    data = synthetic_dataset()
    config = tiny_config({"mesh.num_devices": 8, "mesh.shard_params": True,
                          "mesh.cpu_data_parallel_max_params": 10**9})
    config.model.hidden_sizes = (64,)
    sharded = train_and_evaluate(config, str(tmp_path / "sharded"), data)
    single = tiny_config({"mesh.num_devices": 1, "mesh.shard_params": True})
    single.model.hidden_sizes = (64,)
    plain = train_and_evaluate(single, str(tmp_path / "single"), data)
    np.testing.assert_allclose([h["loss"] for h in sharded["history"]],
                               [h["loss"] for h in plain["history"]], rtol=1e-5)
    run = setup(single, data)
    abstract = abstract_tree(make_state(run))
    tree, _ = restore_checkpoint(tmp_path / "sharded" / "checkpoints", abstract)
    kernel = tree["params"]["dense0"]["kernel"]
    assert len(kernel.sharding.device_set) == 1
    ref, _ = restore_checkpoint(tmp_path / "single" / "checkpoints", abstract)
    for x, y in zip(jax_leaves(tree["params"]), jax_leaves(ref["params"])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("flag,needle", [
    ("--config.optimizer.learning_rate=-1.0", "optimizer.learning_rate=-1.0 is invalid"),
    ("--config.model.name=resnet19", "unknown model.name 'resnet19'; expected one of"),
    ("--config.data.subset_fraction=1.5", "data.subset_fraction=1.5 is invalid"),
    ("--config.optimzer.learning_rate=0.1", "no config field 'optimzer' (did you mean "
                                            "'optimizer'?)"),
    ("--config.optimizer.learning_rat=0.01", "no config field 'optimizer.learning_rat' (did you "
                                             "mean 'optimizer.learning_rate'?); fields of "
                                             "optimizer: backbone_lr_scale,"),
    ("--config.data.validation_fraction=0.99999", "data.validation_fraction=0.99999 holds out "
                                                  "all 1347 training examples, leaving none"),
    ("--workdri=x", "Unknown command line flag 'workdri'. Did you mean: workdir"),
])
def test_cli_bad_flag_is_one_line_exit_2(tmp_path, flag, needle):
    out = subprocess.run(TRAIN + [f"--workdir={tmp_path}", flag], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists()  # failed before any work


def test_local_files_with_wrong_contents(tmp_path):
    from dlassign.data import load_split
    from dlassign.errors import DataError

    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((5, 32, 32), np.uint8),
             y_train=np.zeros(5), x_test=np.zeros((2, 28, 28), np.float32), y_test=np.zeros(2))
    with pytest.raises(DataError, match=r"images have shape \(5, 32, 32, 1\); expected "
                                        r"\(N, 28, 28, 1\)"):
        load_split("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="images have dtype float32; expected uint8"):
        load_split("mnist", "test", data_dir=str(tmp_path))
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((0, 28, 28), np.uint8),
             y_train=np.zeros(0, np.int64), x_test=np.zeros((2, 28, 28), np.uint8),
             y_test=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="mnist train split from data_dir .* is empty"):
        load_split("mnist", "train", data_dir=str(tmp_path))


def test_main_job_needs_no_download():
    """The README's first command runs on embedded data: every run of configs/main.py reads a
    dataset that loads without a download or a data_dir."""
    from configs import main
    from dlassign.data import dataset_info

    config = main.get_config()
    runs = [config.convexity, config.tune_mlp, config.tune_cnn, config.sharpness,
            *config.transfer.values()]
    for run in runs:
        data = run.data if "data" in run else run
        assert dataset_info(data.name).embedded is not None, data.name
        assert not data.get("data_dir")


def test_second_process_on_a_workdir_is_refused_in_one_line(tmp_path):
    """A live holder of the workdir's lock makes a second run stop at once, naming it; once the
    holder is gone (even killed), the lock is taken over."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from dlassign.runtime.workdir import WorkdirLock\n"
         f"with WorkdirLock({str(tmp_path)!r}):\n"
         "    print('locked', flush=True); time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = train_cli(tmp_path)
        assert second.returncode == 2
        assert "Traceback" not in second.stderr
        error = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and f"process {holder.pid}" in error[0], second.stderr[-2000:]
        assert not (tmp_path / "checkpoints").exists()  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    from dlassign.runtime.workdir import WorkdirLock

    with WorkdirLock(str(tmp_path)):  # the dead holder's lock is taken over
        pass


@pytest.mark.slow
def test_sigterm_saves_then_resume_matches_uninterrupted_run_bitwise(reference, tmp_path):
    stopped = train_cli(tmp_path, "sigterm_after_step:25")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: the finished "
                                                              "steps are saved")
    saved = checkpoint_steps(tmp_path / "checkpoints")
    assert 25 <= max(saved) < 30  # the steps finished before the stop, not a checkpoint step
    resumed = train_cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert final_state(tmp_path) == final_state(reference)


def test_resuming_with_another_training_config_is_refused_unless_asked(tmp_path):
    data = synthetic_dataset()
    train_and_evaluate(tiny_config(), str(tmp_path), data)
    changed = tiny_config({"optimizer.learning_rate": 0.01, "seed": 3,
                           "data.data_dir": "", "log_every_steps": 2})  # the last two: runtime
    with pytest.raises(CheckpointError) as e:
        train_and_evaluate(changed, str(tmp_path), data)
    message = str(e.value)
    assert "optimizer.learning_rate: checkpoint has 0.003, this run has 0.01" in message
    assert "seed: checkpoint has 0, this run has 3" in message
    assert "log_every_steps" not in message and "continue_with_changes=true" in message
    with changed.unlocked():
        changed.continue_with_changes = True
    results = train_and_evaluate(changed, str(tmp_path), data)
    (change,) = results["config_changes"]
    assert change["step"] == results["steps"]  # the finished run, continued with no new steps
    assert sorted(c.split(":")[0] for c in change["changes"]) == ["optimizer.learning_rate",
                                                                    "seed"]


def test_evaluation_that_cannot_fit_in_memory_fails_before_training(tmp_path, monkeypatch):
    from dlassign.errors import ConfigError
    from dlassign.training import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda: 10_000)  # 10 kB left
    with pytest.raises(ConfigError, match=r"eval_batch_size=64 needs about .* GiB to evaluate"):
        train_and_evaluate(tiny_config(), str(tmp_path), synthetic_dataset())
    assert checkpoint_steps(tmp_path / "checkpoints") == []  # nothing trained


def test_disk_without_room_for_a_checkpoint_fails_before_training(tmp_path, monkeypatch):
    import collections
    import shutil as shutil_module

    from dlassign.errors import ConfigError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6, 1000))
    with pytest.raises(ConfigError, match=r"has 0 MiB free; a checkpoint of this run takes"):
        train_and_evaluate(tiny_config(), str(tmp_path), synthetic_dataset())


def _with_preemption(body: str) -> subprocess.CompletedProcess:
    """Runs `body` in a fresh Python process after `preemption.install()` (imported as
    `preemption`, with os, signal and time)."""
    code = ("import os, signal, time\n"
            "from dlassign.runtime import preemption\n"
            "preemption.install()\n" + body)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_sigterm_outside_a_training_loop_stops_at_once():
    """Only the training loop defers SIGTERM (to save between calls); elsewhere it interrupts."""
    out = _with_preemption(
        "with preemption.deferred():\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "assert preemption.requested()\n"
        "print('deferred', flush=True)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n")
    assert out.stdout.split() == ["deferred", "interrupted"], out.stderr[-2000:]


def test_sigterm_inside_a_garbage_collection_callback_still_stops():
    """The handler's KeyboardInterrupt, raised inside a gc callback (JAX registers one), is
    dropped by Python with an "Exception ignored" traceback; it must stop the process all the
    same, with no traceback (a main-job worker stopped while compiling printed one)."""
    out = _with_preemption(
        "import gc\n"
        "fired = []\n"
        "def callback(phase, info):\n"
        "    if phase == 'start' and not fired:\n"
        "        fired.append(1)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        for _ in range(100000): pass  # the handler runs in here\n"
        "gc.callbacks.append(callback)\n"
        "try:\n"
        "    gc.collect()\n"
        "    time.sleep(5)\n"
        "    print('not stopped', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped', preemption.by_sigterm(), flush=True)\n")
    assert out.stdout.split() == ["stopped", "True"], out.stdout + out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


def _stopped(pid: int, seconds: float) -> bool:
    """Waits until process `pid` is stopped (SIGSTOP); whether it was within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_evaluate_during_a_save_leaves_the_live_run_alone(reference, tmp_path):
    """The run stops itself in the middle of writing checkpoint 30 (its temporary folder on
    disk); evaluate reads the newest finished step (20) and removes nothing; the run then
    finishes with the uninterrupted run's parameters."""
    run = subprocess.Popen(TRAIN + [f"--workdir={tmp_path}"], cwd=ROOT,
                           env=_env("pause_checkpoint_write:30"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        assert _stopped(run.pid, 240), "the run never reached checkpoint 30"
        temporaries = sorted((tmp_path / "checkpoints").glob("30.orbax-checkpoint-tmp*"))
        assert temporaries
        evaluated = evaluate_cli(tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        assert json.loads((tmp_path / "eval.json").read_text())["step"] == 20
        assert "interrupted checkpoint save" not in evaluated.stderr
        assert all(p.exists() for p in temporaries)
    finally:
        run.send_signal(signal.SIGCONT)
        _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    assert final_state(tmp_path) == final_state(reference)


@pytest.mark.slow
def test_ctrl_c_during_a_checkpoint_write_exits_130_and_the_rerun_resumes(reference, tmp_path):
    """Ctrl-C while checkpoint 20 is being written (checkpoints at every step): the save
    finishes, the run stops in one line with 130, no traceback; the rerun resumes from it and
    ends where an uninterrupted run ends."""
    stopped = train_cli(tmp_path, "sigint_checkpoint_write:20",
                        ("--config.checkpoint_every_steps=1",))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        "stopped by interrupt: the finished steps are saved; rerun the same command to resume")
    steps = checkpoint_steps(tmp_path / "checkpoints")
    assert 20 <= max(steps) < 25, steps
    assert not list((tmp_path / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    resumed = train_cli(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {max(steps)}" in resumed.stderr
    assert "falling back" not in resumed.stderr  # every checkpoint it left is intact
    assert final_state(tmp_path) == final_state(reference)


def test_ctrl_c_inside_a_checkpoint_write_waits_for_it(tmp_path):
    """Outside a training loop a save is shielded too: Ctrl-C during it lets it finish and
    then stops."""
    out = _with_preemption(
        "try:\n"
        "    with preemption.shielded():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        print('write finished', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('then stopped', preemption.by_sigterm(), flush=True)\n")
    assert out.stdout.splitlines() == ["write finished", "then stopped False"], out.stderr


@pytest.mark.parametrize("damage", ["permission", "fifo"])
def test_an_unreadable_checkpoint_file_falls_back_naming_it(tmp_path, damage, monkeypatch,
                                                            caplog):
    """A file of the newest step that cannot be read (no permission; or a fifo, whose read would
    wait forever): the restore falls back to the previous step, naming the file."""
    from dlassign.runtime import checkpoint

    data = synthetic_dataset()
    config = tiny_config()
    train_and_evaluate(config, str(tmp_path), data)
    steps = checkpoint_steps(tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / str(steps[-1])
    victim = next(p for p in sorted((newest / "state").rglob("*"))
                  if p.is_file() and p.parent.name == "d")
    name = str(victim.relative_to(newest))
    if damage == "fifo":
        victim.unlink()
        os.mkfifo(victim)
    else:
        real_open = open

        def refusing(path, *args, **kwargs):
            if os.path.samefile(path, victim):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "open", refusing, raising=False)
    run = setup(config, data)
    state, meta = restore_checkpoint(tmp_path / "checkpoints", abstract_tree(make_state(run)))
    assert meta["step"] == steps[-2]
    warnings = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    reason = "not a regular file" if damage == "fifo" else "Permission denied"
    assert any(f"{name} cannot be read ({reason})" in w for w in warnings), warnings
    assert newest.exists()  # a reader moves nothing


@pytest.mark.slow
def test_an_unreadable_checkpoint_file_through_evaluate_and_train(reference, tmp_path):
    """A fifo in place of a file of the newest step: evaluate falls back naming it, no
    traceback; the rerun of the training sets the step aside and ends where it ended."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    steps = checkpoint_steps(workdir / "checkpoints")
    newest = workdir / "checkpoints" / str(steps[-1])
    victim = next(p for p in sorted((newest / "state").rglob("*"))
                  if p.is_file() and p.parent.name == "d")
    victim.unlink()
    os.mkfifo(victim)
    name = str(victim.relative_to(newest))
    evaluated = evaluate_cli(workdir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Traceback" not in evaluated.stderr
    assert f"{name} cannot be read (not a regular file)" in evaluated.stderr
    assert json.loads((workdir / "eval.json").read_text())["step"] == steps[-2]
    rerun = train_cli(workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert final_state(workdir) == final_state(reference)
