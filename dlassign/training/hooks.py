"""The training loop's periodic hooks, in the spirit of `clu.periodic_actions`: progress
(logging), validation and checkpointing, plus whatever the caller passes to
`trainer.train_and_evaluate` (curvature tracking is one).

A hook runs after the steps that are multiples of its `every_steps` and, with `at_end`, after
the last step. The trainer hands those steps to the `loop.Pacer` as boundaries, so they end
calls, and syncs there: a hook sees a finished, checked state and adds no sync of its own. The
entries a hook keeps (`record`) travel in every checkpoint's meta and into results.json; a
resumed run hands them back to `begin`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from dlassign.runtime.checkpoint import Checkpointer
from dlassign.training import summaries
from dlassign.training.evaluation import validation_metrics
from dlassign.training.setup import Run, state_tree


class Hook:
    """An action after some steps of the training loop. Subclasses set `every_steps` (0:
    never periodic), `at_end`, and `name` (the results.json field of their entries, if any)."""

    every_steps: int = 0
    at_end: bool = False
    name: str = ""

    def due(self, step: int, total: int) -> bool:
        return ((self.every_steps > 0 and step % self.every_steps == 0)
                or (self.at_end and step == total))

    def begin(self, run: Run, board: summaries.Summaries, step: int, meta: dict) -> None:
        """Called once before the first step: training starts after `step`, `meta` is the
        resumed checkpoint's meta ({} for a fresh run)."""

    def __call__(self, state, step: int) -> None:
        raise NotImplementedError

    def record(self) -> dict:
        """What this hook adds to each checkpoint's meta and to results.json."""
        return {}


def boundaries(hooks: Sequence[Hook], total: int) -> list[int]:
    """The steps before `total` after which some hook is due (the loop syncs after the last
    step anyway)."""
    return sorted({s for h in hooks if h.every_steps > 0
                   for s in range(h.every_steps, total, h.every_steps)})


def periodic(hooks: Sequence[Hook]) -> Callable[[int], bool]:
    """Whether the call that ends at a step must sync: some hook's period falls there."""
    periods = sorted({h.every_steps for h in hooks if h.every_steps > 0})
    return lambda step: any(step % p == 0 for p in periods)


def _format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress(Hook):
    """Logs the training metrics (mean loss, accuracy, gradient norm since the last sync),
    the speed and the ETA, into the history, the log and TensorBoard. Its period is
    `log_every_steps`, and it reports at every sync point, those of other hooks too."""

    def __init__(self, every_steps: int, learning_rate: Callable[[int], float]):
        self.every_steps, self.learning_rate = every_steps, learning_rate
        self.history, self.train_time, self._host = [], 0.0, []

    def begin(self, run, board, step, meta):
        self.run, self.board = run, board
        self.history, self.train_time = meta.get("history", []), meta.get("train_time_s", 0.0)
        self._clock = (time.perf_counter(), step)

    def due(self, step, total):
        return True

    def add(self, host: list[dict]) -> None:
        """Takes the per-step host metrics of the calls since the last sync."""
        self._host = host

    def __call__(self, state, step):
        run, batch_size = self.run, self.run.config.batch_size
        started, last = self._clock
        now = time.perf_counter()
        rate = (step - last) / max(now - started, 1e-9)
        self.train_time += now - started
        entry = {"step": step, "epoch": step / run.steps_per_epoch,
                 **{k: float(np.mean([m[k] for m in self._host]))
                    for k in ("loss", "accuracy", "grad_norm")}}
        self.history.append(entry)
        logging.info("step %d/%d epoch %.2f loss %.4f acc %.4f %.0f ex/s ETA %s", step,
                     run.total_steps, entry["epoch"], entry["loss"], entry["accuracy"],
                     rate * batch_size,
                     _format_eta((run.total_steps - step) / max(rate, 1e-9)))
        self.board.scalars(step, {**{k: entry[k] for k in ("loss", "accuracy", "grad_norm")},
                                  "learning_rate": float(self.learning_rate(step - 1)),
                                  "examples_per_second": rate * batch_size}, "train")

    def restart_clock(self, step: int) -> None:
        """The time after the hooks of a sync point is not training time."""
        self._clock = (time.perf_counter(), step)

    def record(self):
        return {"history": self.history, "train_time_s": self.train_time}


class Validation(Hook):
    """Scores the validation split every `every_steps` and after the last step."""

    name = "validation"

    def __init__(self, every_steps: int, eval_step):
        self.every_steps, self.eval_step = every_steps, eval_step
        self.at_end = every_steps > 0
        self.entries = []

    def begin(self, run, board, step, meta):
        self.run, self.board = run, board
        self.entries = meta.get("validation", [])

    def accuracy_at(self, step: int) -> float | None:
        """The validation accuracy scored after `step`, if it was scored there."""
        last = self.entries[-1] if self.entries else None
        return last["accuracy"] if last is not None and last["step"] == step else None

    def __call__(self, state, step):
        run = self.run
        scores = validation_metrics(run, state, self.eval_step)
        self.entries.append({"step": step, "epoch": step / run.steps_per_epoch, **scores})
        self.board.scalars(step, scores, "validation")
        logging.info("step %d validation loss %.4f acc %.4f (%d examples)", step,
                     scores["loss"], scores["accuracy"], len(run.dataset.validation))

    def record(self):
        return {"validation": self.entries}


class Checkpointing(Hook):
    """Saves the state every `every_steps` and after the last step, with `meta()`; the
    TensorBoard events up to it are flushed first (`flush`). With `scored` (the validation
    hook, which must run before it) it also saves after every validation, with the accuracy
    as the step's score: `ckpt` then keeps the best one (`Checkpointer(best=...)`)."""

    at_end = True

    def __init__(self, ckpt: Checkpointer, every_steps: int, meta: Callable[[], dict],
                 flush: Callable[[], None] = lambda: None, scored: Validation | None = None):
        self.ckpt, self.every_steps, self.meta, self.flush = ckpt, every_steps, meta, flush
        self.scored = scored

    def due(self, step: int, total: int) -> bool:
        return super().due(step, total) or (self.scored is not None
                                            and self.scored.due(step, total))

    def __call__(self, state, step):
        self.flush()
        score = self.scored.accuracy_at(step) if self.scored is not None else None
        self.ckpt.save(step, state_tree(state), self.meta(), score)

    def save_interrupted(self, state) -> None:
        """Keeps the finished steps of an interrupted run: saves `state` unless its step is
        saved already."""
        step = int(state.step)
        if step > (self.ckpt.steps() or [0])[-1]:
            self(state, step)
            logging.warning("interrupted: saved step %d; rerun the same command to resume", step)

    def saved(self) -> str:
        """What is on disk, for the message of a run that diverged."""
        steps = self.ckpt.steps()
        return (f"the last checkpoint (step {steps[-1]}) in {self.ckpt.directory} is intact"
                if steps else "no checkpoint was written yet")

