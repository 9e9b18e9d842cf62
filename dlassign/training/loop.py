"""The one step runner: every training (runs, grid-search folds) goes through `run_steps`.

A run is a plan of calls (`call_plan`), one stacked batch per call (`stacked_batches`), put on
the devices ahead of time through the mesh's placement (`prefetch`, `parallel.global_batch`,
which also feeds each process its rows in a multi-process run), a bounded dispatch queue, and
a guard: at every sync point the metrics come to the host and a non-finite step stops the run
with `NumericalError`, naming the step (and the fold, for steps vmapped over folds) and the
parameter leaves whose gradients went bad. The jitted step itself keeps the old state on such
a step (`steps.make_train_step`), so nothing non-finite is ever handed back.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator

import flax.traverse_util as traverse_util
import numpy as np
from jax.sharding import NamedSharding

from dlassign.errors import NumericalError
from dlassign.runtime import faults, parallel, preemption

DIVERGED_HINT = "Lower optimizer.learning_rate or set optimizer.grad_clip_norm"


def call_plan(start: int, total: int, steps_per_call: int, boundaries: Iterable[int]
              ) -> Iterator[tuple[int, int]]:
    """The calls that run steps start+1..total: (first step, number of steps) each.

    Calls never cross a boundary (the steps after which the loop logs or checkpoints, e.g.
    multiples of log_every_steps) or `total`. Between two boundaries the steps go in calls of
    `steps_per_call` from the first one, the last call taking what is left. The plan depends
    only on the step numbers, so a resumed run makes the calls an uninterrupted one makes.
    """
    k = max(int(steps_per_call), 1)
    cuts = sorted({b for b in boundaries if 0 < b < total} | {total})
    lo = 0
    for hi in cuts:
        s = max(start, lo) + 1
        while s <= hi:
            n = min(k - (s - lo - 1) % k, hi - s + 1)  # to the next call start or boundary
            yield s, n
            s += n
        lo = hi


def stacked_batches(batches: Iterator[dict], plan: Iterable[tuple[int, int]],
                    steps_per_call: int) -> Iterator[dict]:
    """One batch per call of `plan`: single when steps_per_call is 1, else that call's batches
    stacked on a new leading axis of steps_per_call slots (the last batch repeated as padding;
    see `steps.stacked_or_single`)."""
    for _, n in plan:
        group = [next(batches) for _ in range(n)]
        if steps_per_call == 1:
            yield group[0]
        else:
            group += group[-1:] * (steps_per_call - n)
            yield {k: np.stack([b[k] for b in group]) for k in group[0]}


def prefetch(batches: Iterable[dict], sharding: NamedSharding, size: int = 2) -> Iterator[dict]:
    """Puts batches on the devices `size` steps ahead, overlapping the copy with compute."""
    queue = collections.deque()
    for batch in batches:
        queue.append(parallel.global_batch(batch, sharding))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def leaf_names(params) -> list[str]:
    """'/'-joined paths of the parameter leaves, in the order of the step's `leaf_finite`."""
    return ["/".join(map(str, k)) for k in traverse_util.flatten_dict(params)]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM arrived between calls; `state` holds every finished (and checked)
    step. Callers that do not save it see a KeyboardInterrupt."""

    def __init__(self, state):
        super().__init__("interrupted")
        self.state = state


class Guard:
    """Checks the host copies of step metrics and names the first non-finite step.

    Args:
      names: the parameter leaves' names (`leaf_names`).
      where: what is training, for the message (e.g. "grid cell {...} fold 2: "); may be "".
      folds: the metrics carry a leading fold axis (steps vmapped over folds).
      learning_rate: the schedule, step -> learning rate, to say the rate in force.
      saved: says what is saved, e.g. "the last checkpoint (step 40) is intact".
    """

    def __init__(self, names: list[str], where: str = "", folds: bool = False,
                 learning_rate: Callable[[int], float] | None = None,
                 saved: Callable[[], str] | None = None):
        self.names, self.where, self.folds = names, where, folds
        self.learning_rate, self.saved = learning_rate, saved

    def per_step(self, calls: list[tuple[int, dict]]) -> list[dict]:
        """Per-step metrics from (steps, metrics) per call; a call of several steps has its
        metrics stacked on a leading axis, padding rows after its `steps`."""
        base = 1 if self.folds else 0
        out = []
        for n, m in calls:
            if np.ndim(m["loss"]) == base:
                out.append(m)
            else:
                out.extend({k: v[i] for k, v in m.items()} for i in range(n))
        return out

    def check(self, host: list[dict], first_step: int) -> None:
        """Raises NumericalError on the first step (from `first_step` + 1) that is not finite."""
        for i, m in enumerate(host):
            finite = np.asarray(m["finite"])
            if finite.all():
                continue
            fold = int(np.flatnonzero(~finite.reshape(-1))[0]) if self.folds else None
            leaf_ok = np.asarray(m["leaf_finite"])
            loss = np.asarray(m["loss"])
            if fold is not None:
                leaf_ok, loss = leaf_ok[fold], loss[fold]
            bad = [n for n, ok in zip(self.names, leaf_ok) if not ok]
            leaves = f"; non-finite gradients in {', '.join(bad[:5])}" if bad else ""
            in_fold = f" in fold {fold}" if fold is not None else ""
            step = first_step + i + 1
            rate = (f" at learning rate {float(self.learning_rate(step - 1)):.3g}"
                    if self.learning_rate is not None else "")
            saved = f"; {self.saved()}" if self.saved is not None else ""
            raise NumericalError(
                f"{self.where}training diverged at step {step}{in_fold}{rate}: loss "
                f"{float(loss)}{leaves}. The state was not updated by that step{saved}. "
                f"{DIVERGED_HINT}")


def run_steps(step: Callable, state, plan: list[tuple[int, int]], batches: Iterator[dict],
              sharding: NamedSharding, guard: Guard,
              sync: Callable[[int], bool] = lambda step: False,
              on_sync: Callable[[object, int, list[dict]], None] | None = None):
    """Runs `plan` through a compiled step and returns the final state.

    Args:
      step: jitted `(state, batch, steps) -> (state, metrics)` (`steps.stacked_or_single`).
      state: the state before the plan's first step (donated to the step).
      plan: (first step, number of steps) per call, from `call_plan`.
      batches: one host batch per call (`stacked_batches`); placed through `sharding`.
      guard: checks every step's metrics at each sync point and at the end.
      sync: whether to sync after the call that ends at this step (log or checkpoint steps).
      on_sync: called with (state, step, per-step host metrics since the last sync) at every
        sync point, after the guard passed.

    Raises:
      NumericalError: a step was not finite (the guard's message).
      Interrupted: Ctrl-C, or a SIGTERM stop request (`runtime.preemption`), between calls; it
        carries the last state, whose steps passed the guard.
    """
    limiter = parallel.DispatchLimiter()
    pending, synced = [], (plan[0][0] - 1 if plan else 0)

    def flush(last: int) -> list[dict]:
        nonlocal pending, synced
        metrics = parallel.to_host([m for _, m in pending])
        host = guard.per_step([(n, m) for (n, _), m in zip(pending, metrics)])
        guard.check(host, synced)
        pending, synced = [], last
        return host

    placed = prefetch(batches, sharding)
    with preemption.deferred():
        try:
            for i, (first, n) in enumerate(plan):
                state, metrics = step(state, next(placed), np.int32(n))
                limiter(metrics["loss"])
                pending.append((n, metrics))
                last = first + n - 1
                for s in range(first, last + 1):
                    faults.after_step(s)
                if sync(last) or i == len(plan) - 1:
                    host = flush(last)
                    if on_sync is not None:
                        on_sync(state, last, host)
                if preemption.stop_at(i):
                    raise KeyboardInterrupt  # a SIGTERM asks to stop between calls, as Ctrl-C
        except KeyboardInterrupt:
            flush(synced)
            raise Interrupted(state) from None
    return state
