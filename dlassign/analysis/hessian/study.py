"""The Hessian spectrum of a trained network, from a checkpoint written by `experiments.train`."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from dlassign.analysis.hessian.operators import dataset_hvp, model_batch_loss, sample_batches
from dlassign.analysis.hessian.spectrum import hutchinson_trace, power_iteration, slq_density
from dlassign.errors import ConfigError
from dlassign.report import plt
from dlassign.runtime import parallel
from dlassign.runtime.files import save_figure, write_json
from dlassign.training.evaluation import restore_run


def checkpoint_spectrum(workdir: str, num_examples: int = 4096, batch_size: int = 512,
                        lanczos_order: int = 90, num_draws: int = 3, top_k: int = 5,
                        power_iters: int = 50, trace_samples: int = 100, seed: int = 0,
                        step: int | None = None, overrides: dict | None = None,
                        tol: float = 1e-4) -> dict:
    """Top eigenvalues, the most negative one, the trace and the density of a checkpoint's
    training-loss Hessian, on a fixed stratified sample of the training split.

    The top eigenvalues (by magnitude) come from power iteration with deflation started from
    Lanczos; each carries its relative residual ||Hv - lambda v|| / |lambda| and whether it met
    `tol` within `power_iters` products (`residual`, `converged`).

    BatchNorm uses its running statistics and dropout is off (the loss is a function of the
    parameters alone). Writes hessian_spectrum.json and hessian_density.png into `workdir`.

    Raises:
      ConfigError: a count below its least working value (trace_samples: 2, for the standard
        error), before the checkpoint is read.
    """
    for name, value, least in (("num_examples", num_examples, 1), ("batch_size", batch_size, 1),
                               ("lanczos_order", lanczos_order, 1), ("num_draws", num_draws, 1),
                               ("top_k", top_k, 1), ("power_iters", power_iters, 1),
                               ("trace_samples", trace_samples, 2)):
        if value < least:
            raise ConfigError(f"{name}={value} is invalid; expected an integer >= {least}")
    if not 0 < tol < 1:
        raise ConfigError(f"tol={tol} is invalid; expected a relative residual in (0, 1)")
    run, state, _ = restore_run(workdir, step, overrides)
    batches, num_sample = sample_batches(run.dataset.train, num_examples, seed, run.mesh,
                                         batch_size)
    batch_loss = model_batch_loss(run.model, state.variables, run.config.loss,
                                  run.dataset.normalizer)
    matvec, x0, _ = dataset_hvp(batch_loss, state.params, batches,
                                on_dispatch=parallel.DispatchLimiter())
    dim = int(x0.size)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    logging.info("Hessian of %s (%d parameters) on %d training examples", run.config.model.name,
                 dim, num_sample)
    start = time.perf_counter()
    pairs = power_iteration(matvec, dim, top_k, keys[0], max_iters=power_iters, tol=tol)
    logging.info("top %d eigenvalues by magnitude: %s (relative residuals %s)", top_k,
                 np.round(pairs.values, 4), np.array2string(pairs.residuals, precision=2))
    if not pairs.all_converged:
        logging.warning("%d of the top %d eigenvalues did not reach the relative residual %g "
                        "within %d products each; raise power_iters", int((~pairs.converged)
                                                                          .sum()), top_k, tol,
                        power_iters)
    density = slq_density(matvec, dim, lanczos_order, num_draws, keys[1])
    trace, trace_se = hutchinson_trace(matvec, dim, trace_samples, keys[2])
    elapsed = time.perf_counter() - start
    lowest = float(min(v.min() for v in density.ritz_values))
    highest = float(max(v.max() for v in density.ritz_values))
    result = {
        "model": run.config.model.name, "step": int(state.step), "num_params": dim,
        "num_examples": num_sample, "loss": run.config.loss,
        "top_eigenvalues": pairs.values.tolist(), "residual": pairs.residuals.tolist(),
        "converged": pairs.converged.tolist(), "tol": tol,
        "lanczos_max": highest, "lanczos_min": lowest,
        "most_negative_to_top_ratio": lowest / highest if highest else None,
        "trace": trace, "trace_standard_error": trace_se,
        "lanczos_order": lanczos_order, "num_draws": num_draws, "trace_samples": trace_samples,
        "seconds": elapsed,
        "density": {"grid": density.grid.tolist(), "density": density.density.tolist()},
    }
    write_json(os.path.join(workdir, "hessian_spectrum.json"), result)
    density_plot(result, os.path.join(workdir, "hessian_density.png"))
    return result


def density_plot(result: dict, path: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.8))
    grid, density = np.asarray(result["density"]["grid"]), np.asarray(result["density"]["density"])
    ax.semilogy(grid, np.maximum(density, 1e-12))
    ax.set_ylim(bottom=max(1e-8, density[density > 0].min() if np.any(density > 0) else 1e-8))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ, Gaussian kernel)")
    ax.set_title(f"{result['model']} Hessian on {result['num_examples']} examples: "
                 f"[{result['lanczos_min']:.3g}, {result['lanczos_max']:.3g}]", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    pyplot.close(fig)
