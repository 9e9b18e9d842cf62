"""Orbax checkpoints that refuse to hand back garbage, written and read shard by shard.

Each checkpoint holds the train state, a JSON `meta` with the config it ran, and a manifest of
the SHA-256 of every file of the step. Each process hashes the files it wrote itself (OCDBT's
`ocdbt.process_N/` folders), so no process ever holds more of the state than its own shards;
process 0 writes the merged manifest last, and a step without one never finished saving.
Restoring reads each array straight into the target's shardings, checks the files against the
manifest first (the processes share the hashing) and falls back to the previous checkpoint, with
a warning, when the latest is damaged; a checkpoint written for another model or dataset
geometry is refused with the fields that differ. A checkpoint written by N processes restores on
M. Orbax writes each step into a temporary directory and renames it when complete, so a kill
mid-write leaves the last finished checkpoint as the latest.

Only the process that holds the workdir's lock (`runtime.workdir`, the training run) tidies the
directory: Orbax removes the temporary folders of interrupted saves when it opens, and damaged
steps are moved aside. A reader (evaluate, the Hessian spectrum, the landscape) may open the
checkpoints of a run that is still training; it reads the newest finished step and leaves
everything where it is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from dlassign.errors import CheckpointError
from dlassign.runtime import distributed, faults, preemption, workdir
from dlassign.runtime.files import finite_or_none


class _Orbax:
    """`orbax.checkpoint`, imported on first use: 0.4 s that importing the trainer, or a
    command that writes no checkpoint, does without."""

    def __getattr__(self, name: str):
        import orbax.checkpoint

        return getattr(orbax.checkpoint, name)


ocp = _Orbax()

MANIFEST = "dlassign_files.json"  # SHA-256 of every file of a step, written after the save
_PART = "dlassign_files.process_"  # one process's hashes, merged into MANIFEST by process 0

# Config fields that fix the shapes and meaning of the state; a checkpoint must match them all.
IDENTITY_FIELDS = ("model", "data.name", "data.pad_to", "data.image_size", "data.channels",
                   "optimizer.name", "optimizer.frozen", "optimizer.backbone_lr_scale", "dtype")


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


def _rank(metric: str):
    """A step's rank by `metric` in its Orbax metrics (higher is better, the first step on a
    tie; a step saved without the metric, or with NaN, ranks last)."""
    return lambda m: (-math.inf if m.get(metric) is None else m[metric], -m.get("step", 0))


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run under `directory` and, with `best`, the step
    that scored highest on the metric of that name as well (Orbax's preservation policies;
    `save(..., score=)` gives a step its score, `best()` finds it).

    Opened inside the workdir lock (`WorkdirLock`) it is the run's writer and tidies the
    directory; opened without it, it is a reader that changes nothing on disk but what it saves.
    Close it when done (`close()`, or use it as a context manager): Orbax's manager holds
    background threads and an event loop until then."""

    def __init__(self, directory: str, keep: int = 3, best: str | None = None):
        self.directory = os.path.abspath(directory)
        self.owner = workdir.holds(self.directory)  # the same answer in every process of a run
        self.metric = best
        kept = {"max_to_keep": keep}
        if best is not None:
            policies, rank = ocp.checkpoint_managers, _rank(best)
            kept = {"best_fn": rank, "best_mode": "max", "preservation_policy":
                    policies.AnyPreservationPolicy([policies.LatestN(n=keep), policies.BestN(
                        get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False)])}
        # Orbax's clean-up of interrupted saves, for the owner only: a reader must leave a live
        # run's temporaries (test_evaluate_during_a_save_leaves_the_live_run_alone)
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=self.owner, **kept)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, score: float | None = None) -> None:
        """Saves `state` (each process writes its own shards) and `meta`, whose NaNs and
        infinities are written as null (strict JSON; a diverged run's metrics still save), then
        the file manifest. Every process of a run calls it. `score` is the step's value of the
        `best` metric, also written into `meta` under its name."""
        step = int(step)
        metrics = None
        if self.metric is not None:  # every step gets metrics: Orbax warns of a step without
            metrics = {"step": step}
            if score is not None:
                metrics[self.metric] = score
                meta = dict(meta, **{self.metric: score})
        meta = finite_or_none(dict(meta, step=step))
        json.dumps(meta, allow_nan=False)  # raises here, before any file is written
        faults.during_checkpoint_write(step, self.directory)
        with preemption.shielded():  # Ctrl-C in a rename would leave a half-moved step
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=finite_or_none(metrics), force=True)
            self._manager.wait_until_finished()
            _write_manifest(os.path.join(self.directory, str(step)), step)
        distributed.barrier(f"dlassign_checkpoint_{step}_saved")

    def check_files(self, step: int) -> None:
        """Compares a step's files with the manifest written after it was saved, so damage is
        found (and named) without handing damaged bytes to Orbax, whose failed reads leave
        tracebacks of abandoned callbacks on stderr. The processes of a run share the hashing
        (each reads every N-th file) and agree on the verdict; every process calls it.

        Raises:
          CheckpointError: the manifest is missing (the save never finished) or unreadable, or
            a file is missing, added, changed or unreadable; names it.
        """
        where = f"checkpoint {step} in {self.directory}"
        folder = os.path.join(self.directory, str(step))
        path = os.path.join(folder, MANIFEST)
        try:
            with open(path) as f:
                want = json.load(f)
            assert isinstance(want, dict)
        except FileNotFoundError:
            raise CheckpointError(f"{where} is incomplete: it has no file manifest {MANIFEST} "
                                  "(its save never finished)") from None
        except (OSError, ValueError, AssertionError):
            raise CheckpointError(f"{where}: its file manifest {MANIFEST} is unreadable"
                                  ) from None
        have = _file_names(folder)
        for name in sorted(set(want) ^ set(have)):
            what = "is missing" if name not in have else "is not in its manifest"
            raise CheckpointError(f"{where} is damaged: {name} {what}")
        names = sorted(want)
        found = _first_bad(folder, names, want, jax.process_index(), jax.process_count())
        if found is not None:
            name, reason = found
            raise CheckpointError(f"{where} is damaged: {name} {reason}")

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

    def best(self) -> tuple[int, float] | None:
        """(step, score) of the step that scored highest on the `best` metric (the first on a
        tie), or None when no step has a score."""
        step = self._manager.best_step() if self.metric is not None else None
        if step is None:
            return None
        score = self.read_meta(step).get(self.metric)
        return None if score is None else (step, score)

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
        """Restores and verifies one step into `abstract_state`'s structure and shardings (each
        process reads only the shards its devices hold); raises CheckpointError when it is
        damaged."""
        self.check_files(step)
        return self._read(step, ocp.args.StandardRestore(abstract_state))

    def restore_raw(self, step: int) -> tuple[Any, dict]:
        """Restores a step as saved (numpy arrays in its own structure), verified, whatever
        devices and processes wrote it: every array is read whole onto this process's first
        device. For weights to start from (`load_variables`) and for inspection; a train state
        restores with `restore`, into its shardings."""
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
        state, meta = self._read(step, ocp.args.StandardRestore(target))
        return jax.tree.map(np.asarray, state), meta

    def _read(self, step: int, state_args) -> tuple[Any, dict]:
        """The state and meta of a step whose files were checked (`check_files`)."""
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=state_args, meta=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax and TensorStore raise many types for damaged files.
            raise CheckpointError(f"checkpoint {step} in {self.directory} cannot be read: "
                                  f"{type(e).__name__}: {_first_line(e)}") from e
        state, meta = out["state"], out["meta"]
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {step} in {self.directory} has metadata of type "
                                  f"{type(meta).__name__}; expected a JSON object")
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


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:300]


_OWN = re.compile(r"(?:ocdbt\.)?process_(\d+)")  # OCDBT's per-process folders and files


def _writer(rel: str, processes: int) -> int:
    """The process that wrote a file of a step: process N writes `ocdbt.process_N/` and
    `array_metadatas/process_N`, process 0 everything shared."""
    for part in rel.split(os.sep):
        m = _OWN.fullmatch(part)
        if m and int(m.group(1)) < processes:
            return int(m.group(1))
    return 0


def _file_names(folder: str) -> list[str]:
    """Every file under `folder` by relative path, but the manifest and its parts."""
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, files in os.walk(folder) for name in files
                  if root != folder or not name.startswith("dlassign_files"))


def _sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB chunks; OSError for one that is no regular file
    (reading a fifo would wait forever)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, "not a regular file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_bad(folder: str, names: list[str], want: dict, index: int, count: int
               ) -> tuple[str, str] | None:
    """(name, what is wrong) of the first of `names` whose hash is not `want`'s, or None.
    Process `index` of `count` hashes every `count`-th name; the processes agree through one
    small all-gather of (position, reason)."""
    mine = (len(names), 0, "")
    for i in range(index, len(names), count):
        try:
            if _sha256(os.path.join(folder, names[i])) != want[names[i]]:
                mine = (i, 1, "changed since it was saved")
                break
        except OSError as e:
            mine = (i, 2, f"cannot be read ({e.strerror or type(e).__name__})")
            break
    if count == 1:
        return None if mine[0] == len(names) else (names[mine[0]], mine[2])
    from jax.experimental import multihost_utils

    found = np.asarray(multihost_utils.process_allgather(np.array(mine[:2], np.int64)))
    first = int(found[:, 0].argmin())
    position, code = (int(v) for v in found[first])
    if position == len(names):
        return None
    reason = mine[2] if first == index else ("changed since it was saved" if code == 1
                                             else "cannot be read")
    return names[position], reason


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=0, sort_keys=True)
    os.replace(tmp, path)


def _write_manifest(folder: str, step: int) -> None:
    """Every process hashes the files it wrote; process 0 merges their hashes into MANIFEST,
    the last file of a step. Every process of a run calls it."""
    index, count = jax.process_index(), jax.process_count()
    hashes = {name: _sha256(os.path.join(folder, name)) for name in _file_names(folder)
              if _writer(name, count) == index}
    if index:
        _write_json(os.path.join(folder, f"{_PART}{index}.json"), hashes)
    distributed.barrier(f"dlassign_manifest_{step}")
    if index:
        return
    parts = [os.path.join(folder, f"{_PART}{i}.json") for i in range(1, count)]
    for part in parts:
        with open(part) as f:
            hashes.update(json.load(f))
    _write_json(os.path.join(folder, MANIFEST), hashes)
    for part in parts:
        os.remove(part)
