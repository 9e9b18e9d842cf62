"""The train state: a pytree of everything a run needs to continue bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct as struct
import jax
import jax.numpy as jnp
import optax


class TrainState(struct.PyTreeNode):
    """step int32[], params, batch_stats (empty dict without BatchNorm), opt_state, and rng
    uint32[2], the base key that `train_step` folds the step into (so the dropout and
    augmentation randomness of step s is the same whether or not the run was resumed)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v


def init_compiler_options() -> dict | None:
    """XLA options for the programs that create a train state: LLVM's -O1 on the CPU.

    An initialiser runs once, but at XLA:CPU's default -O2/-O3 its random fills (one fused
    kernel per parameter leaf) took longer to compile than the training step: 2.7 s for the
    wide MLP, 4.8 s for the MNIST CNN, 9 s for LeNet-5 and 25 s for ResNet-18 on 2 busy cores.
    -O1 compiles them 2.5-4x faster into bitwise the same values (no fast-math either way;
    `tests/test_compilation_cache.py` checks it)."""
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None


def init_variables(model, rng: jax.Array, input_shape: tuple[int, ...], dtype=jnp.float32) -> dict:
    """Initialises a model on a zero batch of `input_shape` ([1, H, W, C])."""
    params_rng, dropout_rng = jax.random.split(rng)
    return model.init({"params": params_rng, "dropout": dropout_rng},
                      jnp.zeros(input_shape, dtype), train=False)


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...], variables: dict | None = None) -> TrainState:
    """A fresh state; `variables` (e.g. ported weights) replace the random initialisation.

    Args:
      model: a Flax module taking (x, train).
      tx: the optimizer.
      rng: uint32[2] key; split into the init key and the state's base key.
      input_shape: shape of one input batch, [B, H, W, C].
      variables: optional {"params", "batch_stats"} to start from.
    """
    init_rng, state_rng = jax.random.split(rng)
    if variables is None:
        variables = init_variables(model, init_rng, (1, *input_shape[1:]))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      rng=state_rng, apply_fn=model.apply, tx=tx)
