"""Independent studies side by side in worker processes, so a job of many small programs uses
every core.

One JAX process running small programs keeps about one core busy: Python dispatches each step,
and XLA compiles one program at a time. The main job's studies share nothing but the workdir, so
`run_tasks` hands them to a pool of spawned processes (each its own JAX runtime) and returns
their results in the order given. Tasks start in that order as workers come free: put the
longest first. A task can wait for others (`Task.after`), e.g. a comparison of two runs.

Workers end with their parent however it dies (`runtime.lifeline`), exit quietly when stopped
between tasks, and a worker that dies mid-task is reported as one error naming its task
(`WorkerDied`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from absl import logging

from dlassign.errors import ConfigError, DlassignError
from dlassign.runtime import lifeline


@dataclasses.dataclass(frozen=True)
class Task:
    """`fn(*args)` under `name`; `fn` must be importable by its module and name (a spawned
    worker looks it up) and its arguments and result picklable. `after` names earlier tasks
    it waits for: it starts once they have finished and is called with their results after
    its own arguments, `fn(*args, *results)`."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()


def check_workers(workers) -> int:
    """`workers` as a count of processes.

    Raises:
      ConfigError: not a whole number of at least 1; names the value.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r}: expected a whole number of processes, at "
                          "least 1 (1 runs every study in this process, one after another)")
    return workers


def _given(task: Task, results: dict[str, Any]) -> Task:
    """`task` with the results of the tasks it is after appended to its arguments."""
    return dataclasses.replace(task, args=(*task.args, *(results[n] for n in task.after)))


def _timed(task: Task):
    start = time.perf_counter()
    logging.info("%s: started in process %d", task.name, os.getpid())
    result = task.fn(*task.args)
    logging.info("%s: finished in %.1f s", task.name, time.perf_counter() - start)
    return result


class WorkerDied(DlassignError):
    """A worker process ended in the middle of a study (killed, out of memory, crashed)."""

    exit_status = 75  # EX_TEMPFAIL: worth a rerun


POLL_SECONDS = 0.5  # how often the parent looks for a worker that died

# In a worker process: whether a task is running (a SIGTERM between tasks ends it at once), and
# the queue that tells the parent which task runs in which process.
_busy = threading.Event()
_started: list = []


def _start_worker(setup: Callable[[], None] | None, parent: int, started) -> None:
    """A worker's first call: `setup`, then its signals, then a watch on the parent."""
    _started.append(started)
    if setup is not None:
        setup()
    # Ctrl-C in a terminal reaches the whole process group; the parent stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inner = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        if _busy.is_set() and callable(inner):
            inner(signum, frame)  # a training study saves its finished steps and stops
        else:  # between tasks there is nothing to save and no traceback to print
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    lifeline.watch(parent, idle=lambda: not _busy.is_set())


def _in_worker(task: Task) -> Any:
    _busy.set()
    try:
        _started[0].put((task.name, os.getpid()))
        return _timed(task)
    finally:
        _busy.clear()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def run_tasks(tasks: Sequence[Task], workers: int, setup: Callable[[], None] | None = None,
              ) -> dict[str, Any]:
    """Runs `tasks`, `workers` at a time; {name: result} in the order of `tasks`.

    With one worker the tasks run in this process, one after another (`setup` is then the
    caller's business). With more, each worker is a spawned process that first calls `setup`
    (an importable function: logging, devices, the compilation cache), and ends when this
    process dies, however it dies (`runtime.lifeline`).

    The first task to raise stops the job: tasks not yet started are cancelled, the running
    ones get SIGTERM (a training study saves its finished steps and stops,
    `runtime.preemption`), and its exception is raised here. Ctrl-C, or a SIGTERM to this
    process, stops the workers the same way.

    Raises:
      WorkerDied: a worker process ended in the middle of a task; names the task.
    """
    check_workers(workers)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique: {names}")
    for i, t in enumerate(tasks):
        if not set(t.after) <= set(names[:i]):
            raise ValueError(f"task {t.name!r} waits for {sorted(set(t.after) - set(names[:i]))}"
                             f", which are not among the tasks before it: {names[:i]}")
    if workers == 1 or len(tasks) <= 1:
        results = {}
        for t in tasks:
            results[t.name] = _timed(_given(t, results))
        return results
    context = multiprocessing.get_context("spawn")  # a fresh JAX runtime, never a forked one
    size = min(workers, len(tasks))
    started = context.SimpleQueue()  # (task name, worker pid) as each task starts
    others = {p.pid for p in multiprocessing.active_children()}
    procs: dict[int, multiprocessing.process.BaseProcess] = {}  # this pool's workers by pid
    pool = concurrent.futures.ProcessPoolExecutor(
        size, mp_context=context, initializer=_start_worker, initargs=(setup, os.getpid(), started))
    waiting, running, results = list(tasks), {}, {}
    try:
        while waiting or running:
            # submitted one by one as workers come free, so none waits queued behind another
            ready = [t for t in waiting if set(t.after) <= results.keys()]
            while ready and len(running) < size:
                task = ready.pop(0)
                waiting.remove(task)
                running[pool.submit(_in_worker, _given(task, results))] = task.name
                procs.update({p.pid: p for p in multiprocessing.active_children()
                              if p.pid not in others})
            done, _ = concurrent.futures.wait(running, timeout=POLL_SECONDS,
                                              return_when="FIRST_COMPLETED")
            if not done and any(p.exitcode is not None for p in procs.values()):
                # The pool watches only the workers it had when it last began to wait, so
                # one spawned for a later task dies unseen until another task's result
                # arrives (test_a_worker_spawned_for_a_later_task_is_seen_when_killed).
                raise _died(procs, started, list(running.values()))
            for f in done:
                if isinstance(f.exception(), BrokenProcessPool):
                    raise _died(procs, started, [running[g] for g in running]) from None
                if f.exception() is not None:
                    raise f.exception()
                results[running.pop(f)] = f.result()
        return {name: results[name] for name in names}
    except BaseException:
        for p in procs.values():
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:  # it ended since: the error to raise is the task's
                    pass
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _died(procs: dict, started, running: list[str]) -> WorkerDied:
    """The error for a pool broken by a worker's death: the task that worker was running."""
    where = {}
    while not started.empty():
        name, pid = started.get()
        where[pid] = name
    # The others end by the SIGTERM they handle, with a status. The pool may report the death
    # a moment before the dead process can be reaped: give it that moment.
    deadline = time.monotonic() + 2.0
    while True:
        dead = [(where[pid], p.exitcode) for pid, p in procs.items()
                if pid in where and where[pid] in running and p.exitcode is not None
                and p.exitcode < 0]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if dead:
        what = "; ".join(f"the worker process of study {name!r} {_describe_exit(code)}"
                         for name, code in dead)
    else:
        what = (f"a worker process ended in the middle of study "
                f"{' or '.join(repr(n) for n in running)}")
    return WorkerDied(f"{what} (out of memory, or killed from outside); the other studies were "
                      "stopped. Rerun the same command: finished training steps resume from "
                      "their checkpoints")
