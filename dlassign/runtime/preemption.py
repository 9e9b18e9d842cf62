"""Stopping a run cleanly when the scheduler asks: SIGTERM saves the finished steps and exits.

SLURM, Kubernetes and preemptible VMs send SIGTERM some seconds before they kill. Within a
training loop (`deferred`) the handler only records the request, and the loop checks it between
calls (`requested`), so a save never starts halfway through a step or a checkpoint write;
elsewhere SIGTERM stops the process at once. Ctrl-C (SIGINT) is treated the same way: raised
in the middle of a checkpoint write it would leave a half-renamed step that the save on the
way out then collides with. A second Ctrl-C stops at once.

In a multi-process run the processes must stop at the same step, or the save would wait forever
for the ones still training. There JAX's distributed runtime owns SIGTERM: a notice to any one
process reaches all of them, and `stop_at(call)` answers True in every process at the same
call (JAX's preemption sync point), after which they save together.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_stop = threading.Event()
_deferring = threading.Event()
_signals: list[int] = []  # the signals that asked to stop, in order


def _handler(signum, frame) -> None:
    del frame
    _stop.set()
    _signals.append(signum)
    if signum == signal.SIGINT and _signals.count(signal.SIGINT) > 1:
        raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
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


@contextlib.contextmanager
def shielded():
    """A write that must not be cut in half (a checkpoint save): a stop request waits until it
    is done. Outside a training loop the stop then happens as the block ends."""
    outer = _deferring.is_set()
    before = len(_signals)
    _deferring.set()
    try:
        yield
    finally:
        if not outer:
            _deferring.clear()
    if not outer and len(_signals) > before:
        raise KeyboardInterrupt


def _redeliver(hook):
    """`sys.unraisablehook` that asks again for a stop that Python dropped: the handler's
    KeyboardInterrupt raised inside a garbage-collection callback or a `__del__` (JAX has one
    of each) is printed as "Exception ignored" and lost. The signal is sent again a moment
    later, from a thread, so the handler runs once more after the callback, in ordinary code
    (raised here, it would be dropped the same way)."""

    def handle(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _signals:
            again = threading.Timer(0.05, signal.pthread_kill,
                                    (threading.main_thread().ident, _signals.pop()))
            again.daemon = True
            again.start()
            return
        hook(unraisable)

    handle.dlassign = True
    return handle


def install() -> None:
    """Routes SIGTERM and SIGINT to a stop request (call once, from the main thread of an entry
    point)."""
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    if not getattr(sys.unraisablehook, "dlassign", False):
        sys.unraisablehook = _redeliver(sys.unraisablehook)


def stop_at(call: int) -> bool:
    """Whether the loop should stop before call number `call` (0, 1, 2, ... in every process
    of a run; the loop asks before each call, in order)."""
    import jax

    if jax.distributed.is_initialized():  # JAX's runtime took SIGTERM over
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(call):
            _stop.set()
            return True
        return False
    return _stop.is_set()


def requested() -> bool:
    """Whether a stop was requested since the process started."""
    return _stop.is_set()


def by_sigterm() -> bool:
    """Whether the stop was a scheduler's (SIGTERM, or JAX's preemption notice in a
    multi-process run) rather than Ctrl-C."""
    return _stop.is_set() and (not _signals or _signals[0] == signal.SIGTERM)
