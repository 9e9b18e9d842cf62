"""Spectral estimates from Hessian-vector products: Lanczos, SLQ density, power iteration, trace.

Lanczos keeps every basis vector and re-orthogonalises against all of them (classical
Gram-Schmidt, twice), as google/spectral-density does; in exact arithmetic that changes nothing,
in floating point it keeps spurious copies of converged eigenvalues out of the tridiagonal matrix.
Eigenvalues of symmetric matrices always come from `eigh`/`eigvalsh`, never a general `eig`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

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


def lanczos(matvec: MatVec, dim: int, order: int, rng: jax.Array, dtype=None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos tridiagonalisation with full re-orthogonalisation.

    When the Krylov space is exhausted (beta ~ 0, e.g. at order = dim) the iteration restarts
    from a random vector orthogonal to the basis, so T's eigenvalues stay those of H.

    Args:
      matvec: v -> H v on float[dim].
      dim: the number of parameters P.
      order: m, the size of the tridiagonal matrix (m <= P).
      rng: a PRNG key for the starting vector.
      dtype: float32, or float64 (with x64 enabled) where signs matter; None: `matvec.dtype`
        where the matvec carries one (`dataset_hvp`'s does), else float32.

    Returns:
      tridiag float64[m, m] and the basis V dtype[m, P] (H ~ V^T T V on the Krylov space).
    """
    tridiag, basis, _ = lanczos_run(matvec, dim, order, rng, _dtype(matvec, dtype))
    return tridiag, basis


def lanczos_run(matvec: MatVec, dim: int, order: int, rng: jax.Array, dtype,
                stop: Callable[[np.ndarray, float], bool] | None = None,
                start: jax.Array | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """`lanczos` from `start` (default: a random vector), stopping early where `stop(T, beta)`
    (T the tridiagonal matrix so far, beta the norm of the next Lanczos vector) says so; also
    returns that last beta, which bounds each Ritz pair's residual (beta |s_m|) for free."""
    order = min(order, dim)
    # Each step is one program (`_lanczos_step`) on a basis of `_basis_rows` rows, the unused
    # ones zero: runs of nearby orders share it instead of compiling their own.
    basis = jnp.zeros((_basis_rows(order, dim), dim), dtype)
    tridiag = np.zeros((order, order))
    v = (jax.random.normal(jax.random.fold_in(rng, 0), (dim,), dtype) if start is None
         else jnp.asarray(start, dtype))
    v = v / jnp.linalg.norm(v)
    beta, v_prev = 0.0, jnp.zeros((dim,), dtype)
    scale = 0.0
    size = order
    for i in range(order):
        hv = jnp.asarray(matvec(v))  # a host operator's NumPy product too
        if i == 0:  # every argument placed as the products are: one program, not one per kind
            basis, v, v_prev = _placed_like(hv, basis, v, v_prev)
        basis, w, alpha, norm = _lanczos_step(basis, np.int32(i), v, hv, v_prev,
                                              jnp.asarray(beta, dtype))
        alpha, beta = float(alpha), float(norm)
        tridiag[i, i] = alpha
        scale = max(scale, abs(alpha), beta)
        if i + 1 == order:
            break
        if not np.isfinite([alpha, beta]).all() or (
                stop is not None and stop(tridiag[:i + 1, :i + 1], beta)):
            size = i + 1
            break
        if beta <= 1e3 * jnp.finfo(dtype).eps * max(scale, 1e-30):
            # Invariant subspace found: continue from a fresh orthogonal direction.
            w = _orthogonalise(basis, jax.random.normal(jax.random.fold_in(rng, i + 1), (dim,),
                                                        dtype))
            v_prev, v, beta = v, w / jnp.linalg.norm(w), 0.0
            continue
        tridiag[i, i + 1] = tridiag[i + 1, i] = beta
        v_prev, v = v, w / beta
    return tridiag[:size, :size], np.asarray(basis)[:size], beta


def _placed_like(hv: jax.Array, basis: jax.Array, *vectors: jax.Array):
    """`basis` and `vectors` on the devices of a product `hv`, the basis's rows as `hv`."""
    sharding = hv.sharding
    rows = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        None, *sharding.spec)) if isinstance(sharding, jax.sharding.NamedSharding) else sharding)
    return jax.device_put(basis, rows), *(jax.device_put(v, sharding) for v in vectors)


def _basis_rows(order: int, dim: int) -> int:
    """The rows a Lanczos run of `order` steps allocates (at most `dim`): `order` rounded up to a
    power of two up to 16, to a multiple of 16 beyond, so a few shapes serve every order and a
    large model's basis grows by less than 16 rows."""
    rows = 1 << (order - 1).bit_length() if order <= 16 else -(-order // 16) * 16
    return min(rows, dim)


@jax.jit
def _lanczos_step(basis: jax.Array, i: jax.Array, v: jax.Array, hv: jax.Array,
                  v_prev: jax.Array, beta: jax.Array):
    """Row i of the basis set to v; alpha = v.(Hv - beta v_prev) and the next direction
    w = Hv - beta v_prev - alpha v off the basis, with its norm."""
    basis = basis.at[i].set(v)
    w = hv - beta * v_prev
    alpha = jnp.vdot(w, v)
    w = _orthogonalise(basis, w - alpha * v)
    return basis, w, alpha, jnp.linalg.norm(w)


def ritz_vector(coefficients: np.ndarray, basis: np.ndarray, dtype) -> jax.Array:
    """The unit vector sum_j s_j V_j from an eigenvector s of T and the basis V, on the host
    (where `lanczos_run` leaves V), so no program is compiled per Krylov size."""
    basis = np.asarray(basis)
    y = np.asarray(coefficients, basis.dtype) @ basis
    return jnp.asarray(y / np.linalg.norm(y), dtype)


def _dtype(matvec: MatVec, dtype):
    """The vectors' dtype: `dtype`, else the matvec's own (`dataset_hvp`'s matvec and
    `Curvature.matvec`'s object carry the parameters' dtype), else float32."""
    if dtype is None:
        dtype = getattr(matvec, "dtype", getattr(getattr(matvec, "__self__", None), "dtype",
                                                 jnp.float32))
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class Eigenpairs:
    """Eigenvalues with their eigenvectors and how far each pair is from converged.

    Attributes:
      values: float64[k] the eigenvalues (Rayleigh quotients of `vectors`).
      vectors: [k, P] unit eigenvectors (flat), or k parameter pytrees (`Curvature`).
      residuals: float64[k] ||H v - lambda v|| / |lambda| of each returned pair.
      converged: bool[k] residual <= tol.
      tol: the residual bound the pairs were asked to meet.
      products: the Hessian-vector products spent.
    """

    values: np.ndarray
    vectors: object
    residuals: np.ndarray
    converged: np.ndarray
    tol: float
    products: int

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    def summary(self) -> dict:
        """The JSON fields every reported eigenvalue carries: eigenvalues, residual,
        converged (lists, one per eigenvalue), tol and products."""
        return {"eigenvalues": [float(x) for x in self.values],
                "residual": [float(x) for x in self.residuals],
                "converged": [bool(x) for x in self.converged], "tol": float(self.tol),
                "products": int(self.products)}


WHICH = ("largest", "smallest", "magnitude")


def _select(values: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted values: largest first, smallest first, or largest |value|."""
    if which not in WHICH:
        raise ValueError(f"which={which!r} is invalid; expected one of {', '.join(WHICH)}")
    key = {"largest": -values, "smallest": values, "magnitude": -np.abs(values)}[which]
    return np.argsort(key, kind="stable")[:k]


def lanczos_eigenpairs(matvec: MatVec, dim: int, k: int, rng: jax.Array, tol: float = 1e-6,
                       max_order: int | None = None, which: str = "largest", dtype=None,
                       min_order: int | None = None, start: jax.Array | None = None
                       ) -> Eigenpairs:
    """The k extreme eigenpairs of H by Lanczos (full re-orthogonalisation), run until their
    residuals ||H v - lambda v|| / |lambda| are below `tol`.

    The Lanczos relation gives each Ritz pair's residual as beta_m |s_m| (beta_m the norm of the
    next Lanczos vector, s_m the last component of the pair's eigenvector of T) at no cost, so
    the iteration stops at the first order where the k wanted pairs all meet `tol`. The
    residuals returned are then measured, one more product per pair, on the vectors returned:
    a pair is `converged` only on that measurement. Lanczos converges to the extremes of the
    spectrum much faster than power iteration where the top two eigenvalues are close (the
    error falls like exp(-2 m sqrt(gap)) rather than (1 - gap)^m).

    Args:
      k: the number of eigenpairs.
      tol: the relative residual each pair must reach.
      max_order: the most Lanczos steps (default: dim, where Lanczos is exact).
      which: 'largest' (algebraic), 'smallest' or 'magnitude'.
      min_order: the fewest steps before the stopping rule is consulted (default 2k + 2: a
        shorter Krylov space can look converged on a pair it has not yet found).
      start: the first Lanczos vector (e.g. an eigenvector of a nearby matrix); default random.

    Returns:
      `Eigenpairs` in the order `which` asks, vectors float[k, dim].
    """
    dtype = _dtype(matvec, dtype)
    _check_tol(tol)
    max_order = dim if max_order is None else min(max_order, dim)
    least = min(max_order, 2 * k + 2 if min_order is None else min_order)

    def stop(tridiag, beta):
        if tridiag.shape[0] < max(least, k):
            return False
        values, vectors = np.linalg.eigh(tridiag)
        chosen = _select(values, k, which)
        estimate = np.abs(beta * vectors[-1, chosen])
        return bool(np.all(estimate <= 0.5 * tol * np.maximum(np.abs(values[chosen]), 1e-30)))

    tridiag, basis, _ = lanczos_run(matvec, dim, max_order, rng, dtype, stop, start)
    if not np.isfinite(tridiag).all():  # a product overflowed (e.g. diverged parameters)
        nan = np.full(k, np.nan)
        return Eigenpairs(nan, np.full((k, dim), np.nan), nan, np.zeros(k, bool), tol,
                          tridiag.shape[0])
    values, vectors = np.linalg.eigh(tridiag)
    chosen = _select(values, k, which)
    out_values, out_vectors, residuals = [], [], []
    for i in chosen:
        v = ritz_vector(vectors[:, i], basis, dtype)
        hv = matvec(v)
        value, residual = rayleigh_pair(v, hv)
        out_values.append(float(value))
        residuals.append(float(residual))
        out_vectors.append(v)
    residuals = np.asarray(residuals)
    return Eigenpairs(np.asarray(out_values, np.float64),
                      np.stack([np.asarray(v) for v in out_vectors]), residuals,
                      residuals <= tol, tol, tridiag.shape[0] + len(chosen))


@jax.jit
def rayleigh_pair(v: jax.Array, hv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Rayleigh quotient of unit v and its relative residual ||Hv - lambda v|| / |lambda|."""
    value = jnp.vdot(v, hv)
    return value, jnp.linalg.norm(hv - value * v) / jnp.maximum(jnp.abs(value), 1e-30)


def _check_tol(tol: float) -> None:
    if not (np.isfinite(tol) and tol > 0):
        raise ValueError(f"tol={tol} is invalid; expected a positive relative residual, e.g. 1e-6")


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
                num_points: int = 1000, sigma_fraction: float = 0.01, dtype=None,
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
    dtype = _dtype(matvec, dtype)
    for key in jax.random.split(rng, num_draws):
        t, _ = lanczos(matvec, dim, order, key, dtype)
        v, w = ritz(t)
        values.append(v)
        weights.append(w)
    return smooth_density(values, weights, num_points, sigma_fraction, tail_sigmas)


def smooth_density(values: list[np.ndarray], weights: list[np.ndarray], num_points: int = 1000,
                   sigma_fraction: float = 0.01, tail_sigmas: float = 6.0) -> Density:
    """`slq_density`'s smoothing of Ritz values and weights already computed (one pair of
    arrays per Lanczos draw), for callers that use the same Lanczos runs for other ends."""
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
    return Density(grid, density / len(values), values, weights)


def power_iteration(matvec: MatVec, dim: int, k: int, rng: jax.Array, max_iters: int = 100,
                    tol: float = 1e-6, dtype=None, start: jax.Array | None = None,
                    cold_iters: int | None = None) -> Eigenpairs:
    """The k eigenvalues of largest magnitude, by power iteration with deflation (PyHessian).

    Each eigenvector is found by power iteration on H restricted to the orthogonal complement of
    those already found; iteration stops when the pair's residual ||H v - lambda v|| / |lambda|
    is below `tol` (a Rayleigh quotient can change by less than 1e-4 per step while it is still
    percents away from the eigenvalue, where the top two are close), or after `max_iters`
    products, and the result says which pairs converged.

    Vectors without a warm start come from one Lanczos run (`lanczos_eigenpairs`, at most
    `cold_iters` steps and a product per pair, ordered by magnitude): power iteration from a
    random vector needs about log(1/tol) / gap products, over a hundred where the top two
    eigenvalues are 10% apart, and Lanczos about the square root of that. A Lanczos pair that
    converged is taken as it is; one that did not goes on by power steps. A warm start is
    checked by a power step (a converged one costs that one product); one that has not
    converged is refined by Lanczos started from it on the deflated operator, and the power
    steps go on from there. Each eigenvalue spends at most `max_iters` products beyond the
    cold Lanczos run.

    Args:
      start: warm start: float[dim] for the first eigenvector, or [j, dim] for the first j
        (e.g. the vectors a previous call returned, at a nearby point); the others start from
        Lanczos. A start vector of zeros counts as none.
      dtype: as for `lanczos`.
      cold_iters: the most Lanczos steps of the cold start (default `max_iters`); a cold start
        meets near-degenerate top pairs that a warm one has already separated.

    Returns:
      `Eigenpairs` in the order found (decreasing magnitude), vectors [k, dim].
    """
    dtype = _dtype(matvec, dtype)
    _check_tol(tol)
    found: list[jax.Array] = []
    values, residuals = [], []
    starts = [] if start is None else [start] if np.ndim(start) == 1 else list(start)
    products = 0
    cold = None
    for i in range(k):
        basis = jnp.stack(found) if found else jnp.zeros((1, dim), dtype)
        warm = False
        if i < len(starts):
            v, norm = _unit(basis, jnp.asarray(starts[i], dtype))
            warm = bool(float(norm) > 0)
        if not warm:
            if cold is None:
                cold = lanczos_eigenpairs(matvec, dim, k, rng, tol,
                                          max_iters if cold_iters is None else cold_iters,
                                          "magnitude", dtype)
                products += cold.products
            # a short run (max_iters below k) spans fewer than k directions
            have = i < len(cold.values)
            if have and cold.converged[i]:  # measured on H itself: nothing to refine or check
                found.append(jnp.asarray(cold.vectors[i], dtype))
                values.append(float(cold.values[i]))
                residuals.append(float(cold.residuals[i]))
                continue
            norm = 0.0
            if have:
                v, norm = _unit(basis, jnp.asarray(cold.vectors[i], dtype))
            if not float(norm) > 0:  # the Krylov space missed this direction
                v, _ = _unit(basis, jax.random.normal(jax.random.fold_in(rng, i), (dim,), dtype))
        value = residual = None
        used, refined = 0, not warm  # a cold vector has had its Lanczos already
        while used < max_iters:
            hv = matvec(v)
            used += 1
            value, residual, new = _power_step(basis, v, hv)
            if float(residual) <= tol:
                break
            if not refined and max_iters - used >= 4:
                # Lanczos from v: its steps and its residual's product, and one product left
                # for the power step that checks (and reports) the refined vector
                refined = True
                pairs = lanczos_eigenpairs(functools.partial(_deflated, matvec, basis), dim, 1,
                                           jax.random.fold_in(rng, i), tol, max_iters - used - 2,
                                           "magnitude", dtype, min_order=2, start=v)
                used += pairs.products
                new, _ = _unit(basis, jnp.asarray(pairs.vectors[0], dtype))
            v = new
        products += used
        found.append(v)
        values.append(float(value))
        residuals.append(float(residual))
    residuals = np.asarray(residuals)
    return Eigenpairs(np.asarray(values, np.float64), np.stack([np.asarray(v) for v in found]),
                      residuals, residuals <= tol, tol, products)


def _deflated(matvec: MatVec, basis: jax.Array, v: jax.Array) -> jax.Array:
    """P H P v with P the projection off the rows of `basis`."""
    return _orthogonalise(basis, matvec(_orthogonalise(basis, v)))


@jax.jit
def _unit(basis: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w off the rows of `basis`, normalised, and its norm before normalising."""
    w = _orthogonalise(basis, w)
    norm = jnp.linalg.norm(w)
    return w / norm, norm


@jax.jit
def _power_step(basis: jax.Array, v: jax.Array, hv: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One power step off the rows of `basis`, in one program: the Rayleigh quotient v.Hv, the
    pair's relative residual ||Hv - lambda v|| / |lambda| (of H itself, not the deflated
    operator) and the next vector, Hv off `basis` normalised."""
    value, residual = rayleigh_pair(v, hv)
    hv = _orthogonalise(basis, hv)
    return value, residual, hv / jnp.linalg.norm(hv)


def hutchinson_trace(matvec: MatVec, dim: int, num_samples: int, rng: jax.Array,
                     dtype=None, rel_tol: float | None = None, min_samples: int = 10
                     ) -> tuple[float, float]:
    """Hutchinson's estimate of tr(H) with Rademacher probes.

    Args:
      num_samples: the number of probes (one product each); with `rel_tol`, the most.
      rel_tol: stop once the standard error is at most `rel_tol` |estimate| (after at least
        `min_samples` probes); None draws all `num_samples`.

    Returns:
      (mean of v^T H v over the probes, its standard error); `hutchinson` also says how many
      probes were drawn.
    """
    mean, se, _ = hutchinson(matvec, dim, num_samples, rng, dtype, rel_tol, min_samples)
    return mean, se


def hutchinson(matvec: MatVec, dim: int, num_samples: int, rng: jax.Array, dtype=None,
               rel_tol: float | None = None, min_samples: int = 10) -> tuple[float, float, int]:
    """`hutchinson_trace` and the number of probes drawn."""
    if num_samples < 2:
        raise ValueError(f"num_samples={num_samples} is invalid; expected at least 2 (the "
                         "standard error divides by the number of probes less one)")
    dtype = _dtype(matvec, dtype)
    least = max(2, min(min_samples, num_samples))
    samples = []
    for key in jax.random.split(rng, num_samples):
        v = jax.random.rademacher(key, (dim,), dtype)
        samples.append(float(jnp.vdot(v, matvec(v))))
        n = len(samples)
        if rel_tol is not None and n >= least:
            se = np.std(samples, ddof=1) / np.sqrt(n)
            if se <= rel_tol * abs(np.mean(samples)):
                break
    samples = np.asarray(samples)
    return (float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(samples.size)),
            int(samples.size))
