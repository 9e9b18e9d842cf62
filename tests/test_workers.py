"""Studies side by side in worker processes (`dlassign.runtime.workers`, the main job's runner)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlassign.errors import ConfigError
from dlassign.runtime.workers import Task, WorkerDied, check_workers, run_tasks
from tests.helpers import descendants, still_running

ROOT = Path(__file__).resolve().parents[1]

_SETUP = {"called": False}


def _setup():
    _SETUP["called"] = True


def _where(delay: float = 0.0) -> tuple[int, bool]:
    time.sleep(delay)
    return os.getpid(), _SETUP["called"]


def _fail(message: str):
    raise ValueError(message)


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


def test_tasks_run_in_set_up_worker_processes_and_come_back_in_the_order_given():
    # the first task sleeps, so the two workers overlap and the results arrive out of order
    tasks = [Task("slow", _where, (1.0,)), Task("a", _where), Task("b", _where)]
    out = run_tasks(tasks, workers=2, setup=_setup)
    assert list(out) == ["slow", "a", "b"]
    pids = {pid for pid, _ in out.values()}
    assert os.getpid() not in pids and len(pids) == 2
    assert all(called for _, called in out.values())  # setup ran in each worker
    assert not _SETUP["called"]  # and not here


def test_one_worker_runs_the_tasks_here_one_after_another():
    out = run_tasks([Task("a", _where), Task("b", _where)], workers=1)
    assert [pid for pid, _ in out.values()] == [os.getpid()] * 2


def test_a_failing_task_raises_its_error_and_cancels_the_tasks_not_started(tmp_path):
    later = tmp_path / "later"
    tasks = [Task("fails", _fail, ("bad value 3",)), Task("runs", _where, (1.5,)),
             Task("later", _touch, (str(later),))]
    with pytest.raises(ValueError, match="bad value 3"):
        run_tasks(tasks, workers=2)
    assert not later.exists()


def test_a_worker_that_ends_before_its_sigterm_does_not_hide_the_error(monkeypatch):
    """Between `is_alive` and the SIGTERM a worker may end; the task's error still comes out."""
    import dlassign.runtime.workers as workers

    def gone(pid, sig):
        raise ProcessLookupError(pid)

    monkeypatch.setattr(workers.os, "kill", gone)
    tasks = [Task("fails", _fail, ("bad value 4",)), Task("runs", _where, (1.5,))]
    with pytest.raises(ValueError, match="bad value 4"):
        run_tasks(tasks, workers=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_a_bad_worker_count_names_the_value(bad):
    with pytest.raises(ConfigError, match=f"workers={bad!r}.*at least 1"):
        check_workers(bad)


def test_task_names_must_be_unique():
    with pytest.raises(ValueError, match="unique"):
        run_tasks([Task("a", _where), Task("a", _where)], workers=2)


def _ended(path: str) -> float:
    time.sleep(0.5)
    with open(path, "w") as f:
        f.write(str(time.time()))
    return time.time()


def _started_after(path: str, first: float) -> tuple[bool, float, float]:
    return os.path.exists(path), time.time(), first


@pytest.mark.parametrize("workers", [1, 2])
def test_a_task_waits_for_the_tasks_it_is_after_and_gets_their_results(tmp_path, workers):
    done = tmp_path / "done"
    tasks = [Task("first", _ended, (str(done),)), Task("other", _where, (1.5,)),
             Task("then", _started_after, (str(done),), after=("first",))]
    out = run_tasks(tasks, workers=workers)
    seen, started, given = out["then"]
    assert seen and started >= out["first"]  # it began once "first" had finished
    assert given == out["first"]  # and was called with its result


def test_a_task_after_an_unknown_or_later_task_is_refused():
    with pytest.raises(ValueError, match="'then' waits for \\['later'\\]"):
        run_tasks([Task("then", _where, after=("later",)), Task("later", _where)], workers=2)


def _install_preemption():
    from dlassign.runtime import preemption

    preemption.install()  # as the entry points' workers do (`experiments.common.worker_setup`)


def _kill_self():
    time.sleep(0.5)  # the other task has started by now
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_mid_task_names_its_task():
    tasks = [Task("victim", _kill_self), Task("bystander", _where, (3.0,))]
    with pytest.raises(WorkerDied) as e:
        run_tasks(tasks, workers=2, setup=_install_preemption)
    assert "worker process of study 'victim' was killed by SIGKILL" in str(e.value)
    assert "bystander" not in str(e.value) and "Rerun the same command" in str(e.value)
    assert e.value.exit_status == 75


def test_a_worker_spawned_for_a_later_task_is_seen_when_killed():
    """The pool spawns its second worker after it began to wait on the first and missed that
    one's death until the first task ended (the main job waited minutes for a long study)."""
    tasks = [Task("bystander", _where, (60.0,)), Task("victim", _kill_self)]
    started = time.monotonic()
    with pytest.raises(WorkerDied) as e:
        run_tasks(tasks, workers=2, setup=_install_preemption)
    assert time.monotonic() - started < 30
    assert "worker process of study 'victim' was killed by SIGKILL" in str(e.value)


def test_an_idle_worker_stopped_after_a_failure_prints_no_traceback(capfd):
    """One task fails while the other worker waits for work: it is stopped with SIGTERM, and
    must not print 'Process SpawnProcess-N: Traceback ... KeyboardInterrupt'."""
    tasks = [Task("fails", _fail_later, ("bad value 5",)), Task("quick", _where)]
    with pytest.raises(ValueError, match="bad value 5"):
        run_tasks(tasks, workers=2, setup=_install_preemption)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def _fail_later(message: str):
    time.sleep(1.0)  # the other worker has finished its task and waits
    raise ValueError(message)


def _report_and_sleep(folder: str, seconds: float) -> None:
    with open(os.path.join(folder, str(os.getpid())), "w"):
        pass
    time.sleep(seconds)


PARENT = """
import sys
from dlassign.runtime.workers import Task, run_tasks
from tests.test_workers import _install_preemption, _report_and_sleep
_install_preemption()
run_tasks([Task("long", _report_and_sleep, (sys.argv[1], 300.0)),
           Task("short", _report_and_sleep, (sys.argv[1], 0.0))], workers=2,
          setup=_install_preemption)
"""


def test_workers_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL of the parent: the busy worker and the idle one, and the resource tracker, are
    all gone within 10 s (before, both workers waited forever)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    run = []
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(os.listdir(tmp_path)) == 2, "the workers did not start"
        time.sleep(0.5)  # the short task's worker is idle now
        run = descendants(parent.pid)
        assert len(run) >= 3, run  # two workers and the resource tracker
        parent.kill()
        parent.wait()
        left = still_running(run, 10)
        assert not left, [open(f"/proc/{p}/cmdline").read() for p in left]
    finally:
        for pid in still_running(run, 0):
            os.kill(pid, signal.SIGKILL)
