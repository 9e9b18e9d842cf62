"""The curvature of any loss of parameters on fixed data, as one object.

    curvature = Curvature(loss_fn, params, batches)
    top = curvature.eigenvalues(top_k=3)      # values, pytree vectors, residuals, converged
    trace = curvature.trace()                 # value, standard error, probes
    density = curvature.density()             # SLQ spectral density
    hv = curvature.hvp(v)                     # v and H v are pytrees like params

`loss_fn(params, batch)` returns the batch's mean loss or a pair (sum of per-example losses,
number of examples); the matrix is that of the mean loss over every example of `batches`, with
each batch weighted by its examples (`operators.SumCount`). Built from a model-output function
and a loss of the outputs (`Curvature.from_outputs`), the same object also gives the
Gauss-Newton matrix G = J^T H_out J (J the Jacobian of the outputs, H_out the Hessian of the
loss in the outputs) and the rest of the Hessian, R = H - G.

Everything runs on flattened parameters (`ravel_pytree`) in the parameters' dtype; the product of
one batch is one `jax.jit` program compiled once per object, and the spectral estimates are those
of `spectrum` (Lanczos with full re-orthogonalisation, Hutchinson, SLQ).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dlassign.analysis.hessian.operators import (
    SumCount,
    check_batches,
    check_params,
    flatten,
    hvp,
)
from dlassign.analysis.hessian.spectrum import (
    Density,
    Eigenpairs,
    hutchinson,
    lanczos_eigenpairs,
    slq_density,
)
from dlassign.runtime import parallel

MATRICES = ("hessian", "gauss_newton", "residual")


@dataclasses.dataclass(frozen=True)
class Trace:
    """Hutchinson's estimate of the trace.

    Attributes:
      value: the mean of v^T M v over Rademacher probes v.
      standard_error: its standard error (sample standard deviation / sqrt(samples)).
      samples: the probes drawn (one matrix-vector product each).
      converged: whether standard_error <= rel_tol |value| was reached within max_samples.
    """

    value: float
    standard_error: float
    samples: int
    converged: bool


class _OutputSplit:
    """The loss as output_loss(output_fn(params, batch), batch); hashable by its two parts."""

    def __init__(self, output_fn: Callable, output_loss: Callable):
        self.output_fn, self.output_loss = output_fn, SumCount(output_loss)

    def __eq__(self, other) -> bool:
        return (isinstance(other, _OutputSplit) and other.output_fn == self.output_fn
                and other.output_loss == self.output_loss)

    def __hash__(self) -> int:
        return hash((self.output_fn, self.output_loss))

    def __call__(self, params, batch):
        return self.output_loss(self.output_fn(params, batch), batch)


def _batch_product(matrix: str, loss: SumCount | _OutputSplit, unravel: Callable,
                   x: jax.Array, v: jax.Array, batch) -> jax.Array:
    """M_b v for one batch's summed loss: the Hessian (forward-over-reverse), the Gauss-Newton
    matrix J^T H_out J v (a jvp of the outputs, an HVP of the loss in the outputs, a vjp), or
    their difference."""
    def loss_sum(y):
        return loss(unravel(y), batch)[0]

    if matrix == "hessian":
        return hvp(loss_sum, x, v)

    def outputs(y):
        return loss.output_fn(unravel(y), batch)

    out, jv = jax.jvp(outputs, (x,), (v,))
    h_jv = jax.jvp(jax.grad(lambda o: loss.output_loss(o, batch)[0]), (out,), (jv,))[1]
    gv = jax.vjp(outputs, x)[1](h_jv)[0]
    return gv if matrix == "gauss_newton" else hvp(loss_sum, x, v) - gv


class Curvature:
    """The Hessian (or Gauss-Newton matrix, or their difference) of a mean loss on fixed batches.

    Args:
      loss_fn: `(params, batch) -> mean loss` or `-> (sum of per-example losses, count)`.
      params: the point, a pytree of real float arrays (float32, or float64 with x64 enabled:
        every vector and product is in this dtype).
      batches: one batch (a dict, tuple or array pytree) or a list (any other iterable) of
        batches of one structure; the matrix is that of the mean over all their examples.
      mesh: a `jax.sharding.Mesh`; batches are sharded over its data axis and the parameters
        replicated (`runtime.parallel`), so each product is one data-parallel program.
      seed: fixes the random start and probe vectors.

    Raises:
      TypeError: parameters that are not real floating point, or of mixed dtypes.
      ValueError: no batches, batches of different structures, a loss that returns anything
        but a scalar or a (sum, count) pair; each message names what it got.
    """

    def __init__(self, loss_fn: Callable, params, batches, *, mesh=None, seed: int = 0,
                 _matrix: str = "hessian", _shared: dict | None = None):
        if _shared is None:
            _shared = _prepare(SumCount(loss_fn), params, batches, mesh)
        self._shared = _shared
        self.matrix = _matrix
        self.seed = seed
        self.x0, self.unravel = _shared["x0"], _shared["unravel"]
        self.dim, self.dtype = int(self.x0.size), self.x0.dtype
        self.num_examples = _shared["count"]
        self.products = 0  # matrix-vector products over the whole data so far
        loss, unravel, matrix = _shared["loss"], self.unravel, _matrix
        # one program per matrix, shared by the objects of one loss and point (the siblings):
        # the loss and the matrix are fixed, the batch is an argument
        programs = _shared.setdefault("programs", {})
        if matrix not in programs:
            programs[matrix] = jax.jit(
                lambda x, v, b: _batch_product(matrix, loss, unravel, x, v, b))
        self._part = programs[matrix]

    @classmethod
    def from_outputs(cls, output_fn: Callable, output_loss: Callable, params, batches, *,
                     matrix: str = "hessian", mesh=None, seed: int = 0) -> Curvature:
        """The curvature of `output_loss(output_fn(params, batch), batch)`.

        Args:
          output_fn: `(params, batch) -> outputs` (any pytree, e.g. logits float[B, K]).
          output_loss: `(outputs, batch) -> mean loss` or `-> (sum, count)`.
          matrix: 'hessian' (H), 'gauss_newton' (G = J^T H_out J) or 'residual' (H - G).
        """
        if matrix not in MATRICES:
            raise ValueError(f"matrix={matrix!r} is invalid; expected one of "
                             f"{', '.join(MATRICES)}")
        shared = _prepare(_OutputSplit(output_fn, output_loss), params, batches, mesh)
        return cls(None, None, None, seed=seed, _matrix=matrix, _shared=shared)

    def _sibling(self, matrix: str) -> Curvature:
        if matrix != "hessian" and not isinstance(self._shared["loss"], _OutputSplit):
            raise ValueError(f"the {matrix.replace('_', '-')} matrix needs the loss split into "
                             "outputs and a loss of the outputs; build the object with "
                             "Curvature.from_outputs(output_fn, output_loss, params, batches)")
        return Curvature(None, None, None, seed=self.seed, _matrix=matrix, _shared=self._shared)

    def hessian(self) -> Curvature:
        """The Hessian H of the same loss at the same point."""
        return self._sibling("hessian")

    def gauss_newton(self) -> Curvature:
        """The Gauss-Newton matrix G = J^T H_out J (needs `from_outputs`)."""
        return self._sibling("gauss_newton")

    def residual(self) -> Curvature:
        """R = H - G, the part of the Hessian from the outputs' own curvature (needs
        `from_outputs`)."""
        return self._sibling("residual")

    # ------------------------------------------------------------------------- products

    def matvec(self, v: jax.Array) -> jax.Array:
        """M v on flat vectors: float[P] -> float[P], one product per batch."""
        shared = self._shared
        v = jax.device_put(jnp.asarray(v, self.dtype), self.x0.sharding)
        out = None
        for b in shared["batches"]:
            part = self._part(self.x0, v, b)
            out = part if out is None else out + part
            shared["limiter"](out)
        self.products += 1
        return out * shared["scale"]

    def hvp(self, v):
        """M v for a pytree `v` shaped like the parameters (or a flat float[P]); the same kind
        back."""
        if isinstance(v, jax.Array | np.ndarray) and np.ndim(v) == 1 and np.size(v) == self.dim:
            return self.matvec(v)
        flat, _ = flatten(v)
        if flat.size != self.dim:
            raise ValueError(f"v has {flat.size} entries; expected a pytree like the parameters "
                             f"({self.dim} entries)")
        return self.unravel(self.matvec(flat))

    def dense(self) -> np.ndarray:
        """The matrix itself, float64[P, P], from P products (small models only)."""
        eye = jnp.eye(self.dim, dtype=self.dtype)
        return np.stack([np.asarray(self.matvec(e), np.float64) for e in eye], axis=1)

    # ------------------------------------------------------------------------- spectra

    def _key(self, purpose: int) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), purpose)

    def eigenvalues(self, top_k: int = 1, *, tol: float = 1e-6, max_order: int | None = None,
                    which: str = "largest") -> Eigenpairs:
        """The `top_k` extreme eigenpairs, by Lanczos run until every pair's relative residual
        ||M v - lambda v|| / |lambda| is below `tol` (`spectrum.lanczos_eigenpairs`).

        Args:
          which: 'largest' (algebraic: the sharpness first), 'smallest' or 'magnitude'.
          max_order: the most Lanczos steps (products); default P.

        Returns:
          `Eigenpairs` with vectors as parameter pytrees (unit norm when flattened), residuals
          and `converged` flags; a pair that missed `tol` within `max_order` says so.
        """
        if not isinstance(top_k, int) or not 1 <= top_k <= self.dim:
            raise ValueError(f"top_k={top_k!r} is invalid; expected an integer in 1..{self.dim}")
        if max_order is not None and not (isinstance(max_order, int) and max_order >= top_k):
            raise ValueError(f"max_order={max_order!r} is invalid; expected an integer >= "
                             f"top_k={top_k} (k Lanczos steps span at most k directions)")
        pairs = lanczos_eigenpairs(self.matvec, self.dim, top_k, self._key(0), tol, max_order,
                                   which, self.dtype)
        vectors = [self.unravel(jnp.asarray(v)) for v in pairs.vectors]
        return dataclasses.replace(pairs, vectors=vectors)

    def trace(self, *, rel_tol: float = 1e-2, max_samples: int = 1000,
              min_samples: int = 10) -> Trace:
        """Hutchinson's trace with Rademacher probes, drawn until the standard error is at most
        `rel_tol` of the estimate (after `min_samples`) or `max_samples` are spent."""
        value, se, n = hutchinson(self.matvec, self.dim, max_samples, self._key(1), self.dtype,
                                  rel_tol, min_samples)
        return Trace(value, se, n, bool(se <= rel_tol * abs(value)))

    def density(self, order: int = 90, num_draws: int = 1, **kwargs) -> Density:
        """The spectral density by stochastic Lanczos quadrature (`spectrum.slq_density`:
        `order` x `num_draws` products; `kwargs` go there)."""
        return slq_density(self.matvec, self.dim, order, num_draws, self._key(2),
                           dtype=self.dtype, **kwargs)


def _is_one_batch(batches) -> bool:
    return isinstance(batches, dict | tuple | jax.Array | np.ndarray)


def _prepare(loss: SumCount | _OutputSplit, params, batches: Iterable, mesh) -> dict:
    """Checks the inputs and places them: flat parameters, the batches, the example count."""
    check_params(params)
    batches = [batches] if _is_one_batch(batches) else list(batches)
    check_batches(batches)
    if mesh is not None:
        for i, b in enumerate(batches):
            rows = np.shape(jax.tree.leaves(b)[0])[0]
            parallel.check_divisible(rows, mesh, f"the rows of batch {i}")
        params = jax.device_put(params, parallel.replicated(mesh))
        sharding = parallel.batch_sharding(mesh)
        batches = [parallel.global_batch(b, sharding) for b in batches]
    else:
        batches = [jax.device_put(b) for b in batches]
    x0, unravel = flatten(params)
    # the loss's output is checked here, by tracing it, before any product compiles
    jax.eval_shape(loss, params, batches[0])
    count_of = jax.jit(lambda x, b: loss(unravel(x), b)[1])
    count = sum(float(jax.device_get(count_of(x0, b))) for b in batches)
    if not count > 0:
        raise ValueError(f"the batches hold {count:g} examples; expected at least one")
    return {"loss": loss, "x0": x0, "unravel": unravel, "batches": batches, "count": count,
            "scale": jnp.asarray(1.0 / count, x0.dtype), "limiter": parallel.DispatchLimiter()}


__all__ = ["MATRICES", "Curvature", "Trace"]
