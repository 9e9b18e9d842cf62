"""Files that a crash never leaves half-written."""

from __future__ import annotations

import json
import math
import os

import jax

from dlassign.errors import ConfigError, NumericalError


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically; in a multi-process run only process 0 writes."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_figure(fig, path: str, **kwargs) -> None:
    """`fig.savefig(path)` atomically; in a multi-process run only process 0 writes."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    fig.savefig(tmp, format=os.path.splitext(path)[1].lstrip(".") or "png", **kwargs)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    """Writes strict JSON atomically: a crash leaves the old file or the new one, never half of
    one. In a multi-process run only process 0 writes.

    Raises:
      NumericalError: `obj` holds a NaN or an infinity (which strict JSON cannot hold); names
        the file and where in `obj` the number is. Nothing is written.
    """
    if jax.process_index() != 0:
        return
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        where = non_finite_path(obj)
        if where is None:
            raise
        raise NumericalError(f"{path} not written: {where[0] or 'the value'} is {where[1]}; "
                             "JSON holds only finite numbers") from e
    write_text(path, text)


def non_finite_path(obj, prefix: str = "") -> tuple[str, float] | None:
    """(dotted path, value) of the first NaN or infinity in nested dicts and lists, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (prefix, obj)
    items = (obj.items() if isinstance(obj, dict)
             else enumerate(obj) if isinstance(obj, (list, tuple)) else ())
    for key, value in items:
        found = non_finite_path(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def finite_or_none(obj):
    """`obj` with every NaN and infinity in nested dicts and lists replaced by None (JSON's
    null), for results where a non-finite number is a finding (a diverged run's loss)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj



def read_results(workdir: str, producer: str) -> dict:
    """The results.json that a finished `producer` run (e.g. 'experiments.sharpness') wrote
    into `workdir`.

    Raises:
      ConfigError: there is none, or it is not a JSON object; names the path and `producer`.
    """
    path = os.path.join(workdir, "results.json")
    expected = f"expected the --workdir of a finished {producer} run"
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist ({workdir} holds no results.json); {expected}")
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read as JSON ({type(e).__name__}); {expected}"
                          ) from e
    if not isinstance(result, dict):
        raise ConfigError(f"{path} holds a JSON {type(result).__name__}, not an object; "
                          f"{expected}")
    return result
