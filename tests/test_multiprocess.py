"""Multi-process runs for real: several JAX processes on this machine, joined through JAX's
distributed runtime (gloo collectives on CPU), started by `experiments.launch`.

Each comparison is against one process with as many devices as the processes have together,
so the only difference is where the devices live.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dlassign.runtime.checkpoint import Checkpointer
from experiments import launch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["experiments.train", "--config=configs/base.py", "--config.num_epochs=1",
         "--config.log_every_steps=7", "--config.checkpoint_every_steps=7",
         "--config.model.hidden_sizes=(256,)"]  # 16k weights in the first layer: shardable
HEARTBEAT = 10  # seconds, for the lost-process test

def run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def launched(processes: int, *command: str, devices: int = 0, env=None
             ) -> subprocess.CompletedProcess:
    devices = devices or 4 // processes
    return run("experiments.launch", f"--processes={processes}",
               f"--devices_per_process={devices}", "--", *command, env=env)


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def final_state(workdir: Path) -> dict:
    with Checkpointer(str(workdir / "checkpoints")) as ckpt:
        state, _ = ckpt.restore_raw(ckpt.steps()[-1])
    return state


def assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    import jax

    la, lb = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)
    assert int(a["step"]) == int(b["step"])


def results(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process with four devices, with and without sharded parameters."""
    out = {}
    for shard in (False, True):
        workdir = tmp_path_factory.mktemp(f"one_process_shard{shard}")
        ok(run(*TRAIN, f"--workdir={workdir}", "--config.num_cpu_devices=4",
               "--config.mesh.num_devices=4", f"--config.mesh.shard_params={shard}"))
        out[shard] = workdir
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shard", [False, True])
def test_two_processes_train_like_one_process(reference, tmp_path, shard):
    ok(launched(2, *TRAIN, f"--workdir={tmp_path}", f"--config.mesh.shard_params={shard}"))
    mine, theirs = results(tmp_path), results(reference[shard])
    assert mine["num_devices"] == 4
    np.testing.assert_allclose([h["loss"] for h in mine["history"]],
                               [h["loss"] for h in theirs["history"]], rtol=1e-5)
    assert mine["test"]["accuracy"] == theirs["test"]["accuracy"]
    assert_same_state(final_state(tmp_path), final_state(reference[shard]))
    # process 0 alone wrote the results and the TensorBoard events
    assert sorted(p.parent.name for p in tmp_path.glob("*/events.out.tfevents*")) == [
        "test", "train"]


@pytest.mark.slow
def test_four_processes_of_one_device_train_like_one_process(reference, tmp_path):
    ok(launched(4, *TRAIN, f"--workdir={tmp_path}", devices=1))
    assert_same_state(final_state(tmp_path), final_state(reference[False]))


@pytest.mark.slow
def test_sigterm_saves_at_one_step_and_checkpoints_move_between_2_1_2_processes(
        reference, tmp_path):
    # SIGTERM reaches process 1 alone; both stop at the same call and save it together.
    # One step per call: JAX spreads the notice in the background, and the run must still be
    # going when it arrives (on a loaded machine 21 steps in calls of 8 can finish first).
    stopped = launched(2, *TRAIN, f"--workdir={tmp_path}", "--config.steps_per_call=1",
                       env={"DLASSIGN_FAILPOINT": "sigterm_after_step:3@1"})
    assert stopped.returncode == 143, stopped.stderr[-4000:]
    assert stopped.stderr.count("stopped by SIGTERM") == 2, stopped.stderr[-4000:]
    assert "Traceback" not in stopped.stderr
    first = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 < first < 21
    # written by two processes, resumed by one (one device) and stopped again ...
    again = run(*TRAIN, f"--workdir={tmp_path}", "--config.steps_per_call=1",
                env={"DLASSIGN_FAILPOINT": f"sigterm_after_step:{first + 1}"})
    assert again.returncode == 143, again.stderr[-4000:]
    assert f"resumed from step {first}" in again.stderr
    second = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert first < second < 21
    # ... and finished by two processes again.
    done = ok(launched(2, *TRAIN, f"--workdir={tmp_path}"))
    assert f"resumed from step {second}" in done.stderr
    assert_same_state(final_state(tmp_path), final_state(reference[False]), atol=1e-5)
    assert results(tmp_path)["test"]["accuracy"] == results(reference[False])["test"]["accuracy"]


@pytest.mark.slow
def test_a_killed_process_ends_the_others_and_a_rerun_resumes(reference, tmp_path):
    env = {"DLASSIGN_FAILPOINT": "after_step:10@1"}  # process 1 SIGKILLs itself at step 10
    command = [*TRAIN, f"--workdir={tmp_path}"]
    start = time.monotonic()
    procs = launch.spawn(command, 2, 2, heartbeat_timeout=HEARTBEAT, cwd=ROOT,
                         env_overrides=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        survivor_err = procs[0].communicate(timeout=HEARTBEAT + 120)[1].decode()
        victim_err = procs[1].communicate(timeout=30)[1].decode()
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - start
    assert procs[1].returncode == -9, victim_err[-4000:]
    assert elapsed < HEARTBEAT + 120
    if procs[0].returncode == 75:
        # the survivor's collective failed first: our one line
        errors = [line for line in survivor_err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "peer process" in errors[0], survivor_err[-4000:]
        assert "Traceback" not in survivor_err
    else:
        # the survivor waited in a collective until JAX's heartbeat timeout ended it
        assert procs[0].returncode == -6, survivor_err[-4000:]
        assert "another task died" in survivor_err, survivor_err[-4000:]
    assert (tmp_path / "checkpoints" / "7").is_dir()
    rerun = ok(launched(2, *command))
    assert "resumed from step 7" in rerun.stderr
    assert_same_state(final_state(tmp_path), final_state(reference[False]))


@pytest.mark.slow
def test_launcher_stops_the_others_when_one_process_fails(tmp_path):
    out = launched(2, *TRAIN, f"--workdir={tmp_path}",
                   env={"DLASSIGN_FAILPOINT": "after_step:5@0"})
    assert out.returncode == 128 + 9, out.stderr[-4000:]
    # process 1 is stopped by the launcher, or ends by itself in the same 50 ms poll when its
    # collective notices the dead peer first
    assert ("launch: process 0 was killed by SIGKILL; stopping the other 1" in out.stderr
            or "launch: process 0 was killed by SIGKILL\n" in out.stderr), out.stderr[-4000:]


def test_supervise_names_the_first_failure_whether_or_not_others_are_left(capsys, monkeypatch):
    """A failed process is named with its signal; the others are killed if still running, and
    a failure the others followed within one poll is still named."""
    monkeypatch.setattr(launch.signal, "signal", lambda *args: None)  # the test's own handlers
    py = lambda code: subprocess.Popen([sys.executable, "-c", code])
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    procs = [py(killed), py("raise SystemExit(3)")]
    for p in procs:
        p.wait()  # both ended before the first poll
    assert launch.supervise(procs, grace=5) == 128 + 9
    assert "launch: process 0 was killed by SIGKILL\n" in capsys.readouterr().err
    procs = [py(killed), py("import time; time.sleep(60)")]
    procs[0].wait()
    assert launch.supervise(procs, grace=5) == 128 + 9
    assert "launch: process 0 was killed by SIGKILL; stopping the other 1" in (
        capsys.readouterr().err)
    assert procs[1].returncode == -9


@pytest.mark.slow
def test_grid_search_across_processes_matches_one_process(tmp_path):
    config = tmp_path / "tiny_tune.py"
    config.write_text(
        "from configs import base\n\n\ndef get_config():\n    c = base.get_config()\n"
        "    c.num_epochs = 1\n    c.batch_size = 32\n    c.eval_batch_size = 100\n"
        "    c.log_every_steps = 0\n    c.tune = dict(num_folds=2, mode='auto', grid={'model':"
        " {'hidden_sizes': [(16,), (32,)]}})\n    return c\n")
    one, two = tmp_path / "one", tmp_path / "two"
    ok(run("experiments.tune", f"--config={config}", f"--workdir={one}",
           "--config.num_cpu_devices=2", "--config.mesh.num_devices=2"))
    out = ok(launched(2, "experiments.tune", f"--config={config}", f"--workdir={two}",
                      devices=1))
    assert out.stdout.count("| hidden_sizes |") == 1  # only process 0 prints the table
    a, b = results(one), results(two)
    for x, y in zip(a["cells"], b["cells"]):
        assert x["params"] == y["params"]
        np.testing.assert_allclose(x["fold_accuracies"], y["fold_accuracies"], atol=1e-9)
    assert a["best"] == b["best"] and a["test"] == b["test"]


@pytest.mark.slow
def test_hessian_and_evaluation_of_a_checkpoint_across_processes(reference):
    workdir = reference[False]  # written by one process with four devices
    flags = ["--num_examples=256", "--batch_size=64", "--top_k=1", "--power_iters=30",
             "--lanczos_order=10", "--num_draws=1", "--trace_samples=2"]
    # the file the entry point writes (process 0 alone), not stdout, where gloo's own lines
    # may land inside the printed JSON
    written = workdir / "hessian_spectrum.json"
    ok(run("experiments.hessian_spectrum", f"--workdir={workdir}", *flags))
    single = json.loads(written.read_text())
    written.unlink()
    ok(launched(2, "experiments.hessian_spectrum", f"--workdir={workdir}", *flags))
    multi = json.loads(written.read_text())
    np.testing.assert_allclose(multi["top_eigenvalues"], single["top_eigenvalues"], rtol=1e-4)
    np.testing.assert_allclose(multi["trace"], single["trace"], rtol=1e-4)


@pytest.mark.slow
def test_slurm_tasks_join_without_the_launcher(reference, tmp_path):
    """What `srun --ntasks=2 python -m experiments.train ... --distributed` sets up: JAX finds
    the coordinator, process count and index in SLURM's variables."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", *TRAIN, f"--workdir={tmp_path}", "--distributed"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "SLURM_JOB_ID": str(4000 + os.getpid() % 90),
             "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
             "DLASSIGN_NUM_CPU_DEVICES": "2"}) for i in range(2)]
    try:
        errs = [p.communicate(timeout=300)[1].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    assert results(tmp_path)["num_devices"] == 4
    assert_same_state(final_state(tmp_path), final_state(reference[False]))


def test_single_process_entry_points_refuse_distributed(tmp_path):
    out = run("experiments.convexity", "--config=configs/convexity.py",
              f"--workdir={tmp_path}", "--distributed")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        line for line in out.stderr.strip().splitlines() if line.startswith("error:")]
    assert "runs in one process" in out.stderr


def test_launcher_rejects_bad_input():
    for args, words in [(["--"], "no entry point given"),
                        (["--", "experiments.nope"], "no entry point 'experiments.nope'"),
                        (["--processes=0", "--", "experiments.train"], "--processes=0")]:
        out = run("experiments.launch", *args)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error:") and words in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_distributed_environment_errors_are_one_line(tmp_path):
    out = run("experiments.train", "--config=configs/base.py", f"--workdir={tmp_path}",
              "--distributed", env={"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    assert out.returncode == 2
    assert "JAX_PROCESS_ID=2 is out of range for JAX_NUM_PROCESSES=2" in out.stderr
    assert "Traceback" not in out.stderr
