"""What every entry point does first: CPU devices, logging, and one-line errors."""

from __future__ import annotations

import difflib
import functools
import os
import runpy
import shlex
import sys

from absl import app, flags, logging

from dlassign.errors import ConfigError, DlassignError

flags.DEFINE_bool("config_help", False, "Print every field of --config with its value (the "
                  "config file's defaults with any --config.FIELD=VALUE overrides applied), one "
                  "--config.FIELD=VALUE line each, and exit.")
flags.DEFINE_bool("distributed", False, "Join a multi-process run through "
                  "jax.distributed.initialize() (experiments.launch sets this; TPU pods, SLURM "
                  "and Open MPI are detected; elsewhere set JAX_COORDINATOR_ADDRESS, "
                  "JAX_NUM_PROCESSES and JAX_PROCESS_ID).")


def prepare_platform(num_cpu_devices: int = 0) -> None:
    """Joins a multi-host run (--distributed), and creates one CPU host device per core (or
    `num_cpu_devices`) before JAX starts."""
    from dlassign.runtime import compilation_cache, distributed
    from dlassign.runtime.parallel import configure_cpu_devices

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


def _lost_peer(e: BaseException) -> bool:
    """Whether `e` is JAX's runtime failing in a multi-process run (a collective or the
    coordination service losing a peer)."""
    import jax

    return (isinstance(e, jax.errors.JaxRuntimeError) and jax.distributed.is_initialized()
            and jax.process_count() > 1)


def clean_errors(main):
    """Reports a DlassignError (bad config, missing data, bad checkpoint) as one line, exit 2;
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
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
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
            signal_name = "SIGTERM" if preemption.requested() else "interrupt"
            print(f"stopped by {signal_name}: the finished steps are saved; rerun the same "
                  "command to resume", file=sys.stderr)
            sys.exit(143 if preemption.requested() else 130)

    return wrapped


def data_dir_override(data_dir: str | None) -> dict | None:
    """Config overrides for a run whose dataset's raw files have moved since it was written."""
    return {"data.data_dir": data_dir} if data_dir else None


def output_dir(flag: str, path: str) -> None:
    """Checks, before any work, that `path` can be a directory of outputs: it is one, or it can
    be created (its nearest existing parent is a writable directory).

    Raises:
      ConfigError: names the flag, the path and what is wrong with it.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--{flag}={path} is a file; expected a directory (an existing one, or "
                          "one to create)")
    _writable_parent(flag, path)


def output_file(flag: str, path: str, suffixes: tuple[str, ...]) -> None:
    """Checks, before any work, that `path` can be written: a file name ending in one of
    `suffixes` in an existing, writable directory.

    Raises:
      ConfigError: names the flag, the path and what is valid.
    """
    if not path.endswith(suffixes):
        raise ConfigError(f"--{flag}={path} has an unknown suffix; expected one of "
                          f"{', '.join(suffixes)}")
    if os.path.isdir(path):
        raise ConfigError(f"--{flag}={path} is a directory; expected a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"--{flag}={path}: directory {parent} does not exist; create it or "
                          "name a file in an existing directory")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--{flag}={path}: directory {parent} is not writable")


def _writable_parent(flag: str, path: str) -> None:
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--{flag}={path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--{flag}={path} cannot be written: {parent} is not writable")


def resolve_config_path(spec: str) -> str:
    """`configs/NAME.py[:ARG]` as the installed `configs` package's file when no such file is
    under the working directory, so the documented commands run from any directory."""
    path, sep, arg = spec.partition(":")
    if os.path.exists(path) or not os.path.normpath(path).startswith("configs" + os.sep):
        return spec
    import configs

    package = os.path.dirname(os.path.abspath(configs.__file__))
    candidate = os.path.join(package, os.path.normpath(path)[len("configs" + os.sep):])
    return candidate + sep + arg if os.path.isfile(candidate) else spec


def _resolved_argv(argv: list[str]) -> list[str]:
    """`argv` with every `--config=configs/...` resolved (`resolve_config_path`); where the
    entry point's --config has such a default and none is given, the resolved default added."""
    argv = [f"--config={resolve_config_path(a[len('--config='):])}"
            if a.startswith("--config=") else a for a in argv]
    if "config" in flags.FLAGS and not any(a.startswith("--config=") for a in argv[1:]):
        default = (flags.FLAGS["config"].default_as_str or "").strip("'\"")
        if default and resolve_config_path(default) != default:
            argv = [argv[0], f"--config={resolve_config_path(default)}", *argv[1:]]
    return argv


def _config_spec(argv: list[str]) -> str | None:
    spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
    if spec is None and "config" in flags.FLAGS:
        spec = (flags.FLAGS["config"].default_as_str or "").strip("'\"") or None
    return spec


def _config_block(argv: list[str], block: list[str]):
    """The block of the config file that `block` names (e.g. ['optimizer']), read afresh; None
    when the config file cannot be read or has no such block."""
    try:
        path, _, arg = _config_spec(argv).partition(":")
        node = runpy.run_path(path)["get_config"](*([arg] if arg else []))
        for part in block:
            node = node[part]
        return node if hasattr(node, "keys") else None
    except Exception:  # only a hint: the one-line error stands without it
        return None


def _unknown_field_message(argv: list[str], full: str) -> str:
    """"no config field 'optimizer.learning_rat' (did you mean 'optimizer.learning_rate'?);
    fields of optimizer: ..." for an unknown `--config.<full>`: the deepest block that exists,
    a close match in it where there is one, and its fields."""
    parts = full.split(".")
    message = f"no config field {full!r}"
    for depth in range(len(parts) - 1, -1, -1):  # the deepest block that exists
        node = _config_block(argv, parts[:depth])
        if node is None:
            continue
        keys = sorted(node.keys())
        block = ".".join(parts[:depth])
        close = difflib.get_close_matches(parts[depth], keys, n=1, cutoff=0.5)
        if close:
            message += f" (did you mean {'.'.join([*parts[:depth], close[0]])!r}?)"
        return message + f"; fields of {block or 'the config'}: {', '.join(keys)}"
    return message


def _innermost(e: BaseException) -> str:
    """The message of `e`, unwrapped from the exceptions ml_collections nests in one another."""
    message = e.args[0] if e.args else e
    while isinstance(message, BaseException):
        message = message.args[0] if message.args else type(message).__name__
    return str(message)


def _print_config(argv: list[str]) -> None:
    """What --config_help prints: every field of the parsed config, as `--config.F=V` lines."""
    if "config" not in flags.FLAGS:
        print("error: --config_help: this entry point takes no --config; --helpfull lists its "
              "flags", file=sys.stderr)
        sys.exit(2)
    config = flags.FLAGS["config"].value
    if config is None:
        print("error: --config_help needs --config=FILE, e.g. --config=configs/base.py",
              file=sys.stderr)
        sys.exit(2)
    print(f"# the fields of --config={_config_spec(argv)}; override any with "
          "--config.FIELD=VALUE")

    def walk(node, prefix: str):
        for key in sorted(node.keys()):
            value = node[key]
            if hasattr(value, "keys"):
                walk(value, f"{prefix}{key}.")
            else:
                print(f"--config.{prefix}{key}={shlex.quote(str(value))}")

    walk(config, "")


def _parse_flags(argv):
    """absl's parser, with every config-file and override error as one line, exit 2;
    --config_help prints the config's fields and exits."""
    argv = _resolved_argv(list(argv))
    config_help = any(a in ("--config_help", "--config_help=true", "--config_help=True")
                      for a in argv[1:])
    try:
        try:
            rest = flags.FLAGS(argv)
        except flags.IllegalFlagValueError:
            # a required flag left out (or another flag's value) does not matter to
            # --config_help: the flags were read before the validators ran
            if not (config_help and flags.FLAGS.is_parsed()):
                raise
            rest = argv[:1]
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.get("seed")  # a config file that failed to load raises here
        if config_help:
            _print_config(argv)
            sys.exit(0)
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
        # ml_collections raises these for --config.<field> overrides: an unknown field (a
        # KeyError, possibly inside an AttributeError) or a value of the wrong type.
        message = _innermost(e)
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        if isinstance(e, (KeyError, AttributeError)) and message.startswith(("'", '"')):
            name = message.partition("\n")[0].strip().strip("'\"")
            full = name  # the path up to the unknown part, e.g. 'optimizer.lr' or 'optimzer'
            for arg in bad:
                parts = arg.split("=", 1)[0][len("--config."):].split(".")
                if name in parts:
                    full = ".".join(parts[:parts.index(name) + 1])
                    break
            message = _unknown_field_message(argv, full)
        print(f"error: bad config override {' '.join(bad)}: {message}".replace("\n", " "),
              file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """`app.run` with clean one-line errors for bad flags and config overrides."""
    app.run(main, flags_parser=_parse_flags)
