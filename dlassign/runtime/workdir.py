"""One process per workdir: an exclusive lock held for the process's life.

The lock is `fcntl.flock` on `WORKDIR/.lock`, which the operating system releases when the
process dies however it dies, so a stale lock of a killed run is simply taken over. The file
records who holds it, for the message a second process gets.

Readers (evaluate, the Hessian spectrum, the landscape) take no lock: they may read a workdir
while its run trains. Only the holder tidies it (`holds`): a reader that removed a temporary
folder would pull it from under the save that is writing it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

import jax

from dlassign.errors import DlassignError

LOCK_NAME = ".lock"
_held: set[str] = set()  # the workdirs this process holds the lock of, while it holds them


class WorkdirBusy(DlassignError):
    """Another live process holds the workdir."""


def check_workdir(workdir: str) -> None:
    """A workdir must be a directory this process can create and write; checked before any
    data is read or any compute starts.

    Raises:
      DlassignError: it is a file, or it cannot be created or written; names it.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise DlassignError(f"workdir {workdir!r} is a file; expected a directory (new or "
                            "holding a run)")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, LOCK_NAME), "a"):
            pass
    except OSError as e:
        raise DlassignError(f"workdir {workdir!r} is not writable ({e.strerror}); pass a "
                            "--workdir this user can write") from None


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir exclusively (process 0 of a multi-process
    run holds it for all of them)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() != 0:  # process 0 holds it for every process of the run
            _held.add(os.path.realpath(self.workdir))
            return self
        check_workdir(self.workdir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise WorkdirBusy(f"workdir {self.workdir!r} is in use by {holder}; wait for it to "
                              "finish or pass another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(sys.argv), "since": time.time()}).encode())
        self._fd = fd
        _held.add(os.path.realpath(self.workdir))
        return self

    def __exit__(self, *exc) -> None:
        _held.discard(os.path.realpath(self.workdir))
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holds(path: str) -> bool:
    """Whether this process holds the lock of `path` or of a workdir that contains it (in a
    multi-process run: whether its process 0 holds it for the run)."""
    path = os.path.realpath(path)
    return any(path == w or path.startswith(w.rstrip(os.sep) + os.sep) for w in _held)


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"process {info.get('pid')} on {info.get('host')} ({info.get('command', '')[:120]})"
