"""Files that a crash never leaves half-written."""

from __future__ import annotations

import json
import os

import jax


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
    """Writes JSON atomically: a crash leaves the old file or the new one, never half of one.

    In a multi-process run only process 0 writes.
    """
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
