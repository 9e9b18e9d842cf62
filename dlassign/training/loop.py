"""The one step runner: every training (runs, grid-search folds) goes through `run_steps`.

A run is a sequence of calls, each some steps with their batches stacked (`call_plan` and
`stacked_batches` for a fixed number of steps per call, `Pacer` and `paced_calls` where the
number is chosen from the timed first calls), put on the devices ahead of time through the
mesh's placement (`place_ahead`, `parallel.global_batch`, which also feeds each process its
rows in a multi-process run), a bounded dispatch queue, and a guard: at every sync point the
metrics come to the host and a non-finite step stops the run with `NumericalError`, naming the
step (and the fold, for steps vmapped over folds) and the parameter leaves whose gradients
went bad. The jitted step itself keeps the old state on such
a step (`steps.make_train_step`), so nothing non-finite is ever handed back.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator

import flax.traverse_util as traverse_util
import jax
import numpy as np
from absl import logging
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


def stack(group: list[dict], slots: int) -> dict:
    """One call's batch: the single batch when `slots` is 1, else the group stacked on a new
    leading axis of `slots` (the last batch repeated as padding; see
    `steps.stacked_or_single`)."""
    if slots == 1:
        return group[0]
    group = group + group[-1:] * (slots - len(group))
    return {k: np.stack([b[k] for b in group]) for k in group[0]}


def stacked_batches(batches: Iterator[dict], plan: Iterable[tuple[int, int]],
                    steps_per_call: int) -> Iterator[dict]:
    """One batch per call of `plan`, stacked `steps_per_call` deep (`stack`)."""
    for _, n in plan:
        yield stack([next(batches) for _ in range(n)], steps_per_call)


# The most steps per call the trainer tries when it chooses (steps_per_call 0); the calls'
# overhead is then an eighth, and a call of eight of the small models' steps still lasts
# milliseconds.
AUTO_MOST_STEPS = 8
PROBE_CALLS = 3  # one-step calls timed before choosing; the first one also warms up
TRIAL_CALLS = 2  # one-step calls of the several-step program timed before keeping it
# A step inside the several-step program may take this much longer than alone and still be
# kept (noise); XLA:CPU programs whose layouts suffer inside a loop take several times longer.
TRIAL_TOLERANCE = 1.25
# Past this step time a call's own overhead (about a millisecond on a CPU, docs/performance.md)
# is within the noise, so longer steps run one per call without trying more.
SEVERAL_BELOW_S = 0.05
# Compiling several steps takes about what compiling one step took, on the cores the steps
# share: they are tried only where the steps left take this many times that compile time. The
# program, once cached, serves every later run: at 2.5 the MNIST MLP's and CNN's 2-epoch runs
# try 8 per call, about as fast cold as one per call and about 10% faster cached (at 10 both
# kept one per call; docs/performance.md).
PAYBACK = 2.5


class Pacer:
    """How many steps each call runs, decided as the run goes, and the record that replays it.

    With `steps_per_call` N > 0 every call runs N steps (fewer up to a boundary), unless the
    first call, timed, says a call of N steps lasts longer than `max_call_seconds`; the calls
    then take as many steps as fit. With 0 the first calls run one step each and are timed;
    where a step takes under `SEVERAL_BELOW_S`, several fit in `max_call_seconds` and the
    steps left take `PAYBACK` times
    `compile_seconds` (what compiling the one-step call took), a call of that many steps is
    compiled on a background thread (`compile_several(k)` returns the started thread), two
    calls of it run one step each, timed, and it is kept unless its step is more than
    `TRIAL_TOLERANCE` times slower than a step alone: it saves the per-call overhead, but
    XLA:CPU compiles some programs worse inside a loop (grouped convolutions' gradients, for
    one).

    In a run of several processes `agree` makes every process see the slowest one's time (a
    collective: every process times the same calls), and `compile_several` must compile before
    it returns, so that all of them plan the same calls.

    `record()` is what a checkpoint keeps: `segments` [[from_step, k], ...] (the calls after
    step from_step run k steps each, counted afresh from there as from a boundary) and whether
    the choice is made. A resumed run passes it back and, the choice made, makes exactly the
    calls of the uninterrupted run without timing anything.
    """

    def __init__(self, start: int, total: int, boundaries: Iterable[int],
                 steps_per_call: int = 0, max_call_seconds: float = float("inf"),
                 record: dict | None = None,
                 compile_several: Callable[[int], object] | None = None,
                 agree: Callable[[float], float] = lambda seconds: seconds,
                 compile_seconds: float = 0.0):
        self.total, self.agree, self.compile_seconds = total, agree, compile_seconds
        self.setting, self.max_call_seconds = steps_per_call, max_call_seconds
        self.compile_several = compile_several
        self._boundaries = {b for b in boundaries if 0 < b < total} | {total}
        self.one_step_s = self.trial_step_s = None
        self._times, self._probes, self._trials, self._compiling = [], 0, 0, None
        if record and record.get("setting") == steps_per_call and record.get("chosen"):
            self.segments = [list(seg) for seg in record["segments"]]
            self.one_step_s, self.trial_step_s = record.get("one_step_s"), record.get(
                "trial_step_s")
            self.phase = "chosen"
        else:  # never more slots than the run has steps left
            self.segments = [[start, min(steps_per_call, total - start) or 1]]
            self.phase = "first" if steps_per_call else "probe"
        self.planned = start

    def record(self) -> dict:
        return {"setting": self.setting, "chosen": self.phase == "chosen",
                "segments": [list(seg) for seg in self.segments],
                "one_step_s": self.one_step_s, "trial_step_s": self.trial_step_s}

    def _switch(self, k: int) -> None:
        """Calls planned from now on run k steps each."""
        if self.segments[-1][0] == self.planned:
            self.segments[-1][1] = k
        else:
            self.segments.append([self.planned, k])

    def plan(self) -> Iterator[tuple[int, int, int, str | None]]:
        """(first step, steps, slots, tag) per call; a tagged call is to be timed and its
        time handed to `timed`."""
        while self.planned < self.total:
            tag = None
            if self.phase == "first" and self.planned == self.segments[0][0]:
                tag = "first"
            elif self.phase == "probe" and self._probes < PROBE_CALLS:
                tag, self._probes = "probe", self._probes + 1
            elif self.phase == "compiling" and not self._compiling.is_alive():
                self.phase = "trial"
            if self.phase == "trial" and self._trials < TRIAL_CALLS:
                self._switch(self._trial_k)
                self.segments.append([self.planned + 1, self._trial_k])  # a one-step call
                tag, self._trials = "trial", self._trials + 1
                if self._trials == TRIAL_CALLS:
                    self.phase = "trying"
            s = self.planned
            k = next(k for f, k in reversed(self.segments) if f <= s)
            cuts = self._boundaries | {f for f, _ in self.segments}
            lo = max([0, *(c for c in cuts if c <= s)])  # calls count from the last cut
            n = min(k - (s - lo) % k, min(c for c in cuts if c > s) - s)
            self.planned = s + n
            yield s + 1, n, k, tag

    def timed(self, tag: str, steps: int, slots: int, seconds: float) -> None:
        """Takes the time of a tagged call and decides what follows."""
        per_step = self.agree(seconds) / steps
        if tag == "first":
            self.phase = "chosen"
            fit = max(1, int(self.max_call_seconds / per_step))
            if slots > fit:
                self._switch(fit)
                logging.warning("a call of %d steps took %.1f s; running %d per call to keep "
                                "calls under max_call_seconds=%g", steps, seconds, fit,
                                self.max_call_seconds)
        elif tag == "probe":
            self._times.append(per_step)
            if len(self._times) < PROBE_CALLS:
                return
            self.one_step_s = min(self._times[1:] or self._times)
            k = min(AUTO_MOST_STEPS, int(self.max_call_seconds / self.one_step_s))
            left = (self.total - self.planned) * self.one_step_s
            if (k < 2 or self.one_step_s > SEVERAL_BELOW_S or self.compile_several is None
                    or left < PAYBACK * self.compile_seconds):
                self.phase = "chosen"
                logging.info("one step per call: a step takes %.3f s, the %.0f s of steps left "
                             "against %.1f s to compile a call", self.one_step_s, left,
                             self.compile_seconds)
            else:
                self._trial_k, self.phase = k, "compiling"
                self._compiling = self.compile_several(k)
        elif tag == "trial":
            self._times.append(per_step)
            if len(self._times) < PROBE_CALLS + TRIAL_CALLS:
                return
            self.trial_step_s = min(self._times[PROBE_CALLS:])
            self.phase = "chosen"
            if self.trial_step_s > TRIAL_TOLERANCE * self.one_step_s:
                self._switch(1)
                logging.info("one step per call: a step takes %.3f s alone and %.3f s in a "
                             "call of %d", self.one_step_s, self.trial_step_s, self._trial_k)
            else:
                logging.info("%d steps per call: a step takes %.3f s alone and %.3f s in a "
                             "call of %d", self._trial_k, self.one_step_s, self.trial_step_s,
                             self._trial_k)


def slowest(seconds: float) -> float:
    """The largest of every process's `seconds` (one process: `seconds`)."""
    if jax.process_count() == 1:
        return seconds
    from jax.experimental import multihost_utils

    return float(np.max(multihost_utils.process_allgather(np.float64(seconds))))


def paced_calls(pacer: Pacer, batches: Iterator[dict],
                sharding: Callable[[int], NamedSharding]) -> Iterator[tuple]:
    """(first step, steps, slots, tag, host batch, sharding) per call of `pacer`'s plan, for
    `place_ahead`; `sharding(slots)` places a call's batch."""
    for first, n, k, tag in pacer.plan():
        yield first, n, k, tag, stack([next(batches) for _ in range(n)], k), sharding(k)


def fixed_calls(plan: Iterable[tuple[int, int]], batches: Iterator[dict], steps_per_call: int,
                sharding: NamedSharding) -> Iterator[tuple]:
    """`paced_calls` for a fixed plan (`call_plan`), nothing timed."""
    for first, n in plan:
        yield (first, n, steps_per_call, None,
               stack([next(batches) for _ in range(n)], steps_per_call), sharding)


PREFETCH = 2  # calls whose batches are on the devices before they run


def place_ahead(calls: Iterable[tuple], size: int = PREFETCH) -> Iterator[tuple]:
    """The calls with their batches put on the devices `size` calls ahead, overlapping the copy
    with compute: (first step, steps, slots, tag, device batch)."""
    queue = collections.deque()
    for *head, batch, sharding in calls:
        queue.append((*head, parallel.global_batch(batch, sharding)))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def prefetch(batches: Iterable[dict], sharding: NamedSharding, size: int = PREFETCH
             ) -> Iterator[dict]:
    """Puts batches on the devices `size` steps ahead, overlapping the copy with compute."""
    for (batch,) in place_ahead(((b, sharding) for b in batches), size):
        yield batch


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


def run_steps(step: Callable, state, calls: Iterable[tuple], guard: Guard,
              sync: Callable[[int], bool] = lambda step: False,
              on_sync: Callable[[object, int, list[dict]], None] | None = None,
              pacer: Pacer | None = None, heartbeat_s: float = 30.0):
    """Runs the calls through a compiled step and returns the final state.

    Args:
      step: jitted `(state, batch, steps) -> (state, metrics)` (`steps.stacked_or_single`).
      state: the state before the first call's first step (donated to the step).
      calls: (first step, steps, slots, tag, host batch, sharding) per call, from
        `fixed_calls` or `paced_calls`; the batches are placed ahead (`place_ahead`).
      guard: checks every step's metrics at each sync point and at the end.
      sync: whether to sync after the call that ends at this step (log or checkpoint steps).
      on_sync: called with (state, step, per-step host metrics since the last sync) at every
        sync point, after the guard passed.
      pacer: takes the time of each tagged call (the calls of `paced_calls`).
      heartbeat_s: a line is logged when this long has passed without one (slow steps, few
        sync points), so a long run never looks stalled.

    Raises:
      NumericalError: a step was not finite (the guard's message).
      Interrupted: Ctrl-C, or a SIGTERM stop request (`runtime.preemption`), between calls; it
        carries the last state, whose steps passed the guard.
    """
    limiter = parallel.DispatchLimiter()
    pending, synced, metrics = [], None, None
    beat = time.perf_counter()

    def flush(last: int) -> list[dict]:
        nonlocal pending, synced
        host_metrics = parallel.to_host([m for _, m in pending])
        host = guard.per_step([(n, m) for (n, _), m in zip(pending, host_metrics)])
        guard.check(host, synced)
        pending, synced = [], last
        return host

    placed = place_ahead(calls)
    with preemption.deferred():
        try:
            last = None
            for i, (first, n, k, tag, batch) in enumerate(placed):
                if synced is None:
                    synced = first - 1
                if tag is not None and metrics is not None:
                    jax.block_until_ready(metrics["loss"])  # time this call alone
                started = time.perf_counter()
                state, metrics = step(state, batch, np.int32(n))
                faults.during_call(n)
                if tag is not None:
                    jax.block_until_ready(metrics["loss"])
                    seconds = time.perf_counter() - started
                    logging.info("steps %d-%d (%d per call) took %.2f s", first, first + n - 1,
                                 k, seconds)
                    if pacer is not None:
                        pacer.timed(tag, n, k, seconds)
                limiter(metrics["loss"])
                pending.append((n, metrics))
                last = first + n - 1
                for s in range(first, last + 1):
                    faults.after_step(s)
                if sync(last):
                    host = flush(last)
                    beat = time.perf_counter()
                    if on_sync is not None:
                        on_sync(state, last, host)
                elif time.perf_counter() - beat > heartbeat_s:
                    beat = time.perf_counter()
                    logging.info("running step %d", last)
                if preemption.stop_at(i):
                    raise KeyboardInterrupt  # a SIGTERM asks to stop between calls, as Ctrl-C
            if pending:
                host = flush(last)
                if on_sync is not None:
                    on_sync(state, last, host)
        except KeyboardInterrupt:
            if pending:
                flush(synced)
            raise Interrupted(state) from None
    return state
