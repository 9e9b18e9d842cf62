"""Errors that the command-line entry points report as one line, without a traceback."""


class DlassignError(Exception):
    """Base class of errors caused by user input rather than by a bug."""


class ConfigError(DlassignError, ValueError):
    """A config field holds a value that cannot work; the message names field, value, valid set."""


class DataError(DlassignError):
    """A dataset cannot be found, read, or has the wrong contents."""


class CheckpointError(DlassignError):
    """A checkpoint is missing, damaged, or was written for a different model."""


class PortingError(DlassignError, ValueError):
    """A state dict does not fit the architecture it is ported into."""


class NumericalError(DlassignError, FloatingPointError):
    """Training produced a NaN or Inf."""


def one_of(field: str, value: object, valid) -> ConfigError:
    """Builds the standard 'unknown X' error: `unknown model 'resnet19'; expected one of ...`."""
    return ConfigError(f"unknown {field} {value!r}; expected one of {', '.join(sorted(valid))}")
