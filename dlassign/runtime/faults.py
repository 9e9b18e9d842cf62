"""Failpoints: deterministic crashes for the kill-and-resume tests.

Set DLASSIGN_FAILPOINT to make a run SIGKILL itself at a chosen moment, as a power cut or an
out-of-memory kill would:

* `after_step:N`       right after training step N is dispatched, before its checkpoint;
* `sigterm_after_step:N` sends itself SIGTERM there instead, as a scheduler would;
* `checkpoint_write:N` while checkpoint N is being written (once Orbax's temporary directory
                       exists, before it is renamed into place);
* `sigint_checkpoint_write:N` sends itself SIGINT there instead, as Ctrl-C would;
* `pause_checkpoint_write:N` stops itself (SIGSTOP) there, until a SIGCONT: a save caught in
                       the middle, for a reader to meet;
* `slow_call:S`        not a crash: every training call lasts S seconds more per step, a
                       stand-in for a model whose steps are slow (the stop tests).

In a multi-process run a failpoint fires in every process, or with a suffix `@P` (e.g.
`after_step:5@1`) only in process P.

Unset (the normal case), every check is a dictionary lookup that returns at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "DLASSIGN_FAILPOINT"


def _armed(point: str, step: int) -> bool:
    spec = os.environ.get(ENV, "")
    if not spec:
        return False
    spec, _, process = spec.partition("@")
    if process:
        import jax  # started by now: failpoints fire inside a run

        if process != str(jax.process_index()):
            return False
    return spec == f"{point}:{step}"


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def after_step(step: int) -> None:
    if _armed("after_step", step):
        kill_now()
    if _armed("sigterm_after_step", step):
        os.kill(os.getpid(), signal.SIGTERM)


def during_call(steps: int) -> None:
    """Inside a training call's timed span: `slow_call:S` sleeps S seconds per step."""
    spec = os.environ.get(ENV, "")
    if spec.startswith("slow_call:"):
        time.sleep(float(spec.partition(":")[2]) * steps)


def during_checkpoint_write(step: int, directory: str) -> None:
    """Starts a watcher that signals the process once step's temporary directory appears."""
    actions = {"checkpoint_write": signal.SIGKILL, "sigint_checkpoint_write": signal.SIGINT,
               "pause_checkpoint_write": signal.SIGSTOP}
    armed = [sig for point, sig in actions.items() if _armed(point, step)]
    if not armed:
        return

    def watch():
        prefix = f"{step}.orbax-checkpoint-tmp"
        while True:
            if any(name.startswith(prefix) for name in os.listdir(directory)):
                os.kill(os.getpid(), armed[0])
                return
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()
