"""What every entry point does first: CPU devices, logging, and one-line errors."""

from __future__ import annotations

import functools
import sys

from absl import logging

from dlassign.errors import DlassignError


def prepare_platform(num_cpu_devices: int = 0) -> None:
    """Creates one CPU host device per core (or `num_cpu_devices`) before JAX starts."""
    from dlassign.parallel import configure_cpu_devices

    configure_cpu_devices(num_cpu_devices)


class _QuietLibraries(logging.logging.Filter):
    """Drops INFO chatter of Orbax and TFDS (every checkpoint write logs a dozen lines)."""

    def filter(self, record) -> bool:
        noisy = any(f"/{lib}/" in record.pathname for lib in ("orbax", "tensorflow_datasets"))
        return record.levelno >= logging.logging.WARNING or not noisy


def clean_errors(main):
    """Reports a DlassignError (bad config, missing data, bad checkpoint) as one line, exit 2."""

    @functools.wraps(main)
    def wrapped(argv):
        logging.set_verbosity(logging.INFO)
        logging.get_absl_logger().addFilter(_QuietLibraries())
        try:
            return main(argv)
        except DlassignError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapped
