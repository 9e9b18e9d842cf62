"""A run's starting weights: its `init_checkpoint`, or torchvision's `torchvision_weights`
ported into Flax, checked against the configured model."""

from __future__ import annotations

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dlassign.errors import CheckpointError
from dlassign.runtime.checkpoint import load_variables
from dlassign.training.setup import Run


def initial_variables(run: Run) -> dict | None:
    """Starting weights: `init_checkpoint`, or torchvision's `torchvision_weights`, or None.

    Raises:
      CheckpointError: the weights do not fit the configured model (names the first key).
    """
    config = run.config
    if config.get("init_checkpoint"):
        variables, meta = load_variables(config.init_checkpoint)
        source = f"init_checkpoint {config.init_checkpoint!r}"
        arch = meta.get("arch") or meta.get("config", {}).get("model", {}).get("name")
        if arch and arch != config.model.name:
            raise CheckpointError(f"{source} holds {arch!r} weights; this run's model is "
                                  f"{config.model.name!r}")
    elif config.get("torchvision_weights"):
        from dlassign.porting import torch_to_flax, torchvision_state_dict

        state_dict = torchvision_state_dict(config.model.name, config.torchvision_weights)
        variables = torch_to_flax(state_dict, config.model.name, run.dataset.num_classes,
                                  replace_head=True, rng=jax.random.PRNGKey(config.seed))
        source = f"torchvision {config.model.name} {config.torchvision_weights}"
    else:
        return None
    want = jax.eval_shape(lambda: run.model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *run.dataset.image_shape)), train=False))
    want = traverse_util.flatten_dict(dict(want))
    have = traverse_util.flatten_dict(variables)
    for key, spec in want.items():
        if key not in have:
            raise CheckpointError(f"{source} lacks {'/'.join(key)} that {config.model.name} "
                                  "needs")
        if tuple(np.shape(have[key])) != tuple(spec.shape):
            raise CheckpointError(f"{source}: {'/'.join(key)} has shape "
                                  f"{tuple(np.shape(have[key]))}, the model needs "
                                  f"{tuple(spec.shape)}")
    cast = lambda a, s: jnp.asarray(a, s.dtype)
    logging.info("starting from %s", source)
    return traverse_util.unflatten_dict({k: cast(have[k], want[k]) for k in want})
