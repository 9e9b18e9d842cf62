"""Pure train and eval steps: `(state, batch) -> (state, metrics)`, the same on CPU, GPU and TPU.

`make_train_step` closes over the static parts (loss, normaliser, augmentation, dtype) and
returns a pure function; `stacked_or_single` lets it take several steps' batches at once, and
`setup.compile_steps` jit-compiles it with a donated state and explicit shardings. Batches hold
uint8 images; scaling and augmentation happen inside the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from dlassign.data.preprocess import Normalizer, random_crop
from dlassign.training.losses import get_loss
from dlassign.training.train_state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The static parts of a step.

    Attributes:
      loss: a name in `training.losses.LOSSES` ('cross_entropy', 'mse', 'square').
      normalizer: uint8 -> float mapping.
      random_crop: largest random shift in pixels while training (0: none).
      dtype: input dtype handed to the model (bfloat16 for mixed precision).
    """

    loss: str
    normalizer: Normalizer
    random_crop: int = 0
    dtype: jnp.dtype = jnp.float32


def _forward(state: TrainState, params, images, train: bool, rng=None):
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    if train and state.batch_stats:
        logits, updates = state.apply_fn(variables, images, train=True,
                                         rngs={"dropout": rng}, mutable=["batch_stats"])
        return logits, updates["batch_stats"]
    rngs = {"dropout": rng} if train else {}
    return state.apply_fn(variables, images, train=train, rngs=rngs), state.batch_stats


def make_train_step(cfg: StepConfig) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch) -> (state, metrics)`.

    batch: `image` uint8[B, H, W, C], `label` int32[B].
    metrics: loss, accuracy, grad_norm (float32[]), finite (bool[]), and leaf_finite (bool[P], one
    flag per parameter leaf in `jax.tree.leaves` order: its gradient's squared norm is finite,
    i.e. no NaN or inf and no overflow of float32). A step whose loss or gradients are not
    finite leaves the state unchanged, so a NaN never reaches a checkpoint; the host raises on it.
    """
    loss_fn = get_loss(cfg.loss)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        crop_rng, dropout_rng = jax.random.split(rng)
        images = batch["image"]
        if cfg.random_crop:
            images = random_crop(crop_rng, images, cfg.random_crop)
        images = cfg.normalizer(images, cfg.dtype)

        def objective(params):
            logits, batch_stats = _forward(state, params, images, True, dropout_rng)
            return loss_fn(logits, batch["label"]).mean(), (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params)
        # One dot per leaf gives both the norm and the finiteness check (NaN and inf carry into
        # the sum of squares); separate isfinite and square-and-sum passes each materialise an
        # array on XLA:CPU.
        with jax.named_scope("grad_check"):  # names the ops in profiles (profile_step.py)
            sq = jnp.stack([jnp.vdot(g.ravel(), g.ravel(),
                                     preferred_element_type=jnp.promote_types(g.dtype,
                                                                              jnp.float32))
                            for g in jax.tree.leaves(grads)])
        leaf_finite = jnp.isfinite(sq)
        finite = jnp.isfinite(loss) & jnp.all(leaf_finite)

        # A non-finite step keeps the old values but still counts, so the host can name it. A
        # branch rather than a select of new against old values: selecting makes XLA recompute
        # the optimizer's moments inside the parameter update and keep copies of the old ones
        # alive (docs/performance.md).
        def apply(old):
            params, opt_state, _ = old
            with jax.named_scope("optimizer"):
                updates, opt_state = state.tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, batch_stats

        params, opt_state, batch_stats = jax.lax.cond(
            finite, apply, lambda old: old, (state.params, state.opt_state, state.batch_stats))
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": jnp.sqrt(jnp.sum(sq)),
            "finite": finite,
            "leaf_finite": leaf_finite,
        }
        return new, metrics

    return train_step


def stacked_or_single(train_step: Callable, label_ndim: int = 1) -> Callable:
    """`train_step` that also runs up to k steps in one call.

    `step(state, batch, steps)` with one batch is `train_step` (`steps` is then 1 and unused).
    With batches stacked on a leading axis (`label` int32[k, B]; label_ndim is the rank of one
    step's labels, 2 for a step vmapped over folds, [K, B]) it scans over the first
    `steps` of them (an int32 scalar, all when None; the rest are padding, skipped) and returns
    metrics stacked [k], whose padding rows are zeros. Every call of k slots is one compiled
    program, whatever `steps`.

    One call per k steps saves the per-call dispatch and buffer hand-over; the figures are in
    docs/performance.md.
    """

    def step(state: TrainState, batch: dict, steps=None) -> tuple[TrainState, dict]:
        if batch["label"].ndim == label_ndim:
            return train_step(state, batch)
        one = jax.tree.map(lambda x: x[0], batch)
        shapes = jax.eval_shape(train_step, state, one)[1]
        skip = lambda state, _: (state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                     shapes))
        count = batch["label"].shape[0] if steps is None else steps

        def body(state, slot):
            i, b = slot
            return jax.lax.cond(i < count, train_step, skip, state, b)

        return jax.lax.scan(body, state, (jnp.arange(batch["label"].shape[0]), batch))

    return step


def make_eval_step(cfg: StepConfig) -> Callable[[TrainState, dict], dict]:
    """Builds `eval_step(state, batch) -> metrics` (BatchNorm on running statistics, no dropout).

    batch: `image` uint8[B, ...], `label` int32[B], `mask` bool[B] (False on padding rows).
    metrics: loss_sum and count over the real rows, and `pred` int32[B] for every row.
    """
    loss_fn = get_loss(cfg.loss)

    def eval_step(state: TrainState, batch: dict) -> dict:
        logits, _ = _forward(state, state.params, cfg.normalizer(batch["image"], cfg.dtype),
                             False)
        mask = batch["mask"]
        return {
            "loss_sum": jnp.sum(jnp.where(mask, loss_fn(logits, batch["label"]), 0.0)),
            "count": jnp.sum(mask),
            "pred": jnp.argmax(logits, -1).astype(jnp.int32),
        }

    return eval_step
