"""Resuming a run: the newest intact checkpoint of its workdir, and the config changes a
resumed run carries (refused unless `continue_with_changes`)."""

from __future__ import annotations

from absl import logging

from dlassign.errors import CheckpointError
from dlassign.runtime.checkpoint import RUNTIME_FIELDS, Checkpointer, config_differences
from dlassign.training.setup import abstract_tree
from dlassign.training.train_state import TrainState

# Config fields added after checkpoints were written, and the value a checkpoint written
# without one ran with.
ADDED_FIELDS = {"data": {"validation_fraction": 0.0}}


def _with_added_fields(saved: dict, added: dict = ADDED_FIELDS) -> dict:
    out = dict(saved)
    for key, value in added.items():
        if isinstance(value, dict):
            out[key] = _with_added_fields(out.get(key) or {}, value)
        else:
            out.setdefault(key, value)
    return out


def resume_changes(config, meta: dict, directory: str) -> list[dict]:
    """The config changes a resumed run carries: those recorded before, plus this run's
    differences from the config the checkpoint was written with.

    Raises:
      CheckpointError: the training config differs and `continue_with_changes` is not set.
    """
    changes = list(meta.get("config_changes", []))
    diffs = config_differences(_with_added_fields(meta.get("config", {})), config.to_dict(),
                               fields=None, ignore=RUNTIME_FIELDS)
    if not diffs:
        return changes
    if not config.get("continue_with_changes", False):
        raise CheckpointError(
            f"{directory} holds a run started with another training config ({'; '.join(diffs)}). "
            "Use a new workdir, rerun with the config that wrote it, or pass "
            "--config.continue_with_changes=true to continue with the new values")
    logging.warning("continuing from step %d with changed config: %s", meta.get("step", 0),
                    "; ".join(diffs))
    return changes + [{"step": int(meta.get("step", 0)), "changes": diffs}]


def restore(ckpt: Checkpointer, state: TrainState, config) -> tuple[TrainState, dict, list[dict]]:
    """`state` from `ckpt`'s newest intact checkpoint, with that checkpoint's meta and the
    config changes resumes made; `state` itself, {} and [] where there is none."""
    restored = ckpt.restore_latest(abstract_tree(state), config.to_dict())
    if restored is None:
        return state, {}, []
    tree, meta = restored
    changes = resume_changes(config, meta, ckpt.directory)
    state = state.replace(**tree)
    logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    return state, meta, changes
