"""Files that a crash never leaves half-written."""

from __future__ import annotations

import json
import os

import jax


def write_json(path: str, obj) -> None:
    """Writes JSON atomically: a crash leaves the old file or the new one, never half of one.

    In a multi-process run only process 0 writes.
    """
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
