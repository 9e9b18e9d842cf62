"""Loss landscapes around a trained point: slices along the top Hessian eigenvectors and along
filter-normalised random directions (Li, Xu, Taylor, Studer and Goldstein, "Visualizing the Loss
Landscape of Neural Nets", NeurIPS 2018), in one and two dimensions.

The functions up to `curvature_check` are pure functions of parameter pytrees and batches;
`checkpoint_landscape` applies them to a checkpoint written by `experiments.train`, on a fixed
stratified sample of its training split, and writes the JSON and the figure.

Coordinates: a point of the slice is `params + sum_k coords[k] * directions[k]`. Eigenvector
directions have unit Euclidean norm, so a coordinate is a distance in parameter space and
L(a) ~ L(0) + g a + lambda a^2 / 2 along an eigenvector of eigenvalue lambda; the second
difference (L(h) - 2 L(0) + L(-h)) / h^2 at the centre of the slice then estimates lambda
(`curvature_check`). Filter-normalised directions have, filter by filter, the norm of the
weights, so coordinate 1 moves each filter by its own size (Li et al.'s units).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree

from dlassign.analysis.hessian import dataset_hvp, lanczos_eigenpairs, model_batch_loss
from dlassign.analysis.hessian.operators import flatten, row_count, sample_batches
from dlassign.errors import ConfigError, NumericalError, one_of
from dlassign.report import plt
from dlassign.runtime import parallel
from dlassign.runtime.files import write_json
from dlassign.training.evaluation import restore_run
from dlassign.training.train_state import init_compiler_options

# Fewer Lanczos steps miss the top eigenpair: on a digits MLP whose top eigenvalue is 2.2661, one
# step gave 0.001 (relative residual 49), two 0.67-1.3 (~1), five 2.21 (0.09), ten 2.2655 (0.01),
# twenty 2.2661 (2e-6). The residuals are reported with the result, with a converged flag each;
# experiments.landscape's --lanczos_order has the same lower bound.
MIN_LANCZOS_ORDER = 10


def filter_normalized_direction(params, key: jax.Array):
    """A Gaussian random direction in parameter space, filter-normalised (Li et al., 2018).

    Every leaf with two or more axes is a kernel whose last axis indexes its filters (Flax's
    Dense [in, out] and Conv [kh, kw, in, out]): the direction's slice for filter j is rescaled
    to the norm of the weights' filter j. Leaves with fewer axes (biases, BatchNorm scales and
    offsets) get a zero direction, as in the paper.

    Args:
      params: the parameter pytree the direction will be added to.
      key: a PRNG key.

    Returns:
      A pytree of the structure, shapes and dtypes of `params`.
    """
    return _direction_program()(params, key)


@functools.cache
def _direction_program() -> Callable:
    """The direction as one program, compiled like an initialiser (LLVM -O1 on the CPU: under
    half the compile time of the default level, bitwise its result); eagerly every leaf shape
    compiled its own draw and norms, twice as long again."""
    return jax.jit(_direction, compiler_options=init_compiler_options())


def _direction(params, key: jax.Array):
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for leaf, k in zip(leaves, jax.random.split(key, len(leaves))):
        leaf = jnp.asarray(leaf)
        if leaf.ndim < 2:
            out.append(jnp.zeros_like(leaf))
            continue
        d = jax.random.normal(k, leaf.shape, leaf.dtype)
        axes = tuple(range(leaf.ndim - 1))
        weight_norm = jnp.sqrt(jnp.sum(leaf**2, axis=axes, keepdims=True))
        direction_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
        out.append(d * weight_norm / jnp.maximum(direction_norm, jnp.finfo(leaf.dtype).tiny))
    return jax.tree.unflatten(treedef, out)


def slice_coords(span: float, num_points: int, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid of a 1-D or 2-D slice: `num_points` (odd, so the centre is on it) per axis.

    Returns:
      (axis float64[num_points] from -span to span, coords float64[num_points**dims, dims] in
      row-major order: coords[i * num_points + j] = (axis[i], axis[j]) for dims = 2).
    """
    if dims not in (1, 2):
        raise ConfigError(f"dims={dims} is not 1 or 2")
    if num_points < 3 or num_points % 2 == 0:
        raise ConfigError(f"num_points={num_points} must be odd and at least 3, so the grid "
                          "holds the centre and its neighbours")
    if not (np.isfinite(span) and span > 0):
        raise ConfigError(f"span={span} is invalid; expected a positive finite number")
    axis = np.linspace(-span, span, num_points)
    mesh = np.meshgrid(*([axis] * dims), indexing="ij")
    return axis, np.stack([m.ravel() for m in mesh], axis=1)


def loss_along(batch_loss: Callable, params, directions: Sequence, coords: np.ndarray,
               batches: Iterable[dict], points_per_call: int = 8,
               on_dispatch: Callable | None = None) -> np.ndarray:
    """The mean loss over `batches` at `params + coords[i] @ directions`, for every row i.

    Points are evaluated `points_per_call` at a time under one jitted `vmap` (the last call is
    padded, so the function compiles once); the batches' sums are added up per point and divided
    by the number of real (unmasked) rows, as `hessian.dataset_hvp` weighs them.

    Args:
      batch_loss: `(params, batch) -> (loss sum, count)`, e.g. `hessian.model_batch_loss`.
      params: the centre of the slice.
      directions: k pytrees shaped like `params`.
      coords: float[n, k] (or float[n] when k = 1).
      batches: a re-iterable collection (a list) of batches.
      points_per_call: grid points per jitted call (memory: this many forward passes per batch).
      on_dispatch: called with each partial result (e.g. a `DispatchLimiter`).

    Returns:
      float64[n].
    """
    batches = list(batches)
    x0, _ = flatten(params)
    basis = jnp.stack([flatten(d)[0] for d in directions]).astype(x0.dtype)
    coords = np.asarray(coords, np.float64).reshape(-1, basis.shape[0])
    total = row_count(batch_loss, params, batches)
    n = coords.shape[0]
    padded = np.concatenate([coords, np.zeros((-n % points_per_call, coords.shape[1]))])
    out = []
    for start in range(0, padded.shape[0], points_per_call):
        chunk = jnp.asarray(padded[start:start + points_per_call], x0.dtype)
        sums = jnp.zeros((points_per_call,), x0.dtype)
        for b in batches:
            sums = sums + _chunk_sums(batch_loss, params, basis, chunk, b)
            if on_dispatch is not None:
                on_dispatch(sums)
        out.append(sums)
    return np.asarray(jnp.concatenate(out), np.float64)[:n] / total


@functools.partial(jax.jit, static_argnums=0)
def _chunk_sums(batch_loss: Callable, params, basis: jax.Array, chunk: jax.Array, batch: dict
                ) -> jax.Array:
    """One batch's loss sums at `params + c @ basis` for each row c of `chunk`; compiled once
    per `batch_loss` object and shapes."""
    x0, unravel = ravel_pytree(params)
    return jax.vmap(lambda c: batch_loss(unravel(x0 + c @ basis), batch)[0])(chunk)


def top_eigenvectors(matvec: Callable, unravel: Callable, dim: int, k: int, order: int,
                     rng: jax.Array, dtype=jnp.float32, tol: float = 1e-4
                     ) -> tuple[np.ndarray, list, np.ndarray, np.ndarray]:
    """The k largest eigenvalues of H and their unit eigenvectors, as Ritz pairs of Lanczos
    (full re-orthogonalisation) of at most `order` steps, fewer where every pair's relative
    residual is below `tol` (`hessian.lanczos_eigenpairs`).

    Returns:
      (eigenvalues float64[k], decreasing (Rayleigh quotients of the vectors returned); k
      direction pytrees; relative residuals ||H v - lambda v|| / |lambda| float64[k], each one
      more HVP; converged bool[k], residual <= tol).
    """
    pairs = lanczos_eigenpairs(matvec, dim, k, rng, tol, max(order, k), "largest", dtype)
    directions = [unravel(jnp.asarray(v, dtype)) for v in pairs.vectors]
    return pairs.values, directions, pairs.residuals, pairs.converged


def curvature_check(batch_loss: Callable, params, directions: Sequence,
                    eigenvalues: Sequence[float], batches: Iterable[dict], steps: Sequence[float],
                    points_per_call: int = 8) -> list[dict]:
    """Second differences of the loss along unit eigenvectors, against their eigenvalues.

    For a loss that is quadratic near `params`, (L(h v) - 2 L(0) + L(-h v)) / h^2 = v^T H v
    at every step h; for a smooth loss it tends to v^T H v as h -> 0. ReLU and max-pool networks
    are only piecewise smooth: a segment [-h v, h v] that changes many units' activation
    pattern adds the kinks' curvature, which the Hessian (autodiff, at one point) does not see,
    so the ratio approaches 1 only at steps short enough to cross few kinks (the MNIST CNN on
    1,026 images: 0.89 to 1.09 for steps from 0.07 to 3e-5, 1.0000 below 1e-5), and round-off
    (float64 advised) sets the floor.

    Args:
      batch_loss, params, batches: as for `loss_along`.
      directions: unit-norm eigenvector pytrees.
      eigenvalues: their eigenvalues.
      steps: the steps h, e.g. the slice's grid step and its halvings.

    Returns:
      one dict per direction: eigenvalue, steps, second_differences and ratios (second
      difference / eigenvalue) per step, and ratio, the ratio at the smallest step.
    """
    dims = len(directions)
    coords = [np.zeros(dims)]
    for k in range(dims):
        for h in steps:
            for sign in (1.0, -1.0):
                coords.append(sign * h * np.eye(dims)[k])
    losses = loss_along(batch_loss, params, directions, np.stack(coords), batches,
                        points_per_call)
    centre, rest = losses[0], losses[1:].reshape(dims, len(steps), 2)
    out = []
    for k, eigenvalue in enumerate(eigenvalues):
        second = [float((plus - 2 * centre + minus) / h**2)
                  for (plus, minus), h in zip(rest[k], steps)]
        ratios = [d / float(eigenvalue) for d in second]
        smallest = int(np.argmin(steps))
        out.append({"eigenvalue": float(eigenvalue), "steps": [float(h) for h in steps],
                    "second_differences": second, "ratios": ratios,
                    "ratio": ratios[smallest]})
    return out


def curvature_steps(axis: np.ndarray) -> list[float]:
    """The steps of `curvature_check` for a slice's `axis`: its grid step down to 1e-5 of it."""
    return [float(axis[1] - axis[0]) / 10**j for j in range(6)]


def checkpoint_landscape(workdir: str, directions: str = "eigen", dims: int = 1,
                         num_points: int = 31, span: float | None = None,
                         sample_size: int = 1024, batch_size: int = 256,
                         lanczos_order: int = 40, points_per_call: int = 8, seed: int = 0,
                         step: int | None = None, out: str | None = None,
                         overrides: dict | None = None, which: str = "latest",
                         tol: float = 1e-4) -> dict:
    """The loss of a checkpoint on a 1-D or 2-D slice through it, on a fixed stratified sample
    of the training split; writes landscape_{directions}_{dims}d.json and .png into `out`
    (default: `workdir`).

    BatchNorm uses its running statistics and dropout is off, as for `hessian_spectrum`: the
    loss is the function of the parameters whose Hessian gives the eigenvectors.

    Args:
      directions: 'eigen' (the top `dims` Hessian eigenvectors, by Lanczos) or 'random'
        (filter-normalised Gaussian directions).
      span: the slice covers [-span, span] per axis; default 1 for random directions (Li et
        al.'s units) and sqrt(2 / lambda_1) for eigenvectors (where the quadratic model along
        the top eigenvector has risen by 1).
      which: 'latest' or 'best' (by validation accuracy), as `restore_run` takes it.
      tol: the relative residual ||Hv - lambda v|| / |lambda| at which an eigenvector counts as
        converged (the result's `residual` and `converged`, one per eigenvector).
      Others: as `experiments.landscape`'s flags.
    """
    if directions not in ("eigen", "random"):
        raise one_of("directions", directions, ("eigen", "random"))
    axis, _ = slice_coords(1.0 if span is None else span, num_points, dims)  # bad flags first
    for name, value, least in (("sample_size", sample_size, 1), ("batch_size", batch_size, 1),
                               ("lanczos_order", lanczos_order, MIN_LANCZOS_ORDER),
                               ("points_per_call", points_per_call, 1)):
        if value < least:
            raise ConfigError(f"{name}={value} is invalid; expected an integer >= {least}")
    if not 0 < tol < 1:
        raise ConfigError(f"tol={tol} is invalid; expected a relative residual in (0, 1)")
    if directions == "eigen" and span is not None and not curvature_steps(axis)[-1] ** 2:
        raise ConfigError(f"span={span:g} is too small for the second differences along the "
                          "eigenvectors (their steps' squares underflow float64); use a span of "
                          "at least 1e-140")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"out={out} is a file; expected a directory")
    run, state, _ = restore_run(workdir, step, overrides, which=which)
    batches, num_sample = sample_batches(run.dataset.train, sample_size, seed, run.mesh,
                                         batch_size)
    batch_loss = model_batch_loss(run.model, state.variables, run.config.loss,
                                  run.dataset.normalizer)
    limiter = parallel.DispatchLimiter()
    key_eigen, key_random = jax.random.split(jax.random.PRNGKey(seed))
    start = time.perf_counter()
    result = {"model": run.config.model.name, "dataset": run.dataset.name,
              "step": int(state.step), "loss": run.config.loss, "num_examples": num_sample,
              "directions": directions, "dims": dims, "seed": seed}
    if directions == "eigen":
        matvec, x0, unravel = dataset_hvp(batch_loss, state.params, batches, on_dispatch=limiter)
        eigenvalues, vectors, residuals, converged = top_eigenvectors(
            matvec, unravel, int(x0.size), dims, lanczos_order, key_eigen, x0.dtype, tol)
        logging.info("top %d Hessian eigenvalues %s (relative residuals %s)", dims,
                     np.round(eigenvalues, 5), np.array2string(residuals, precision=2))
        if not converged.all():
            logging.warning("the top %d eigenvectors did not all reach the relative residual %g "
                            "in %d Lanczos steps; raise lanczos_order", dims, tol, lanczos_order)
        if span is None:
            span = float(np.sqrt(2.0 / eigenvalues[0])) if eigenvalues[0] > 0 else 1.0
        result.update(eigenvalues=eigenvalues.tolist(), residual=residuals.tolist(),
                      converged=converged.tolist(), tol=tol, lanczos_order=lanczos_order)
    else:
        vectors = [filter_normalized_direction(state.params, k)
                   for k in jax.random.split(key_random, dims)]
        span = 1.0 if span is None else span
    x0, _ = flatten(state.params)
    axis, coords = slice_coords(span, num_points, dims)
    losses = loss_along(batch_loss, state.params, vectors, coords, batches, points_per_call,
                        on_dispatch=limiter).reshape((num_points,) * dims)
    if not np.isfinite(losses).all():
        raise NumericalError(f"the loss is not finite at {int((~np.isfinite(losses)).sum())} of "
                             f"{losses.size} points of the slice (span={span:g}); a smaller span "
                             "keeps the parameters where the loss is defined")
    result.update(num_params=int(x0.size), span=span, num_points=num_points,
                  axis=axis.tolist(), losses=losses.tolist(),
                  center_loss=float(losses[(num_points // 2,) * dims]),
                  direction_norms=[float(jnp.linalg.norm(flatten(v)[0])) for v in vectors],
                  parameter_norm=float(jnp.linalg.norm(x0)))
    if directions == "eigen":
        # The grid's step down to 1e-5 of it, in float64 (float32 would round the second
        # difference off): ReLU networks need the short steps (`curvature_check`).
        steps = curvature_steps(axis)
        with jax.enable_x64(True):
            to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
            result["curvature"] = curvature_check(batch_loss, to64(state.params),
                                                  [to64(v) for v in vectors],
                                                  result["eigenvalues"], batches, steps,
                                                  points_per_call)
        for k, c in enumerate(result["curvature"]):
            logging.info("eigenvector %d (eigenvalue %.5g): second difference / step^2 over the "
                         "eigenvalue: %s", k + 1, c["eigenvalue"], ", ".join(
                             f"{q:.4f} at step {h:.2g}" for q, h in zip(c["ratios"], c["steps"])))
    result["seconds"] = time.perf_counter() - start
    out = out or workdir
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"landscape_{directions}_{dims}d")
    write_json(stem + ".json", result)
    landscape_plot(result, stem + ".png")
    return result


def landscape_plot(result: dict, path: str) -> None:
    """A line (1-D, with the quadratic model of the eigenvalue for eigenvectors) or filled
    contours (2-D) of the loss over the slice."""
    pyplot = plt()
    from matplotlib.colors import LogNorm

    axis, losses = np.asarray(result["axis"]), np.asarray(result["losses"])
    eigen = result["directions"] == "eigen"
    names = ([f"eigenvector {k + 1} (lambda={v:.3g})" for k, v in enumerate(result["eigenvalues"])]
             if eigen else [f"filter-normalised direction {k + 1}" for k in range(result["dims"])])
    title = (f"{result['model']} on {result['dataset']}, step {result['step']}: "
             f"{result['loss']} on {result['num_examples']} training examples")
    if result["dims"] == 1:
        fig, ax = pyplot.subplots(figsize=(6, 4))
        ax.plot(axis, losses, "o-", ms=3, label="loss")
        if eigen:
            c = axis.shape[0] // 2
            h = axis[c + 1] - axis[c]
            slope = (losses[c + 1] - losses[c - 1]) / (2 * h)
            quad = losses[c] + slope * axis + 0.5 * result["eigenvalues"][0] * axis**2
            curvature = result["curvature"][0]
            ax.plot(axis, quad, "--", label="quadratic model of the eigenvalue; second "
                    f"difference / eigenvalue\n{curvature['ratios'][0]:.3f} at the grid's step, "
                    f"{curvature['ratio']:.4f} at step {min(curvature['steps']):.1g}")
        if losses.min() > 0 and losses.max() > 100 * losses.min():
            ax.set_yscale("log")  # a cross-entropy wall next to the minimum: both stay visible
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel(names[0] + (" (parameter distance)" if eigen else ""))
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    else:
        fig, ax = pyplot.subplots(figsize=(5.6, 4.8))
        lo, hi = float(losses.min()), float(losses.max())
        logarithmic = lo > 0 and hi > 100 * lo  # a cross-entropy wall: levels by factors
        levels = np.geomspace(lo, hi, 25) if logarithmic else np.linspace(lo, hi + 1e-12, 25)
        norm = LogNorm(lo, hi) if logarithmic else None
        filled = ax.contourf(axis, axis, losses.T, levels=levels, norm=norm, cmap="viridis")
        ax.contour(axis, axis, losses.T, levels=levels, norm=norm, colors="k", linewidths=0.3)
        fig.colorbar(filled, ax=ax, label="training loss" + (" (log scale)" if logarithmic else ""),
                     ticks=levels[::4], format="%.3g")
        ax.plot([0], [0], "r+", ms=10)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)
