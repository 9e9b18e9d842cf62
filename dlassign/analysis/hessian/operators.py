"""Hessian-vector products on flattened parameters, and the exact Hessian for small models.

The Hessian is never materialised for real models: `hvp` is forward-over-reverse (`jax.jvp` of
`jax.grad`), which costs a small constant times one gradient. Parameters are flattened with
`ravel_pytree`, so every operator here maps float[P] -> float[P].
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
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


def model_batch_loss(model, variables: dict, loss: str | Callable,
                     normalizer: Normalizer | None = None, binary: bool = False, *,
                     inputs: str = "image", targets: str = "label",
                     apply_kwargs: dict | None = None) -> Callable:
    """`(params, batch) -> (sum of per-example losses over real rows, row count)` for a Flax
    module and a loss on its outputs.

    Evaluation mode throughout: BatchNorm uses its running statistics (held fixed in
    `variables`) and dropout is off, so the loss is a deterministic function of the parameters.
    The model runs as `models.placement(..., hessian=True)` says (NHWC, which measured faster
    under forward-over-reverse for ResNet-18 and the MNIST CNN; docs/performance.md).

    Args:
      model: any Flax module; `train=False` is passed where its `__call__` takes `train`.
      variables: the model's variables; everything but "params" is held fixed (params are the
        argument).
      loss: 'cross_entropy', 'mse' or 'square' (`training.losses`), or any `(outputs, targets)
        -> float[B]` per-example loss
        (or a scalar mean over the batch, which then cannot take masked batches).
      normalizer: maps uint8 images to floats; None when batches already hold floats.
      binary: scalar-logit models (logistic regression, deep linear networks); named losses only.
      inputs, targets: the batch keys of the model's input and the loss's targets. A batch may
        also be a pair (inputs, targets); a dict may hold a bool[B] "mask" of real rows.
      apply_kwargs: keyword arguments of `model.apply`; default {"train": False} where the
        module takes `train`, else none.
    """
    loss_fn = get_loss(loss, binary=binary) if isinstance(loss, str) else loss
    if not callable(loss_fn):
        raise TypeError(f"loss={loss!r} is invalid; expected 'cross_entropy', 'mse', 'square' "
                        "or a function (outputs, targets) -> per-example losses")
    fixed = {k: v for k, v in variables.items() if k != "params"}
    model, _ = placement(model, hessian=True)
    if apply_kwargs is None:
        apply_kwargs = inference_kwargs(model)

    def batch_loss(params, batch):
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y, mask = batch[0], batch[1], None
        elif isinstance(batch, dict) and inputs in batch and targets in batch:
            x, y, mask = batch[inputs], batch[targets], batch.get("mask")
        else:
            raise ValueError(f"a batch must be a dict with keys {inputs!r} and {targets!r} (and "
                             f"optionally 'mask') or a pair (inputs, targets); got "
                             f"{_describe(batch)}")
        x = normalizer(x, jnp.result_type(*jax.tree.leaves(params))) if normalizer else x
        outputs = model.apply({"params": params, **fixed}, x, **apply_kwargs)
        per_example = jnp.asarray(loss_fn(outputs, y))
        rows = jax.tree.leaves(x)[0].shape[0]
        if per_example.shape == ():
            if mask is not None:
                raise ValueError("a mean loss cannot weigh a masked batch's rows; give a loss "
                                 "that returns per-example values float[B]")
            return per_example * rows, rows
        if per_example.shape != (rows,):
            raise ValueError(f"the loss returned shape {per_example.shape}; expected "
                             f"per-example losses ({rows},) or a scalar mean")
        if mask is None:
            return per_example.sum(), rows
        return jnp.where(mask, per_example, 0.0).sum(), mask.sum()

    return batch_loss


def inference_kwargs(model) -> dict:
    """The keyword arguments of `model.apply` for inference: {"train": False} where the module
    takes `train` (BatchNorm's running statistics, no dropout), else none."""
    try:
        takes = "train" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        takes = False
    return {"train": False} if takes else {}


def _describe(tree) -> str:
    """A short description of a pytree's structure and leaf shapes, for error messages."""
    shapes = jax.tree.map(lambda x: f"{getattr(x, 'dtype', type(x).__name__)}"
                          f"{list(getattr(x, 'shape', ()))}", tree)
    text = str(shapes)
    return text if len(text) <= 200 else text[:197] + "..."


class SumCount:
    """A loss `(params, batch) -> mean` or `-> (sum, count)` as `(params, batch) -> (sum,
    count)`; a mean counts the batch's leading dimension (its first leaf's) as its rows.

    Two wrappers of the same function are equal, so jitted products keyed on them compile once.

    Raises (when called, i.e. when traced):
      ValueError: the loss returns anything else; says what it returned.
    """

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn.loss_fn if isinstance(loss_fn, SumCount) else loss_fn

    def __eq__(self, other) -> bool:
        return isinstance(other, SumCount) and other.loss_fn == self.loss_fn

    def __hash__(self) -> int:
        return hash((SumCount, self.loss_fn))

    def __call__(self, params, batch):
        out = self.loss_fn(params, batch)
        if isinstance(out, (tuple, list)) and len(out) == 2 and all(
                np.shape(x) == () for x in out):
            return out[0], out[1]
        if not isinstance(out, (tuple, list)) and np.shape(out) == ():
            leaves = jax.tree.leaves(batch)
            if not leaves or np.ndim(leaves[0]) == 0:
                raise ValueError("a mean loss needs batches whose first array has a leading "
                                 f"row axis; got {_describe(batch)}")
            rows = np.shape(leaves[0])[0]
            return out * rows, rows
        raise ValueError(f"the loss returned {_describe(out)}; expected a scalar mean over the "
                         "batch or a pair (sum of per-example losses, number of examples)")


def check_params(params) -> None:
    """Raises TypeError unless every leaf of `params` is a real floating-point array."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("params has no arrays; expected a pytree of float arrays")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"parameter {jax.tree_util.keystr(path)} has dtype {dtype}; "
                            "curvature needs real floating-point parameters (float32 or "
                            "float64; complex parameters have no real Hessian of this form)")
    dtypes = {jnp.result_type(x) for x in jax.tree.leaves(params)}
    if len(dtypes) > 1:
        raise TypeError(f"params mix dtypes {sorted(str(d) for d in dtypes)}; expected one "
                        "(cast them, e.g. jax.tree.map(lambda x: x.astype(jnp.float64), params))")


def check_batches(batches: list) -> None:
    """Raises ValueError unless the batches share one structure, trailing shapes and dtypes."""
    if not batches:
        raise ValueError("no batches; expected one batch or a non-empty list of batches")

    def signature(b):
        return jax.tree.structure(b), [(np.shape(x)[1:], jnp.result_type(x))
                                       for x in jax.tree.leaves(b)]

    first = signature(batches[0])
    for i, b in enumerate(batches[1:], 1):
        if signature(b) != first:
            raise ValueError(f"batch {i} is {_describe(b)} but batch 0 is "
                             f"{_describe(batches[0])}; every batch must have the same structure, "
                             "dtypes and shapes but for the leading (row) axis")


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
      batch_loss: `(params, batch) -> (loss sum, count)`, e.g. from `model_batch_loss`, or
        `(params, batch) -> mean loss` (`SumCount`: the batch's rows are its leading axis).
      params: the point at which the Hessian is taken.
      batches: a re-iterable collection (a list) of batches already on the devices.
      on_dispatch: called with each partial product (e.g. a `DispatchLimiter`).
      count: N when the caller knows it; None counts the batches' rows through `batch_loss`.

    Returns:
      (matvec, x0, unravel): matvec maps float[P] to float[P] (any float input is cast to the
      parameters' dtype, which `matvec.dtype` holds for the spectral functions).
    """
    batches = list(batches)
    batch_loss = SumCount(batch_loss)
    x0, unravel = flatten(params)
    total = count if count is not None else row_count(batch_loss, params, batches)
    scale = 1.0 / total

    def matvec(v: jax.Array) -> jax.Array:
        # v placed as x0 every time: a fresh random vector (uncommitted) and a product's result
        # (committed) would otherwise compile two programs that differ only in placement
        v = jax.device_put(jnp.asarray(v, x0.dtype), x0.sharding)
        out = None
        for b in batches:
            part = _batch_hvp(batch_loss, params, v, b, scale)
            out = part if out is None else out + part
            if on_dispatch is not None:
                on_dispatch(out)
        return jnp.zeros_like(v) if out is None else out

    matvec.dtype = x0.dtype
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
