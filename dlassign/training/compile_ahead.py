"""Compiling a run's steps ahead: on background threads, from the state's shapes, while the
initialiser runs and a checkpoint is read (XLA compiles without the GIL)."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
from absl import logging

from dlassign.runtime import parallel
from dlassign.training.setup import Run, compile_steps


def _abstract_batch(run: Run, rows: int, mask: bool = False, slots: int = 1) -> dict:
    """The shapes, dtypes and shardings of a training (or, with `mask`, evaluation) batch of
    `rows` rows, stacked `slots` deep for a training call of several steps."""
    per_call = 1 if mask else slots
    lead = (per_call,) if per_call > 1 else ()
    sharding = parallel.batch_sharding(run.mesh, int(per_call > 1))
    split = run.dataset.train
    spec = lambda shape, dtype: jax.ShapeDtypeStruct((*lead, *shape), dtype, sharding=sharding)
    batch = {"image": spec((rows, *run.dataset.image_shape), split.images.dtype),
             "label": spec((rows,), split.labels.dtype)}
    if mask:
        batch["mask"] = spec((rows,), np.bool_)
    return batch


class CompileAhead:
    """Compiles a run's train and eval steps on two background threads from the state's
    shapes (`make_state`'s `before_init`), while the initialiser compiles and runs and a
    checkpoint is read; XLA compiles without the GIL. The steps' first calls then find their
    programs compiled: the train step for the first calls' slots (one step each, or the
    config's fixed `steps_per_call`). `several(k)` compiles the train step for k steps per
    call when the run's `loop.Pacer` asks. The eval program's memory estimate is kept for
    `check_memory`."""

    def __init__(self, run: Run, abstract_state):
        self.train_step, self.eval_step = compile_steps(run, abstract_state)
        self.memory = None
        # What compiling the first calls' train step took, or took when the compilation cache
        # was filled: the steps per call chosen then do not depend on what a run before left
        # in the cache (a run after a cold one compiled the several-step call it skipped).
        # JAX records whole seconds, so a call that compiles in under one counts as free.
        self.train_seconds = 0.0
        self._run, self._abstract_state = run, abstract_state
        eval_batch = _abstract_batch(run, run.config.eval_batch_size, mask=True)
        first_slots = run.config.get("steps_per_call", 0) or 1
        logging.info("compiling the train step (%d per call) and the eval step", first_slots)
        self.started = time.perf_counter()  # when the compiling began

        def train():
            self._compile_train(first_slots)

        def evaluate():
            self.memory = self.eval_step.lower(abstract_state, eval_batch).compile(
            ).memory_analysis()

        # not daemons: a run that fails before joining them exits after they finish, never
        # with XLA compiling while the interpreter shuts down
        self._threads = [threading.Thread(target=_quietly(f), name=f"compile-{f.__name__}")
                         for f in (train, evaluate)]
        for t in self._threads:
            t.start()

    def _compile_train(self, slots: int) -> None:
        started, saved, here = time.perf_counter(), [], threading.get_ident()

        def on_hit(event: str, seconds: float, **_) -> None:  # this thread's cache hits
            if event == "/jax/compilation_cache/compile_time_saved_sec" and (
                    threading.get_ident() == here):
                saved.append(seconds)

        batch = _abstract_batch(self._run, self._run.config.batch_size, slots=slots)
        jax.monitoring.register_event_duration_secs_listener(on_hit)
        try:
            self.train_step.lower(self._abstract_state, batch,
                                  jax.ShapeDtypeStruct((), np.int32)).compile()
        finally:
            jax.monitoring.unregister_event_duration_listener(on_hit)
        self.train_seconds = time.perf_counter() - started + sum(saved)

    def several(self, slots: int):
        """Compiles the train step for `slots` steps per call: on a started background thread
        (returned), or, in a run of several processes, before returning (so that every process
        plans the same calls; the returned thread has finished)."""
        thread = threading.Thread(target=_quietly(lambda: self._compile_train(slots)),
                                  name=f"compile-train-{slots}")
        thread.start()
        if jax.process_count() > 1:
            thread.join()
        return thread

    def join(self) -> None:
        for t in self._threads:
            t.join()


def _quietly(f):
    """`f` with its exceptions dropped: a program that fails to compile ahead is compiled
    (and its error raised) by its first call."""

    def run():
        try:
            f()
        except Exception:  # noqa: BLE001
            pass

    return run
