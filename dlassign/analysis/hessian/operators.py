"""Hessian-vector products on flattened parameters, and the exact Hessian for small models.

The Hessian is never materialised for real models: `hvp` is forward-over-reverse (`jax.jvp` of
`jax.grad`), which costs a small constant times one gradient. Parameters are flattened with
`ravel_pytree`, so every operator here maps float[P] -> float[P].
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dlassign.data import Split, eval_batches, stratified_subset
from dlassign.data.preprocess import Normalizer
from dlassign.models import placement
from dlassign.runtime import parallel
from dlassign.training.losses import get_loss

MatVec = Callable[[jax.Array], jax.Array]


def flatten_loss(loss_fn: Callable, params) -> tuple[Callable, jax.Array, Callable]:
    """Turns `loss_fn(params) -> scalar` into a function of a flat vector.

    Returns:
      (flat_loss, x0, unravel): flat_loss(x) = loss_fn(unravel(x)), x0 = ravel(params).
    """
    x0, unravel = ravel_pytree(params)
    return lambda x: loss_fn(unravel(x)), x0, unravel


def hvp(f: Callable[[jax.Array], jax.Array], x: jax.Array, v: jax.Array) -> jax.Array:
    """H(x) v for a scalar function of a flat vector, forward-over-reverse."""
    return jax.jvp(jax.grad(f), (x,), (v,))[1]


def exact_hessian(f: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """The dense Hessian float[P, P] (small models only: P^2 memory)."""
    return jax.hessian(f)(x)


def model_batch_loss(model, variables: dict, loss: str, normalizer: Normalizer | None = None,
                     binary: bool = False) -> Callable:
    """`(params, batch) -> (sum of per-example losses over real rows, row count)`.

    Evaluation mode throughout: BatchNorm uses its running statistics (held fixed in
    `variables`) and dropout is off, so the loss is a deterministic function of the parameters.
    The model runs as `models.placement(..., hessian=True)` says (NHWC, which measured faster
    under forward-over-reverse for ResNet-18 and the MNIST CNN; docs/performance.md).

    Args:
      model: a Flax module taking (x, train).
      variables: the model's variables; only "batch_stats" is used (params are the argument).
      loss: 'cross_entropy' or 'mse'.
      normalizer: maps uint8 images to floats; None when batches already hold floats.
      binary: scalar-logit models (logistic regression, deep linear networks).
    """
    loss_fn = get_loss(loss, binary=binary)
    fixed = {k: v for k, v in variables.items() if k != "params"}
    model, _ = placement(model, hessian=True)

    def batch_loss(params, batch):
        x = batch["image"]
        x = normalizer(x, jnp.result_type(*jax.tree.leaves(params))) if normalizer else x
        logits = model.apply({"params": params, **fixed}, x, train=False)
        per_example = loss_fn(logits, batch["label"])
        mask = batch.get("mask")
        if mask is None:
            return per_example.sum(), per_example.shape[0]
        return jnp.where(mask, per_example, 0.0).sum(), mask.sum()

    return batch_loss


@functools.partial(jax.jit, static_argnums=0)
def _batch_hvp(batch_loss: Callable, params, v: jax.Array, batch: dict, scale) -> jax.Array:
    """scale * H_b v of one batch's summed loss at `params`; compiled once per `batch_loss`
    object (and shapes), so the matvecs of later points reuse the program."""
    x, unravel = ravel_pytree(params)
    return scale * hvp(lambda y: batch_loss(unravel(y), batch)[0], x, v)


_ravel = jax.jit(lambda params: ravel_pytree(params)[0])


@functools.partial(jax.jit, static_argnums=0)
def _batch_count(batch_loss: Callable, params, batch: dict) -> jax.Array:
    return batch_loss(params, batch)[1]


def row_count(batch_loss: Callable, params, batches: Iterable[dict]) -> int:
    """The real (unmasked) rows of `batches` as `batch_loss` counts them, compiled: XLA drops
    the forward pass the count does not need, where an eager call would run it op by op (and
    compile every op)."""
    return sum(int(jax.device_get(_batch_count(batch_loss, params, b))) for b in batches)


def flatten(params) -> tuple[jax.Array, Callable]:
    """`ravel_pytree(params)` as one compiled program (eagerly it is one per leaf shape), with
    `unravel` taken from an abstract trace."""
    unravel = []
    jax.eval_shape(lambda p: unravel.append(ravel_pytree(p)[1]), params)
    return _ravel(params), unravel[0]


def dataset_hvp(batch_loss: Callable, params, batches: Iterable[dict],
                on_dispatch: Callable | None = None, count: int | None = None
                ) -> tuple[MatVec, jax.Array, Callable]:
    """The Hessian of the mean loss over a fixed set of batches, as a matvec.

    H v = (1 / N) sum_b H_b v, where H_b is the Hessian of batch b's summed loss and N counts the
    real (unmasked) rows, so a padded last batch is weighted exactly. The jitted product is
    keyed on the `batch_loss` object: a caller that takes Hessians at many points (curvature
    during training) builds `batch_loss` once and compiles once.

    Args:
      batch_loss: `(params, batch) -> (loss sum, count)`, e.g. from `model_batch_loss`.
      params: the point at which the Hessian is taken.
      batches: a re-iterable collection (a list) of batches already on the devices.
      on_dispatch: called with each partial product (e.g. a `DispatchLimiter`).
      count: N when the caller knows it; None counts the batches' rows through `batch_loss`.

    Returns:
      (matvec, x0, unravel): matvec maps float[P] to float[P].
    """
    batches = list(batches)
    x0, unravel = flatten(params)
    total = count if count is not None else row_count(batch_loss, params, batches)
    scale = 1.0 / total

    def matvec(v: jax.Array) -> jax.Array:
        # v placed as x0 every time: a fresh random vector (uncommitted) and a product's result
        # (committed) would otherwise compile two programs that differ only in placement
        v = jax.device_put(v, x0.sharding)
        out = None
        for b in batches:
            part = _batch_hvp(batch_loss, params, v, b, scale)
            out = part if out is None else out + part
            if on_dispatch is not None:
                on_dispatch(out)
        return jnp.zeros_like(v) if out is None else out

    return matvec, x0, unravel


def sample_batches(train: Split, num_examples: int, seed: int, mesh,
                   batch_size: int | Callable[[int], int], field: str = "batch_size"
                   ) -> tuple[list[dict], int]:
    """A fixed stratified sample of `train` (chosen by `seed`) as padded, masked batches of
    `batch_size` (or `batch_size(sample size)`) placed on `mesh` (each process feeding its
    rows), and its number of examples.

    Raises:
      ConfigError: `batch_size` is not divisible by the mesh; names `field`.
    """
    n = min(num_examples, len(train))
    sample = train.take(stratified_subset(train.labels, n / len(train), seed))
    if callable(batch_size):
        batch_size = batch_size(len(sample))
    parallel.check_divisible(batch_size, mesh, field)
    sharding = parallel.batch_sharding(mesh)
    return ([parallel.global_batch(b, sharding) for b in eval_batches(sample, batch_size)],
            len(sample))
