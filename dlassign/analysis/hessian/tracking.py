"""Curvature during training: the top Hessian eigenvalue of the training loss (and, optionally,
its trace) on a fixed stratified training sample, every `curvature.every_steps` steps.

`CurvatureHook` is the training loop's hook (`training.hooks.Hook`): the caller passes it to
`train_and_evaluate` (experiments.train does, from the config's `curvature` block), the loop
makes its steps sync points and the hook calls `CurvatureTracker.measure` there.
The eigenvalue comes from power iteration (`spectrum.power_iteration`) warm-started from the
previous measurement's eigenvector: between two nearby points of a run the top eigenvector moves
little, so a few Hessian-vector products bring the relative residual ||Hv - lambda v|| / |lambda|
below `tol`. The first measurement of a process (and the first after a resume) starts cold,
from Lanczos (at most `cold_iters` steps: near-degenerate top pairs need more than a warm start),
and takes more. Power iteration finds the eigenvalue of largest magnitude, the top
positive one for the networks trained here. Every entry records the residual of its eigenpair
and whether it met `tol` within `power_iters` products (`converged`), in results.json and in
TensorBoard next to the eigenvalue.

The Hessian is that of `hessian.model_batch_loss` (evaluation mode: BatchNorm's running
statistics, no dropout, no augmentation), through `hessian.dataset_hvp` on batches placed with
`parallel.global_batch` over the run's mesh, so every process of a multi-process run computes
the same value. The loss function is built once per tracker and the BatchNorm statistics travel
as data, so the Hessian-vector product compiles once per run.
"""

from __future__ import annotations

import time

import jax
from absl import logging

from dlassign.analysis.hessian import operators
from dlassign.analysis.hessian.operators import dataset_hvp, model_batch_loss
from dlassign.analysis.hessian.spectrum import hutchinson_trace, power_iteration
from dlassign.data import Dataset
from dlassign.runtime import parallel
from dlassign.training.hooks import Hook


def sample_batches(dataset: Dataset, num_examples: int, seed: int, mesh, max_batch: int
                   ) -> tuple[list[dict], int]:
    """The fixed stratified training sample (chosen by `seed`) as padded, masked batches on the
    mesh, and its number of examples. Batches hold at most `max_batch` rows (a multiple of the
    mesh size), fewer when the sample is smaller."""
    devices = mesh.devices.size
    return operators.sample_batches(dataset.train, num_examples, seed, mesh,
                                    lambda n: min(max_batch, -(-n // devices) * devices),
                                    "the curvature batch size")


class CurvatureTracker:
    """Measures the top Hessian eigenvalue of a run's training loss at the steps it is due.

    Args:
      config: the `curvature` config block (configs/base.py).
      model: the run's Flax module.
      loss: the run's loss name.
      dataset: the run's dataset; the sample comes from its training split.
      mesh: the run's device mesh.
      seed: fixes the sample and the random start and probe vectors.
      max_batch: the most rows per Hessian-vector product batch (e.g. eval_batch_size).
    """

    def __init__(self, config, model, loss: str, dataset: Dataset, mesh, seed: int,
                 max_batch: int):
        self.every_steps = int(config.get("every_steps", 0))  # for the log line
        self.num_examples = int(config.get("num_examples", 256))
        self.power_iters = int(config.get("power_iters", 10))
        self.cold_iters = int(config.get("cold_iters", 30))
        self.tol = float(config.get("tol", 1e-3))
        self.trace_samples = int(config.get("trace_samples", 0))
        self.dataset, self.mesh, self.seed, self.max_batch = dataset, mesh, seed, max_batch
        self._batches: list[dict] | None = None
        self._count = 0
        self._vector = None  # the previous measurement's eigenvector: the next start
        # Start vectors live where the products' outputs do (replicated over the mesh), so the
        # product compiles once.
        self._place = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))

        def batch_loss(params, batch):
            # BatchNorm's statistics come in the batch, so this one function (and its compiled
            # product) serves every measurement of the run
            inner = model_batch_loss(model, batch["fixed"], loss, dataset.normalizer)
            return inner(params, {k: v for k, v in batch.items() if k != "fixed"})

        self._batch_loss = batch_loss

    def measure(self, state, step: int) -> dict:
        """The curvature at `state` (a TrainState): {step, top_eigenvalue, residual (its relative
        residual), converged (residual <= tol), iterations (Hessian-vector products of the
        eigenvalue), seconds, and trace and trace_standard_error with trace_samples}."""
        start = time.perf_counter()
        if self._batches is None:
            self._batches, self._count = sample_batches(self.dataset, self.num_examples,
                                                        self.seed, self.mesh, self.max_batch)
            logging.info("curvature: top Hessian eigenvalue every %d steps on %d training "
                         "examples", self.every_steps, self._count)
        fixed = {"batch_stats": state.batch_stats} if state.batch_stats else {}
        batches = [dict(b, fixed=fixed) for b in self._batches]
        matvec, x0, _ = dataset_hvp(self._batch_loss, state.params, batches,
                                    on_dispatch=parallel.DispatchLimiter(), count=self._count)
        calls = [0]

        def counted(v):
            calls[0] += 1
            return matvec(v)

        dim = int(x0.size)
        # the key draws the Lanczos start of a cold measurement (no previous vector)
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        pairs = power_iteration(counted, dim, 1, key, max_iters=self.power_iters, tol=self.tol,
                                dtype=x0.dtype, start=self._vector, cold_iters=self.cold_iters)
        self._vector = self._place(pairs.vectors[0])
        entry = {"step": int(step), "top_eigenvalue": float(pairs.values[0]),
                 "residual": float(pairs.residuals[0]), "converged": bool(pairs.converged[0]),
                 "iterations": calls[0]}
        if self.trace_samples:
            probes = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
            trace, se = hutchinson_trace(matvec, dim, self.trace_samples, probes, x0.dtype)
            entry.update(trace=trace, trace_standard_error=se)
        entry["seconds"] = time.perf_counter() - start
        logging.info("step %d curvature: top eigenvalue %.5g (%d products, relative residual "
                     "%.2g%s)%s, %.2f s", step, entry["top_eigenvalue"], calls[0],
                     entry["residual"], "" if entry["converged"] else ", NOT converged",
                     f", trace {entry['trace']:.5g}" if "trace" in entry else "",
                     entry["seconds"])
        return entry


def board_scalars(entry: dict) -> dict:
    """The scalars of one measurement that TensorBoard shows under `curvature/`: converged is
    1 or 0."""
    return {k: float(entry[k]) for k in ("top_eigenvalue", "residual", "converged", "trace",
                                         "iterations") if k in entry}


def resumed_entries(entries: list[dict], step: int) -> list[dict]:
    """The entries a checkpoint of `step` carries (a resumed run measures the later ones
    again)."""
    return [dict(e) for e in entries if int(e["step"]) <= step]


class CurvatureHook(Hook):
    """Curvature tracking as a training hook: measures at the multiples of the `curvature`
    block's `every_steps`, into TensorBoard's `curvature/` scalars and results.json's
    `curvature` entries; a resumed run keeps the entries of its checkpoint."""

    name = "curvature"

    def __init__(self, config):
        self.config, self.every_steps = config, int(config.get("every_steps", 0))
        self.entries = []

    def begin(self, run, board, step, meta):
        c = run.config
        self.tracker = CurvatureTracker(self.config, run.model, c.loss, run.dataset, run.mesh,
                                        c.seed, c.eval_batch_size)
        self.board, self.entries = board, resumed_entries(meta.get("curvature", []), step)

    def __call__(self, state, step):
        self.entries.append(self.tracker.measure(state, step))
        self.board.scalars(step, board_scalars(self.entries[-1]), "train", "curvature/")

    def record(self):
        return {"curvature": list(self.entries)}


def hooks(config) -> list[Hook]:
    """The training hooks a training config asks for: curvature tracking where
    `curvature.every_steps` is set."""
    curvature = config.get("curvature", {})
    return [CurvatureHook(curvature)] if curvature.get("every_steps", 0) else []


__all__ = ["CurvatureHook", "CurvatureTracker", "board_scalars", "hooks", "resumed_entries",
           "sample_batches"]
