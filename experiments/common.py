"""What every entry point does first: CPU devices, logging, and one-line errors."""

from __future__ import annotations

import functools
import os
import runpy
import sys

from absl import app, flags, logging

from dlassign.errors import DlassignError

flags.DEFINE_bool("distributed", False, "Join a multi-process run through "
                  "jax.distributed.initialize() (experiments.launch sets this; TPU pods, SLURM "
                  "and Open MPI are detected; elsewhere set JAX_COORDINATOR_ADDRESS, "
                  "JAX_NUM_PROCESSES and JAX_PROCESS_ID).")


def prepare_platform(num_cpu_devices: int = 0) -> None:
    """Joins a multi-host run (--distributed), and creates one CPU host device per core (or
    `num_cpu_devices`) before JAX starts."""
    from dlassign.runtime import compilation_cache, distributed, lifeline
    from dlassign.runtime.parallel import configure_cpu_devices

    lifeline.watch_environment()  # a launcher's child ends with it (experiments.launch)
    compilation_cache.enable()  # DLASSIGN_COMPILATION_CACHE=0 switches it off
    configure_cpu_devices(num_cpu_devices)
    if flags.FLAGS.distributed:
        distributed.initialize()


def worker_setup(num_cpu_devices: int = 0) -> None:
    """What a worker process of an entry point (`dlassign.runtime.workers`) does first: the
    entry points' logging and SIGTERM handling, its CPU devices and the compilation cache.
    Its flags keep their defaults (it runs single-process studies)."""
    from dlassign.runtime import preemption

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(_QuietLibraries())
    preemption.install()
    prepare_platform(num_cpu_devices)


def single_process(entry_point: str, why: str) -> None:
    """Refuses --distributed for an entry point that runs in one process.

    Raises:
      DlassignError: --distributed was passed; says why and what to do.
    """
    if flags.FLAGS.distributed:
        raise DlassignError(f"{entry_point} runs in one process ({why}); run it without "
                            "--distributed")


def say(text: str) -> None:
    """Prints on process 0 only (every process of a run holds the same result)."""
    import jax

    if jax.process_index() == 0:
        print(text)


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO chatter of Orbax and TFDS (every checkpoint write logs a dozen lines)."""

    def filter(self, record) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets"))
        return record.levelno >= logging.logging.WARNING or not noisy


LOST_PEER_STATUS = 75  # EX_TEMPFAIL: a temporary failure, worth a retry


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _multi_process() -> bool:
    """Whether this process is one of several of a run (JAX's distributed runtime started)."""
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1


def _lost_peer(e: BaseException) -> bool:
    """Whether `e` is JAX's runtime failing in a multi-process run (a collective or the
    coordination service losing a peer)."""
    import jax

    return (isinstance(e, jax.errors.JaxRuntimeError) and jax.distributed.is_initialized()
            and jax.process_count() > 1)


def clean_errors(main):
    """Reports a DlassignError (bad config, missing data, bad checkpoint) as one line, exit 2
    (75 for a worker process that died: rerun);
    Ctrl-C and SIGTERM (which the training loop turns into a save between steps) as one line,
    exit 130 and 143, the shells' conventions for those signals; in a multi-process run, a
    collective that fails because a peer died as one line, exit 75 (EX_TEMPFAIL: rerun)."""

    @functools.wraps(main)
    def wrapped(argv):
        from dlassign.runtime import preemption

        logging.set_verbosity(logging.INFO)
        logging.get_absl_logger().addFilter(_QuietLibraries())
        preemption.install()
        try:
            return main(argv)
        except DlassignError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            status = getattr(e, "exit_status", 2)  # 2: bad input; a lost worker says 75
            if _multi_process():
                # JAX's exit handler would wait at a shutdown barrier for the other processes,
                # which wait for this one: leave at once, so the launcher reports this line.
                sys.stdout.flush()
                os._exit(status)
            sys.exit(status)
        except Exception as e:
            if not _lost_peer(e):
                raise
            # JAX's exit handler would now wait at a shutdown barrier the lost peer never
            # reaches, then abort with a C++ stack trace: leave at once instead.
            print(f"error: a collective across processes failed ({_first_line(e)}); a peer "
                  "process has probably died. The newest checkpoint is intact: rerun the same "
                  "command to resume", file=sys.stderr, flush=True)
            os._exit(LOST_PEER_STATUS)
        except KeyboardInterrupt:
            by_sigterm = preemption.by_sigterm()
            print(f"stopped by {'SIGTERM' if by_sigterm else 'interrupt'}: the finished steps "
                  "are saved; rerun the same command to resume", file=sys.stderr)
            sys.exit(143 if by_sigterm else 130)

    return wrapped


def data_dir_override(data_dir: str | None) -> dict | None:
    """Config overrides for a run whose dataset's raw files have moved since it was written."""
    return {"data.data_dir": data_dir} if data_dir else None


def _config_fields(argv, field: str) -> str:
    """', valid fields here: a, b, c' for the block that an unknown `--config.<field>` names,
    or '' when the config file cannot be read."""
    try:
        spec = next(a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config="))
        path, _, arg = spec.partition(":")
        module = runpy.run_path(path)
        node = module["get_config"](*([arg] if arg else []))
        for part in field.split(".")[:-1]:
            node = node[part]
        return f"; fields of {'.'.join(field.split('.')[:-1]) or 'the config'}: " + ", ".join(
            sorted(node.keys()))
    except Exception:  # only a hint: the one-line error stands without it
        return ""


def _parse_flags(argv):
    """absl's parser, with every config-file and override error as one line, exit 2."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.get("seed")  # a config file that failed to load raises here
        return rest
    except flags.Error as e:
        print(f"error: {e}\nPass --helpshort or --helpfull to see help on flags.",
              file=sys.stderr)
        sys.exit(2)
    except (OSError, SyntaxError) as e:
        # ml_collections loads --config=FILE while parsing: a missing file or a broken one.
        spec = next((a for a in argv[1:] if a.startswith("--config=")), "--config")
        reason = (f"line {e.lineno}: {e.msg}" if isinstance(e, SyntaxError)
                  else "no such file" if "No such file" in str(e)
                  else (str(e).splitlines() or [type(e).__name__])[0])
        print(f"error: cannot load {spec}: {reason}", file=sys.stderr)
        sys.exit(2)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        # ml_collections raises these for --config.<field> overrides: an unknown field (with a
        # "Did you mean" hint) or a value of the wrong type.
        message = str(e.args[0] if e.args else e)
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        if isinstance(e, (KeyError, AttributeError)) and message.startswith(("'", '"')):
            field, _, hint = message.partition("\n")
            name = field.strip("'\"")
            full = name  # the path up to the unknown part, e.g. 'optimizer.lr' or 'optimzer'
            for arg in bad:
                parts = arg.split("=", 1)[0][len("--config."):].split(".")
                if name in parts:
                    full = ".".join(parts[:parts.index(name) + 1])
                    break
            message = (f"no config field {full!r}" + (f". {hint.strip()}" if hint else "")
                       + _config_fields(argv, full))
        print(f"error: bad config override {' '.join(bad)}: {message}".replace("\n", " "),
              file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """`app.run` with clean one-line errors for bad flags and config overrides."""
    app.run(main, flags_parser=_parse_flags)
