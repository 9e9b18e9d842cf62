"""Joining a multi-process run: JAX's distributed runtime, its timeouts, and coordinated stops.

Every process of a run calls `initialize()` before JAX starts its backend. The coordinator, the
process count and this process's index come from the environment (`experiments.launch` sets
them; SLURM, Open MPI and TPU pods are detected by JAX itself when they are absent). On CPU
hosts the cross-process collectives go through gloo.

A process that dies (SIGKILL, a lost host) stops sending heartbeats; after
`DLASSIGN_HEARTBEAT_TIMEOUT` seconds JAX's coordination service declares it lost and every
other process ends with JAX's message that another task died, instead of waiting forever in a
collective. Rerunning the command resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import os
import signal

import jax

from dlassign.errors import ConfigError

# Environment variables that `experiments.launch` sets and other launchers can set.
COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
HEARTBEAT_TIMEOUT = "DLASSIGN_HEARTBEAT_TIMEOUT"
INIT_TIMEOUT = "DLASSIGN_INIT_TIMEOUT"

DEFAULT_HEARTBEAT_TIMEOUT = 60  # seconds; JAX's own default is 100
DEFAULT_INIT_TIMEOUT = 300


def _int_env(name: str, default: int | None, minimum: int) -> int | None:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} is not valid; expected an "
                          f"integer >= {minimum}")
    return value


def settings() -> dict:
    """The arguments `initialize` passes to `jax.distributed.initialize`, from the environment.

    Raises:
      ConfigError: a variable is malformed or out of range; names it.
    """
    num = _int_env(NUM_PROCESSES, None, 1)
    pid = _int_env(PROCESS_ID, None, 0)
    if num is not None and pid is not None and pid >= num:
        raise ConfigError(f"{PROCESS_ID}={pid} is out of range for {NUM_PROCESSES}={num}; "
                          f"expected 0..{num - 1}")
    heartbeat = _int_env(HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, 1)
    return dict(coordinator_address=os.environ.get(COORDINATOR) or None,
                num_processes=num, process_id=pid,
                initialization_timeout=_int_env(INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT, 1),
                heartbeat_timeout_seconds=heartbeat,
                # a process that finished waits this long at exit for the others
                shutdown_timeout_seconds=max(heartbeat, 30))


def initialize() -> None:
    """Joins the multi-process run described by the environment (see `settings`).

    Raises:
      ConfigError: the environment is malformed, or the coordinator could not be reached.
    """
    kwargs = settings()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # JAX raises both for a bad or missing setup
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(
            f"could not join the multi-process run ({first}); set {COORDINATOR}, "
            f"{NUM_PROCESSES} and {PROCESS_ID}, or start it with python -m experiments.launch"
        ) from None
    # JAX's runtime now owns SIGTERM. Ctrl-C reaches each process at a different moment; as a
    # preemption notice it stops them all at the same step (`dlassign.runtime.preemption`).
    signal.signal(signal.SIGINT, _interrupt_as_preemption)


def _interrupt_as_preemption(signum, frame) -> None:
    del signum, frame
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
    os.kill(os.getpid(), signal.SIGTERM)


def active() -> bool:
    """Whether this process is one of several."""
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing in one process)."""
    if active():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
