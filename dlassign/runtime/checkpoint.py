"""Orbax checkpoints that refuse to hand back garbage.

Each checkpoint holds the train state and a JSON `meta` with the config it ran and a SHA-256
fingerprint of the state's bytes. Restoring verifies the fingerprint and falls back to the
previous checkpoint, with a warning, when the latest is damaged; a checkpoint written for another
model or dataset geometry is refused with the fields that differ. Orbax writes each step into a
temporary directory and renames it when complete, so a kill mid-write leaves the last finished
checkpoint as the latest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dlassign.errors import CheckpointError
from dlassign.runtime import faults

# Config fields that fix the shapes and meaning of the state; a checkpoint must match them all.
IDENTITY_FIELDS = ("model", "data.name", "data.pad_to", "data.image_size", "data.channels",
                   "optimizer.name", "optimizer.frozen", "optimizer.backbone_lr_scale", "dtype")


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def fingerprint(tree: Any) -> str:
    """SHA-256 over every leaf's path, dtype, shape and bytes.

    Leaves are taken in the order of their paths with container types erased (a namedtuple
    field and the dict key Orbax restores it as have the same name), so a tree restored
    without its target structure has the fingerprint it was saved with.
    """
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = sorted(("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves)
    for name, leaf in named:
        a = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{name}:{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _normalise(v):
    return json.loads(json.dumps(v)) if v is not None else None


def config_differences(saved: dict, current: dict, fields=IDENTITY_FIELDS) -> list[str]:
    """'field: checkpoint has X, this run has Y' for each identity field that differs."""
    s, c = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(s) | set(c) if any(k == f or k.startswith(f + ".")
                                                   for f in fields))
    pairs = [(k, _normalise(s.get(k)), _normalise(c.get(k))) for k in keys]
    return [f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, a, b in pairs if a != b]


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`.

    Close it when done (`close()`, or use it as a context manager): Orbax's manager holds
    background threads and an event loop until then."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = dict(meta, step=int(step), state_sha256=fingerprint(state))
        faults.during_checkpoint_write(int(step), self.directory)
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores and verifies one step into `abstract_state`'s structure and shardings;
        raises CheckpointError when it is damaged."""
        return self._restore_verified(step, ocp.args.StandardRestore(abstract_state))

    def restore_raw(self, step: int) -> tuple[Any, dict]:
        """Restores a step as saved (numpy arrays, no target structure), verified."""
        return self._restore_verified(step, ocp.args.StandardRestore())

    def _restore_verified(self, step: int, state_args) -> tuple[Any, dict]:
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be read: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        state, meta = out["state"], out["meta"]
        if meta.get("state_sha256") != fingerprint(state):
            raise CheckpointError(f"checkpoint {step} in {self.directory} is damaged: its "
                                  "contents do not match the fingerprint written with it")
        return state, meta

    def restore_latest(self, abstract_state: Any, config: dict | None = None
                       ) -> tuple[Any, dict] | None:
        """The newest intact checkpoint, or None when there is none.

        Args:
          abstract_state: the state's structure, shapes, dtypes and shardings.
          config: this run's config; a checkpoint whose identity fields differ is refused.

        Raises:
          CheckpointError: the checkpoints belong to another model or config, or none is intact.
        """
        steps = self.steps()
        if not steps:
            return None
        if config is not None:
            diffs = config_differences(self.read_meta(steps[-1]).get("config", {}), config)
            if diffs:
                raise CheckpointError(
                    f"the checkpoints in {self.directory} were written for a different run; "
                    f"{'; '.join(diffs)}. Use a new workdir, or the config that wrote them")
        errors = []
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointError as e:
                errors.append(str(e))
                logging.warning("%s; falling back to an earlier checkpoint", e)
                continue
            if errors:
                logging.warning("resuming from checkpoint %d, the newest intact one", step)
            return state, meta
        raise CheckpointError("no intact checkpoint in " + self.directory + ": " +
                              " | ".join(errors))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_variables(path: str) -> tuple[dict, dict]:
    """({"params", "batch_stats"}, meta) from a `port_weights` output or a training workdir."""
    directory = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    if not os.path.isdir(directory):
        raise CheckpointError(f"init_checkpoint {path!r} is not a directory")
    with Checkpointer(directory) as ckpt:
        steps = ckpt.steps()
        if not steps:
            raise CheckpointError(f"init_checkpoint {path!r} holds no checkpoint")
        tree, meta = ckpt.restore_raw(steps[-1])
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}, meta
