"""A training run's static setup: the validated config, data, model and mesh (`setup`), its
optimizer and sharded train state (`make_tx`, `make_state`), and its compiled steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from dlassign.data import Dataset, hold_out_validation, prepare, steps_per_epoch
from dlassign.models import architecture, get_model, placement
from dlassign.runtime import parallel
from dlassign.training.config_validation import validate_train_config
from dlassign.training.optim import make_optimizer
from dlassign.training.steps import StepConfig, make_eval_step, make_train_step, stacked_or_single
from dlassign.training.train_state import TrainState, create_train_state, init_compiler_options

# Compute dtypes. float32 leaves Flax's promotion alone (so float64 parameters, for Hessians and
# parity checks, compute in float64); bfloat16 computes in bfloat16 with float32 parameters.
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
INPUT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The model of `config.model` (its `name` plus the module's own fields)."""
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return get_model(config.model.name, num_classes=num_classes,
                     dtype=DTYPES[config.get("dtype", "float32")], **kwargs)


@dataclasses.dataclass
class Run:
    """Everything static about one training run."""

    config: ml_collections.ConfigDict
    dataset: Dataset
    model: object
    mesh: Mesh
    step_config: StepConfig
    steps_per_epoch: int
    total_steps: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.config.batch_size, *self.dataset.image_shape)


def setup(config: ml_collections.ConfigDict, dataset: Dataset | None = None) -> Run:
    """Validates the config, loads the data and builds the model and mesh; no compute yet."""
    validate_train_config(config, dataset.image_shape[0] if dataset else None)
    dataset = dataset or prepare(config.data, config.seed)
    if dataset.validation is None:  # a dataset passed in: hold the validation part out here
        dataset = hold_out_validation(dataset, config.data.get("validation_fraction", 0.0),
                                      config.seed)
    mesh_cfg = config.get("mesh", {})
    # placed for the platform of the devices the mesh is made of
    model, num_devices = placement(build_model(config, dataset.num_classes),
                                   parallel.requested_devices(mesh_cfg.get("num_devices", 0)),
                                   platform=jax.devices()[0].platform,
                                   impl=config.get("impl", "auto"),
                                   input_shape=(config.batch_size, *dataset.image_shape))
    if num_devices == 0:
        abstract = jax.eval_shape(lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *dataset.image_shape)), train=False))

        def step_flops():
            flops = parallel.forward_flops(lambda v, x: model.apply(v, x, train=False),
                                           abstract, (config.batch_size, *dataset.image_shape))
            return 3 * flops if flops else None  # forward + backward

        num_devices = parallel.auto_num_devices(
            parallel.tree_size(abstract["params"]),
            mesh_cfg.get("cpu_data_parallel_max_params", 1_000_000), step_flops,
            mesh_cfg.get("cpu_data_parallel_min_step_flops", 0.0))
    mesh = parallel.make_mesh(num_devices)
    parallel.check_divisible(config.batch_size, mesh, "batch_size")
    parallel.check_divisible(config.eval_batch_size, mesh, "eval_batch_size")
    spe = steps_per_epoch(len(dataset.train), config.batch_size)
    step_config = StepConfig(loss=config.loss, normalizer=dataset.normalizer,
                             random_crop=config.data.get("random_crop", 0),
                             dtype=INPUT_DTYPES[config.get("dtype", "float32")])
    return Run(config, dataset, model, mesh, step_config, spe, spe * config.num_epochs)


def make_tx(run: Run):
    return make_optimizer(run.config.optimizer, run.total_steps, run.steps_per_epoch,
                          architecture(run.config.model.name).head)


def make_state(run: Run, variables: dict | None = None, before_init=None) -> TrainState:
    """A fresh train state created directly with its shardings (no full copy on one device).

    `before_init`, when given, is called with the state's shapes, dtypes and shardings
    (`jax.ShapeDtypeStruct` leaves, the same static fields) before the initialiser compiles."""
    make, rng, abstract, shardings = _initialiser(run, variables)
    if before_init is not None:
        before_init(_placed(abstract, shardings))
    return jax.jit(make, out_shardings=shardings,
                   compiler_options=init_compiler_options())(variables, rng)


def abstract_state(run: Run) -> TrainState:
    """The train state `make_state` would create, as `jax.ShapeDtypeStruct` leaves with their
    shardings (the same static fields): a target to restore a checkpoint into, with no
    initialiser compiled or run and no second copy of the state in memory."""
    _, _, abstract, shardings = _initialiser(run, None)
    return _placed(abstract, shardings)


def _initialiser(run: Run, variables: dict | None):
    tx, rng = make_tx(run), jax.random.PRNGKey(run.config.seed)
    # the key is an argument, not a constant: one compiled program (and cache entry) per
    # architecture and shape, whatever the seed
    make = lambda v, key: create_train_state(run.model, tx, key, run.input_shape, v)
    abstract = jax.eval_shape(make, variables, rng)
    shardings = parallel.state_shardings(run.mesh, abstract, run.config.mesh.get("shard_params",
                                                                                False))
    return make, rng, abstract, shardings


def _placed(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def state_tree(state: TrainState) -> dict:
    """The checkpointed part of a state, as a plain dict."""
    return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}


def abstract_tree(state: TrainState) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state_tree(state))


def compile_steps(run: Run, state: TrainState):
    """jit-compiled train and eval steps with a donated state and explicit shardings.

    The train step takes one batch, or batches stacked on a leading axis and the number of them
    to run, for several steps in one call (`steps.stacked_or_single`; each form compiles on
    first use)."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(stacked_or_single(make_train_step(run.step_config)), donate_argnums=0,
                         out_shardings=(state_sharding, parallel.replicated(run.mesh)))
    eval_step = jax.jit(make_eval_step(run.step_config))
    return train_step, eval_step
