"""Independent studies side by side in worker processes, so a job of many small programs uses
every core.

One JAX process running small programs keeps about one core busy: Python dispatches each step,
and XLA compiles one program at a time. The main job's studies share nothing but the workdir, so
`run_tasks` hands them to a pool of spawned processes (each its own JAX runtime) and returns
their results in the order given. Tasks start in that order as workers come free: put the
longest first. A task can wait for others (`Task.after`), e.g. a comparison of two runs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from dlassign.errors import ConfigError


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


def run_tasks(tasks: Sequence[Task], workers: int, setup: Callable[[], None] | None = None,
              ) -> dict[str, Any]:
    """Runs `tasks`, `workers` at a time; {name: result} in the order of `tasks`.

    With one worker the tasks run in this process, one after another (`setup` is then the
    caller's business). With more, each worker is a spawned process that first calls `setup`
    (an importable function: logging, devices, the compilation cache).

    The first task to raise stops the job: tasks not yet started are cancelled, the running
    ones get SIGTERM (a training study saves its finished steps and stops,
    `runtime.preemption`), and its exception is raised here. Ctrl-C, or a SIGTERM to this
    process, stops the workers the same way.
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
    pool = concurrent.futures.ProcessPoolExecutor(size, mp_context=context, initializer=setup)
    waiting, running, results = list(tasks), {}, {}
    try:
        while waiting or running:
            # submitted one by one as workers come free, so none waits queued behind another
            ready = [t for t in waiting if set(t.after) <= results.keys()]
            while ready and len(running) < size:
                task = ready.pop(0)
                waiting.remove(task)
                running[pool.submit(_timed, _given(task, results))] = task.name
            done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
            for f in done:
                if f.exception() is not None:
                    raise f.exception()
                results[running.pop(f)] = f.result()
        return {name: results[name] for name in names}
    except BaseException:
        # pool._processes: the executor's own record of its worker processes
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:  # it ended since: the error to raise is the task's
                    pass
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
