"""Stopping a run cleanly when the scheduler asks: SIGTERM saves the finished steps and exits.

SLURM, Kubernetes and preemptible VMs send SIGTERM some seconds before they kill. Within a
training loop (`deferred`) the handler only records the request, and the loop checks it between
calls (`requested`), so a save never starts halfway through a step or a checkpoint write;
elsewhere SIGTERM stops the process at once, as Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_stop = threading.Event()
_deferring = threading.Event()


def _handler(signum, frame) -> None:
    del frame
    _stop.set()
    if not _deferring.is_set():  # outside a training loop nothing saves: stop at once
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """Within it, SIGTERM only records the request for the loop to act on between calls."""
    _deferring.set()
    try:
        yield
    finally:
        _deferring.clear()


def install() -> None:
    """Routes SIGTERM to a stop request (call once, from the main thread of an entry point)."""
    signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    """Whether a stop was requested since the process started."""
    return _stop.is_set()
