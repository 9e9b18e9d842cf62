"""The main job's worker processes and the launcher's processes, through the real entry points:
a bad block, a busy workdir, a killed worker, a killed parent, a killed launcher and a failing
process 0 each end in one line and a known status, and leave no process behind."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import descendants, still_running
from tests.test_faults import one_line_error

ROOT = Path(__file__).resolve().parents[1]
MAIN = [sys.executable, "-m", "experiments.main"]
LAUNCH_TRAIN = [sys.executable, "-m", "experiments.launch", "--processes=2",
                "--devices_per_process=1", "--", "experiments.train", "--config=configs/base.py",
                "--config.num_epochs=50", "--config.checkpoint_every_steps=5"]


class Watched:
    """A subprocess whose stderr is collected line by line while it runs."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, seconds: float = 240) -> re.Match:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            assert self.proc.poll() is None, "".join(self.lines)[-4000:]
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in {''.join(self.lines)[-4000:]}")

    def finish(self, seconds: float = 300) -> str:
        self.proc.wait(timeout=seconds)
        self._reader.join(timeout=10)
        return "".join(self.lines)


def _hold(workdir: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\n"
         "from dlassign.runtime.workdir import WorkdirLock\n"
         f"with WorkdirLock({str(workdir)!r}):\n"
         "    print('locked', flush=True); time.sleep(300)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_bad_field_of_a_main_job_block_is_named_with_its_block(tmp_path):
    out = subprocess.run(MAIN + [f"--workdir={tmp_path / 'main'}",
                                 "--config.tune_cnn.num_epochs=0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    one_line_error(out, "tune_cnn.num_epochs=0 is invalid")
    assert "SpawnProcess" not in out.stderr
    assert not (tmp_path / "main").exists()  # refused before any worker started


def test_a_second_main_job_on_a_workdir_is_refused_in_one_line(tmp_path):
    holder = _hold(tmp_path)
    try:
        out = subprocess.run(MAIN + [f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        one_line_error(out, f"workdir {str(tmp_path)!r} is in use by process {holder.pid}")
        assert "SpawnProcess" not in out.stderr
        assert not (tmp_path / "tune_cnn").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_killed_worker_of_the_main_job_is_one_line_naming_its_study(tmp_path):
    job = Watched(MAIN + [f"--workdir={tmp_path}"])
    try:
        pid = int(job.wait_for(r"tune_cnn: started in process (\d+)").group(1))
        job.wait_for(r"transfer_resnet18: started in process")
        time.sleep(2)
        os.kill(pid, signal.SIGKILL)
        stderr = job.finish()
    finally:
        job.proc.kill()
    assert job.proc.returncode == 75, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-4000:]
    assert "study 'tune_cnn' was killed by SIGKILL" in errors[0]
    assert "Rerun the same command" in errors[0]


def _kill_and_expect_nothing_left(parent, run: list[int]) -> None:
    """SIGKILL `parent`; none of the processes `run` may be alive 10 s later."""
    parent.kill()
    parent.wait()
    left = still_running(run, 10)
    assert not left, [Path(f"/proc/{p}/cmdline").read_text() for p in left]


def _kill_all(parent, run: list[int]) -> None:
    parent.kill()
    for pid in still_running(run, 0):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_killing_the_main_jobs_parent_leaves_no_process(tmp_path):
    job = Watched(MAIN + [f"--workdir={tmp_path}"])
    run = []
    try:
        job.wait_for(r"tune_cnn: started in process")
        job.wait_for(r"transfer_resnet18: started in process")
        run = descendants(job.proc.pid)
        assert len(run) >= 3, run  # two workers and the resource tracker
        _kill_and_expect_nothing_left(job.proc, run)
    finally:
        _kill_all(job.proc, run)


@pytest.mark.slow
def test_killing_the_launcher_leaves_no_process(tmp_path):
    launcher = Watched(LAUNCH_TRAIN + [f"--workdir={tmp_path}"])
    run = []
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "checkpoints" / "5").is_dir() and time.monotonic() < deadline:
            assert launcher.proc.poll() is None, "".join(launcher.lines)[-4000:]
            time.sleep(0.2)
        run = descendants(launcher.proc.pid)
        assert len(run) >= 2, run
        _kill_and_expect_nothing_left(launcher.proc, run)
    finally:
        _kill_all(launcher.proc, run)


@pytest.mark.slow
def test_the_launcher_reports_process_0s_error_at_once(tmp_path):
    holder = _hold(tmp_path)
    try:
        start = time.monotonic()
        out = subprocess.run(LAUNCH_TRAIN + [f"--workdir={tmp_path}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - start
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, out.stderr[-4000:]
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("[p0] error:")]
    assert len(errors) == 1 and f"in use by process {holder.pid}" in errors[0], out.stderr
    assert "peer process" not in out.stderr
    assert elapsed < 30, elapsed  # not the shutdown barrier's wait (40 s and more before)
