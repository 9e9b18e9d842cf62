"""Child processes that end when the process that started them dies, however it dies.

A SIGKILL of a parent leaves its children running as orphans: a worker of the main job would
finish its study and then wait forever for the next one, a process started by
`experiments.launch` would keep training with the workdir locked. `watch(parent)` starts a
thread that polls `os.getppid()`: once the parent is gone (the child has been handed to another
parent), it asks this process to stop as a scheduler does, with SIGTERM (a training saves its
finished steps and stops), and ends it once `idle()` says there is nothing left to finish, or
after `grace` seconds.

A launcher passes its pid in `DLASSIGN_PARENT_PID`; the entry point's `watch_environment()`
(called by `experiments.common.prepare_platform`) takes it from there.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

from absl import logging

ENV = "DLASSIGN_PARENT_PID"
POLL_SECS = 0.25
# Time to save the finished steps after the parent's death. A save cut short by the exit is
# what a SIGKILL would leave: the newest finished checkpoint stays the latest.
GRACE_SECS = 5.0


def watch(parent: int, idle: Callable[[], bool] = lambda: False,
          grace: float = GRACE_SECS) -> threading.Thread:
    """Starts the thread that stops this process once `parent` is no longer its parent.

    Args:
      parent: the pid of the process whose death ends this one (it must be this process's
        parent: a pid alone could be reused).
      idle: whether this process has nothing left to finish; polled after the SIGTERM, so that
        it ends as soon as it is true rather than after the whole grace.
      grace: seconds after the SIGTERM before the process ends regardless.
    """

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECS)
        logging.warning("the parent process %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and not idle():
            time.sleep(POLL_SECS)
        os._exit(128 + signal.SIGTERM)

    thread = threading.Thread(target=run, name="lifeline", daemon=True)
    thread.start()
    return thread


def environment() -> dict[str, str]:
    """The environment entry that makes a child started by this process watch it."""
    return {ENV: str(os.getpid())}


def watch_environment() -> None:
    """Watches the parent named in `DLASSIGN_PARENT_PID`, if any; the variable is removed, so
    this process's own children do not watch their grandparent."""
    raw = os.environ.pop(ENV, "")
    if raw.isdigit():
        watch(int(raw))
