"""Orbax checkpoints that refuse to hand back garbage.

Each checkpoint holds the train state and a JSON `meta` with the config it ran and a SHA-256
fingerprint of the state's bytes. Restoring verifies the fingerprint and falls back to the
previous checkpoint, with a warning, when the latest is damaged; a checkpoint written for another
model or dataset geometry is refused with the fields that differ. Orbax writes each step into a
temporary directory and renames it when complete, so a kill mid-write leaves the last finished
checkpoint as the latest.

Only the process that holds the workdir's lock (`runtime.workdir`, the training run) tidies the
directory: it removes the temporary folders of interrupted saves and moves damaged steps aside.
A reader (evaluate, the Hessian spectrum, the landscape) may open the checkpoints of a run that
is still training; it reads the newest finished step and leaves everything where it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from dlassign.errors import CheckpointError
from dlassign.runtime import distributed, faults, parallel, preemption, workdir


class _Orbax:
    """`orbax.checkpoint`, imported on first use: 0.4 s that importing the trainer, or a
    command that writes no checkpoint, does without."""

    def __getattr__(self, name: str):
        import orbax.checkpoint

        return getattr(orbax.checkpoint, name)


ocp = _Orbax()

MANIFEST = "dlassign_files.json"  # SHA-256 of every file of a step, written after the save

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
    leaves = jax.tree_util.tree_flatten_with_path(parallel.to_host(tree))[0]
    named = sorted(("/".join(_key_name(k) for k in path), leaf) for path, leaf in leaves)
    for name, leaf in named:
        a = np.ascontiguousarray(leaf)
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


# Config fields that say where and how fast a run goes, or what it measures on the way (the
# curvature), not what it trains: a resumed run may change them freely.
RUNTIME_FIELDS = ("data.data_dir", "data.tfds_data_dir", "log_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "steps_per_call",
                  "max_call_seconds", "num_cpu_devices", "mesh", "impl", "continue_with_changes",
                  "eval_every_steps", "checkpoint_best", "curvature")


def config_differences(saved: dict, current: dict, fields=IDENTITY_FIELDS,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """'field: checkpoint has X, this run has Y' for each of `fields` that differs (None: every
    field but those under `ignore`)."""
    s, c = _flatten(saved), _flatten(current)
    under = lambda k, names: any(k == f or k.startswith(f + ".") for f in names)
    keys = sorted(k for k in set(s) | set(c)
                  if (fields is None or under(k, fields)) and not under(k, ignore))
    pairs = [(k, _normalise(s.get(k)), _normalise(c.get(k))) for k in keys]
    return [f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, a, b in pairs if a != b]


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory`.

    Opened inside the workdir lock (`WorkdirLock`) it is the run's writer and tidies the
    directory; opened without it, it is a reader that changes nothing on disk but what it saves.
    Close it when done (`close()`, or use it as a context manager): Orbax's manager holds
    background threads and an event loop until then."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.owner = workdir.holds(self.directory)  # the same answer in every process of a run
        if self.owner and jax.process_index() == 0:
            _remove_temporaries(self.directory)
        distributed.barrier("dlassign_checkpointer_open")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = dict(meta, step=int(step), state_sha256=fingerprint(state))
        faults.during_checkpoint_write(int(step), self.directory)
        with preemption.shielded():  # Ctrl-C in a rename would leave a half-moved step
            self._manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                _write_manifest(os.path.join(self.directory, str(int(step))))
        distributed.barrier(f"dlassign_checkpoint_{int(step)}_saved")

    def check_files(self, step: int) -> None:
        """Compares a step's files with the manifest written after it was saved, so damage is
        found (and named) without handing damaged bytes to Orbax, whose failed reads leave
        tracebacks of abandoned callbacks on stderr. Steps saved without a manifest pass.

        Raises:
          CheckpointError: a file is missing, added or changed; names it.
        """
        folder = os.path.join(self.directory, str(step))
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            return
        try:
            with open(path) as f:
                want = json.load(f)
            assert isinstance(want, dict)
        except (OSError, ValueError, AssertionError):
            raise CheckpointError(f"checkpoint {step} in {self.directory}: its file manifest "
                                  f"{MANIFEST} is unreadable") from None
        try:
            have = _file_hashes(folder)
        except _Unreadable as e:
            raise CheckpointError(f"checkpoint {step} in {self.directory} is damaged: "
                                  f"{e.name} cannot be read ({e.reason})") from None
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                what = ("is missing" if name not in have else "is not in its manifest"
                        if name not in want else "changed since it was saved")
                raise CheckpointError(f"checkpoint {step} in {self.directory} is damaged: "
                                      f"{name} {what}")

    def read_meta(self, step: int) -> dict:
        """The JSON meta of one step; CheckpointError when it is missing or unreadable."""
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # Orbax raises many types for missing or damaged files
            raise CheckpointError(f"checkpoint {step} in {self.directory} has no readable "
                                  f"metadata: {type(e).__name__}: "
                                  f"{_first_line(e)}") from e
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {step} in {self.directory} has metadata of type "
                                  f"{type(meta).__name__}; expected a JSON object")
        return meta

    def newest_meta(self) -> tuple[int, dict] | None:
        """(step, meta) of the newest step whose metadata reads, or None."""
        for step in reversed(self.steps()):
            try:
                return step, self.read_meta(step)
            except CheckpointError:
                continue
        return None

    def set_aside(self, steps: list[int], reasons: list[str]) -> None:
        """Moves damaged steps out of the checkpoint directory (into `damaged_checkpoints/`
        beside it, never deleted), so the run can write those step numbers again. Every
        process calls it; process 0 moves the folders."""
        if not steps:
            return
        if not self.owner:  # a reader: the run that owns the workdir deals with them
            logging.warning("checkpoint(s) %s in %s left in place: this process does not hold "
                            "the workdir", ", ".join(map(str, steps)), self.directory)
            return
        if jax.process_index() == 0:
            self._move_aside(steps, reasons)
        distributed.barrier("dlassign_set_aside_" + "_".join(map(str, steps)))
        self._manager.reload()

    def _move_aside(self, steps: list[int], reasons: list[str]) -> None:
        aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        os.makedirs(aside, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step, reason in zip(steps, reasons):
            target = os.path.join(aside, f"{step}-{stamp}")
            os.replace(os.path.join(self.directory, str(step)), target)
            logging.warning("moved damaged checkpoint %d to %s (%s)", step, target, reason)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores and verifies one step into `abstract_state`'s structure and shardings;
        raises CheckpointError when it is damaged."""
        return self._restore_verified(step, ocp.args.StandardRestore(abstract_state))

    def restore_raw(self, step: int) -> tuple[Any, dict]:
        """Restores a step as saved (numpy arrays in its own structure), verified, whatever
        devices and processes wrote it: every array is read whole onto this process's first
        device."""
        self.check_files(step)
        try:
            with ocp.StandardCheckpointer() as reader:
                saved = reader.metadata(os.path.join(self.directory, str(step), "state"))
            saved = getattr(saved, "item_metadata", saved)
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), saved)
        except Exception as e:  # Orbax raises many types for missing or damaged metadata
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be read: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
        state, meta = self._restore_verified(step, ocp.args.StandardRestore(target))
        return jax.tree.map(np.asarray, state), meta

    def _restore_verified(self, step: int, state_args) -> tuple[Any, dict]:
        self.check_files(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be read: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
        state, meta = out["state"], out["meta"]
        if not isinstance(meta, dict) or meta.get("state_sha256") != fingerprint(state):
            raise CheckpointError(f"checkpoint {step} in {self.directory} is damaged: its "
                                  "contents do not match the fingerprint written with it")
        return state, meta

    def restore_latest(self, abstract_state: Any, config: dict | None = None
                       ) -> tuple[Any, dict] | None:
        """The newest intact checkpoint, or None when there is none.

        Steps newer than it that cannot be read or verified (any damage: arrays, metadata, a
        stray folder named like a step) are moved aside with a warning naming each
        (`set_aside`), so training can write their step numbers again.

        Args:
          abstract_state: the state's structure, shapes, dtypes and shardings.
          config: this run's config; a checkpoint whose identity fields differ is refused.

        Raises:
          CheckpointError: the checkpoints belong to another model or config, or none is intact
            (then nothing is moved, and the message names every step and its damage).
        """
        steps = self.steps()
        if not steps:
            return None
        if config is not None:
            newest = self.newest_meta()
            if newest is not None:
                diffs = config_differences(newest[1].get("config", {}), config)
                if diffs:
                    raise CheckpointError(
                        f"the checkpoints in {self.directory} were written for a different "
                        f"run; {'; '.join(diffs)}. Use a new workdir, or the config that wrote "
                        "them")
        damaged, errors = [], []
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, abstract_state)
            except CheckpointError as e:
                damaged.append(step)
                errors.append(str(e))
                logging.warning("%s; falling back to an earlier checkpoint", e)
                continue
            if damaged:
                self.set_aside(damaged, errors)
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


def _remove_temporaries(directory: str) -> None:
    """Deletes the temporary folders of saves that were interrupted (Orbax renames a finished
    save into place, so a temporary folder never holds a complete checkpoint)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if ".orbax-checkpoint-tmp" in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            logging.warning("removed %s, left by an interrupted checkpoint save", name)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:300]


class _Unreadable(Exception):
    def __init__(self, name: str, reason: str):
        super().__init__(name, reason)
        self.name, self.reason = name, reason


def _file_hashes(folder: str) -> dict[str, str]:
    """SHA-256 of every file under `folder` by relative path; raises `_Unreadable` naming a
    file that cannot be read, or that is no regular file (reading a fifo would wait forever)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel in (MANIFEST, MANIFEST + ".tmp"):
                continue
            h = hashlib.sha256()
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    raise _Unreadable(rel, "not a regular file")
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            except OSError as e:
                raise _Unreadable(rel, e.strerror or type(e).__name__) from None
            out[rel] = h.hexdigest()
    return out


def _write_manifest(folder: str) -> None:
    hashes = _file_hashes(folder)  # before the temporary file exists
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(hashes, f, indent=0, sort_keys=True)
    os.replace(tmp, os.path.join(folder, MANIFEST))
