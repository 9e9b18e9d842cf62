"""Studies side by side in worker processes (`dlassign.runtime.workers`, the main job's runner)."""

import os
import time

import pytest

from dlassign.errors import ConfigError
from dlassign.runtime.workers import Task, check_workers, run_tasks

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
