"""Runs an entry point as several JAX processes on this machine: a multi-host run in miniature.

  python -m experiments.launch --processes=2 -- experiments.train \
      --config=configs/mnist_cnn.py --workdir=runs/cnn2

Picks a free port for JAX's coordinator, starts the processes with `--distributed` and the
environment `dlassign.runtime.distributed` reads (coordinator, process count and index, CPU
devices per process), prefixes their output with `[pN]`, and exits as soon as one process
fails, killing the others, with that process's status. Ctrl-C or SIGTERM to the launcher is
passed on as SIGTERM, which the processes turn into a coordinated save at the same step; a
launcher that dies outright (SIGKILL) takes the processes with it (`runtime.lifeline`). On a
cluster, start the entry point itself with `--distributed` under the cluster's launcher
(docs/scale-out.md).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from dlassign.runtime import distributed, lifeline

FLAGS = flags.FLAGS
flags.DEFINE_integer("processes", 2, "Number of processes to start.")
flags.DEFINE_integer("devices_per_process", 0,
                     "CPU host devices per process (0: the cores divided among the processes, "
                     "at least 1).")
flags.DEFINE_integer("port", 0, "Coordinator port on localhost (0: a free one).")
flags.DEFINE_integer("heartbeat_timeout", distributed.DEFAULT_HEARTBEAT_TIMEOUT,
                     "Seconds without a heartbeat after which JAX declares a process lost and "
                     "stops the others.")
flags.DEFINE_float("grace", 60.0, "Seconds the processes get to save after Ctrl-C or SIGTERM "
                   "before they are killed.")

STOPPED = (130, 143)  # exit statuses of a process that saved and stopped on Ctrl-C or SIGTERM
USAGE = ("usage: python -m experiments.launch --processes=N -- experiments.ENTRY_POINT "
         "[its flags]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(process_id: int, num_processes: int, port: int, devices_per_process: int,
                heartbeat_timeout: int) -> dict[str, str]:
    """The environment of one process of a local run."""
    from dlassign.runtime.parallel import CPU_DEVICES_ENV

    env = dict(os.environ)
    env.update({distributed.COORDINATOR: f"localhost:{port}",
                distributed.NUM_PROCESSES: str(num_processes),
                distributed.PROCESS_ID: str(process_id),
                distributed.HEARTBEAT_TIMEOUT: str(heartbeat_timeout),
                CPU_DEVICES_ENV: str(devices_per_process),
                "PYTHONUNBUFFERED": "1"})
    return env


def spawn(command: list[str], num_processes: int, devices_per_process: int = 1, port: int = 0,
          heartbeat_timeout: int = distributed.DEFAULT_HEARTBEAT_TIMEOUT,
          env_overrides: dict[str, str] | None = None, **popen_kwargs
          ) -> list[subprocess.Popen]:
    """Starts `python -m <command...> --distributed` as `num_processes` processes of one run,
    each in its own session (a terminal's Ctrl-C reaches only the launcher), each ending when
    this process dies (`runtime.lifeline`)."""
    port = port or free_port()
    return [subprocess.Popen([sys.executable, "-m", *command, "--distributed"],
                             env={**environment(i, num_processes, port, devices_per_process,
                                                heartbeat_timeout), **lifeline.environment(),
                                  **(env_overrides or {})},
                             start_new_session=True, **popen_kwargs)
            for i in range(num_processes)]


def _forward(stream, sink, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sink.buffer.write(prefix.encode() + line)
        sink.buffer.flush()
    stream.close()


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _exit_code(status: int) -> int:
    return 128 - status if status < 0 else status


def supervise(procs: list[subprocess.Popen], grace: float) -> int:
    """Waits for every process; on the first failure kills the rest. Returns the exit code:
    0, or the first failing process's (128 + signal for a signal)."""
    stop = {"since": None}

    def on_signal(signum, frame):
        del frame
        if stop["since"] is None:
            stop["since"] = time.monotonic()
            print(f"launch: {signal.Signals(signum).name}: asking the processes to save and "
                  "stop", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while True:
        statuses = [p.poll() for p in procs]
        failed = [i for i, s in enumerate(statuses) if s not in (None, 0)]
        if failed and stop["since"] is None and statuses[failed[0]] in STOPPED:
            stop["since"] = time.monotonic()  # a preemption notice: the others are saving too
        elif failed and stop["since"] is None:
            i = failed[0]
            alive = [p for p in procs if p.poll() is None]
            # named even when the others ended in the same poll (a peer's collective failed)
            print(f"launch: process {i} {_describe(statuses[i])}"
                  + (f"; stopping the other {len(alive)}" if alive else ""),
                  file=sys.stderr, flush=True)
            for p in alive:
                p.kill()
            for p in procs:
                p.wait()
            return _exit_code(statuses[i])
        if all(s is not None for s in statuses):
            codes = [_exit_code(s) for s in statuses]
            return next((c for c in codes if c), 0)
        if stop["since"] is not None and time.monotonic() - stop["since"] > grace:
            print(f"launch: the processes did not stop within {grace:.0f} s; killing them",
                  file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _check_command(command: list[str]) -> None:
    if not command:
        _fail(f"no entry point given; {USAGE}")
    module = command[0]
    if module.startswith("-"):
        _fail(f"expected an entry point after '--', got {module!r}; {USAGE}")
    try:
        spec = (importlib.util.find_spec(module)
                if module.startswith(("experiments.", "benchmarks.")) else None)
    except (ImportError, ValueError):  # a missing package on the way: experiments.nope.sub
        spec = None
    if spec is None:
        _fail(f"no entry point {module!r}; expected a module such as experiments.train; "
              f"{USAGE}")
    with open(spec.origin, encoding="utf-8") as f:
        runnable = "__main__" in f.read()
    if not runnable:
        _fail(f"{module!r} is a module of helpers, not an entry point (it runs nothing); "
              f"expected one such as experiments.train; {USAGE}")
    if module == "experiments.launch":
        _fail("experiments.launch cannot launch itself")


def main(argv):
    command = argv[1:]
    _check_command(command)
    if FLAGS.processes < 1:
        _fail(f"--processes={FLAGS.processes}; expected 1 or more")
    if FLAGS.devices_per_process < 0:
        _fail(f"--devices_per_process={FLAGS.devices_per_process}; expected 0 "
                             "(automatic) or more")
    if FLAGS.heartbeat_timeout < 1:
        _fail(f"--heartbeat_timeout={FLAGS.heartbeat_timeout}; expected 1 or "
                             "more seconds")
    from dlassign.runtime.parallel import cpu_core_count

    devices = FLAGS.devices_per_process or max(cpu_core_count() // FLAGS.processes, 1)
    procs = spawn(command, FLAGS.processes, devices, FLAGS.port, FLAGS.heartbeat_timeout,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    threads = [threading.Thread(target=_forward, args=(stream, sink, f"[p{i}] "), daemon=True)
               for i, p in enumerate(procs)
               for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
    for t in threads:
        t.start()
    code = supervise(procs, FLAGS.grace)
    for t in threads:
        t.join(timeout=5)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, with a bad launcher flag as one `error:` line (status 2)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(f"{e}; {USAGE}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
