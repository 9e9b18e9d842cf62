"""Stopping a run cleanly when the scheduler asks: SIGTERM saves the finished steps and exits.

SLURM, Kubernetes and preemptible VMs send SIGTERM some seconds before they kill. The handler
only records the request; the training loop checks it between calls (`requested`), so a save
never starts halfway through a step or a checkpoint write.
"""

from __future__ import annotations

import signal
import threading

_stop = threading.Event()


def _handler(signum, frame) -> None:
    del frame
    _stop.set()


def install() -> None:
    """Routes SIGTERM to a stop request (call once, from the main thread of an entry point)."""
    signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    """Whether a stop was requested since the process started."""
    return _stop.is_set()
