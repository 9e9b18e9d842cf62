"""Spectral estimates from Hessian-vector products: Lanczos, SLQ density, power iteration, trace.

Lanczos keeps every basis vector and re-orthogonalises against all of them (classical
Gram-Schmidt, twice), as google/spectral-density does; in exact arithmetic that changes nothing,
in floating point it keeps spurious copies of converged eigenvalues out of the tridiagonal matrix.
Eigenvalues of symmetric matrices always come from `eigh`/`eigvalsh`, never a general `eig`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dlassign.analysis.hessian.operators import MatVec


@jax.jit
def _orthogonalise(basis: jax.Array, w: jax.Array) -> jax.Array:
    """w minus its projection on the rows of `basis` (zero rows are inert), applied twice."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def lanczos(matvec: MatVec, dim: int, order: int, rng: jax.Array, dtype=jnp.float32
            ) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos tridiagonalisation with full re-orthogonalisation.

    When the Krylov space is exhausted (beta ~ 0, e.g. at order = dim) the iteration restarts
    from a random vector orthogonal to the basis, so T's eigenvalues stay those of H.

    Args:
      matvec: v -> H v on float[dim].
      dim: the number of parameters P.
      order: m, the size of the tridiagonal matrix (m <= P).
      rng: a PRNG key for the starting vector.
      dtype: float32, or float64 (with x64 enabled) where signs matter.

    Returns:
      tridiag float64[m, m] and the basis V dtype[m, P] (H ~ V^T T V on the Krylov space).
    """
    order = min(order, dim)
    basis = jnp.zeros((order, dim), dtype)
    tridiag = np.zeros((order, order))
    keys = jax.random.split(rng, order + 1)
    v = jax.random.normal(keys[0], (dim,), dtype)
    v = v / jnp.linalg.norm(v)
    beta, v_prev = 0.0, jnp.zeros((dim,), dtype)
    scale = 0.0
    for i in range(order):
        basis = basis.at[i].set(v)
        w = matvec(v) - beta * v_prev
        alpha = float(jnp.vdot(w, v))
        tridiag[i, i] = alpha
        w = _orthogonalise(basis, w - alpha * v)
        beta = float(jnp.linalg.norm(w))
        scale = max(scale, abs(alpha), beta)
        if i + 1 == order:
            break
        if beta <= 1e3 * jnp.finfo(dtype).eps * max(scale, 1e-30):
            # Invariant subspace found: continue from a fresh orthogonal direction.
            w = _orthogonalise(basis, jax.random.normal(keys[i + 1], (dim,), dtype))
            v_prev, v, beta = v, w / jnp.linalg.norm(w), 0.0
            continue
        tridiag[i, i + 1] = tridiag[i + 1, i] = beta
        v_prev, v = v, w / beta
    return tridiag, np.asarray(basis)


def ritz(tridiag: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values (ascending) and SLQ weights (squared first components of T's eigenvectors)."""
    values, vectors = np.linalg.eigh(tridiag)
    return values, vectors[0] ** 2


@dataclasses.dataclass(frozen=True)
class Density:
    """A spectral density on a grid, from stochastic Lanczos quadrature."""

    grid: np.ndarray
    density: np.ndarray
    ritz_values: list[np.ndarray]
    weights: list[np.ndarray]


def slq_density(matvec: MatVec, dim: int, order: int, num_draws: int, rng: jax.Array,
                num_points: int = 1000, sigma_fraction: float = 0.01, dtype=jnp.float32,
                tail_sigmas: float = 6.0) -> Density:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani, Krishnan and Xiao, 2019).

    Each draw runs Lanczos from a random vector; its Ritz values, weighted by the squared first
    eigenvector components, estimate the spectral measure; a Gaussian kernel of width
    `sigma_fraction` of the spectrum's range smooths them, and the draws are averaged.

    The grid reaches `tail_sigmas` kernel widths past the extreme Ritz values, and each Ritz
    value's kernel is normalised to unit mass on the grid (trapezoid rule), so mass bunched at an
    edge of the spectrum (the many near-zero eigenvalues of a trained network) keeps its tail:
    the density integrates to 1 and its first moment is the quadrature's, sum_i w_i theta_i
    averaged over the draws (an estimate of tr(H) / dim), to about 1e-9 (the kernels' mass
    beyond 6 widths).

    Returns:
      The density on `num_points` grid points; it integrates to 1.
    """
    values, weights = [], []
    for key in jax.random.split(rng, num_draws):
        t, _ = lanczos(matvec, dim, order, key, dtype)
        v, w = ritz(t)
        values.append(v)
        weights.append(w)
    lo = min(v.min() for v in values)
    hi = max(v.max() for v in values)
    # A one-point spectrum (H = c I) still gets a kernel wide enough to resolve in float64.
    width = max(hi - lo, 1e-6 * max(abs(lo), abs(hi)), 1e-12)
    sigma = sigma_fraction * width
    grid = np.linspace(lo - tail_sigmas * sigma, hi + tail_sigmas * sigma, num_points)
    density = np.zeros_like(grid)
    for v, w in zip(values, weights):
        kernel = np.exp(-((grid[:, None] - v[None, :]) ** 2) / (2 * sigma**2))
        kernel /= np.trapezoid(kernel, grid, axis=0)  # unit mass per Ritz value, on this grid
        density += kernel @ (w / w.sum())  # the weights sum to 1 up to round-off
    return Density(grid, density / num_draws, values, weights)


def power_iteration(matvec: MatVec, dim: int, k: int, rng: jax.Array, max_iters: int = 100,
                    tol: float = 1e-6, dtype=jnp.float32, start: jax.Array | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The k eigenvalues of largest magnitude, by power iteration with deflation (PyHessian).

    Each eigenvector is found by power iteration on H restricted to the orthogonal complement of
    those already found; iteration stops when the Rayleigh quotient changes by less than
    `tol` relative.

    Args:
      start: warm start: float[dim] for the first eigenvector, or [j, dim] for the first j
        (e.g. the vectors a previous call returned, at a nearby point); the others start from
        random vectors drawn from `rng`. A start vector of zeros falls back to a random one.

    Returns:
      eigenvalues float64[k] (in the order found: decreasing magnitude) and vectors [k, dim].
    """
    found: list[jax.Array] = []
    values = []
    starts = [] if start is None else [start] if np.ndim(start) == 1 else list(start)
    keys = None
    for i in range(k):
        basis = jnp.stack(found) if found else jnp.zeros((1, dim), dtype)
        norm = 0.0
        if i < len(starts):
            v, norm = _unit(basis, jnp.asarray(starts[i], dtype))
        if not float(norm) > 0:
            keys = jax.random.split(rng, k) if keys is None else keys
            v, _ = _unit(basis, jax.random.normal(keys[i], (dim,), dtype))
        value = None
        for _ in range(max_iters):
            new, v = _rayleigh_step(basis, v, matvec(v))
            new = float(new)
            if value is not None and abs(new - value) <= tol * (abs(value) + 1e-30):
                value = new
                break
            value = new
        found.append(v)
        values.append(value)
    return np.asarray(values, np.float64), np.stack([np.asarray(v) for v in found])


@jax.jit
def _unit(basis: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w off the rows of `basis`, normalised, and its norm before normalising."""
    w = _orthogonalise(basis, w)
    norm = jnp.linalg.norm(w)
    return w / norm, norm


@jax.jit
def _rayleigh_step(basis: jax.Array, v: jax.Array, hv: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """One power step off the rows of `basis`, in one program: the Rayleigh quotient v.Hv and
    the next vector, Hv normalised."""
    hv = _orthogonalise(basis, hv)
    return jnp.vdot(v, hv), hv / jnp.linalg.norm(hv)


def hutchinson_trace(matvec: MatVec, dim: int, num_samples: int, rng: jax.Array,
                     dtype=jnp.float32) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H) with Rademacher probes.

    Returns:
      (mean of v^T H v over the probes, its standard error).
    """
    samples = []
    for key in jax.random.split(rng, num_samples):
        v = jax.random.rademacher(key, (dim,), dtype)
        samples.append(float(jnp.vdot(v, matvec(v))))
    samples = np.asarray(samples)
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(num_samples))
