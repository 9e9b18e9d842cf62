"""Optax optimizers and learning-rate schedules from the config's `optimizer` block."""

from __future__ import annotations

import flax.traverse_util as traverse_util
import optax

from dlassign.errors import one_of

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(opt_cfg, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up over `warmup_epochs`, then constant or cosine decay to 0 at `total_steps`."""
    lr = opt_cfg.learning_rate
    warmup = int(round(opt_cfg.get("warmup_epochs", 0.0) * steps_per_epoch))
    name = opt_cfg.get("schedule", "constant")
    if name not in SCHEDULES:
        raise one_of("optimizer.schedule", name, SCHEDULES)
    if name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    else:
        main = optax.constant_schedule(lr)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base(opt_cfg, schedule) -> optax.GradientTransformation:
    name = opt_cfg.name
    if name == "sgd":
        sgd = optax.sgd(schedule, momentum=opt_cfg.get("momentum", 0.0) or None,
                        nesterov=opt_cfg.get("nesterov", False))
        decay = opt_cfg.get("weight_decay", 0.0)
        return optax.chain(optax.add_decayed_weights(decay), sgd) if decay else sgd
    if name == "adam":
        return optax.adam(schedule)
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=opt_cfg.get("weight_decay", 0.0))
    raise one_of("optimizer.name", name, OPTIMIZERS)


def param_groups(params, head: str, frozen: tuple[str, ...]) -> dict:
    """Labels each parameter 'head', 'frozen' or 'backbone' by its top-level module name."""
    flat = traverse_util.flatten_dict(params)
    label = lambda path: ("head" if path[0] == head else
                          "frozen" if any(path[0] == f or path[0].startswith(f + "_")
                                          for f in frozen) else "backbone")
    return traverse_util.unflatten_dict({k: label(k) for k in flat})


def make_optimizer(opt_cfg, total_steps: int, steps_per_epoch: int, head: str | None = None
                   ) -> optax.GradientTransformation:
    """The optimizer: optional clipping and weight decay, backbone LR scaling, frozen layers.

    Args:
      opt_cfg: name ('sgd', 'adam', 'adamw'), learning_rate, momentum, nesterov, weight_decay
        (L2 added to the gradient for sgd, decoupled for adamw, unused by adam),
        schedule ('constant', 'cosine'), warmup_epochs, grad_clip_norm (0: off),
        backbone_lr_scale (1: the whole network at one rate), frozen (top-level module names whose
        parameters are not updated, e.g. ('conv1', 'bn1', 'layer1')).
      total_steps: length of training, for the cosine schedule.
      steps_per_epoch: to turn warmup_epochs into steps.
      head: top-level module name of the classification head; needed by backbone_lr_scale.
    """
    schedule = learning_rate_schedule(opt_cfg, total_steps, steps_per_epoch)
    tx = _base(opt_cfg, schedule)
    frozen = tuple(opt_cfg.get("frozen", ()) or ())
    scale = opt_cfg.get("backbone_lr_scale", 1.0)
    if frozen or scale != 1.0:
        backbone = tx if scale == 1.0 else optax.chain(tx, optax.scale(scale))
        tx = optax.multi_transform(
            {"head": tx, "backbone": backbone, "frozen": optax.set_to_zero()},
            lambda params: param_groups(params, head, frozen))
    clip = opt_cfg.get("grad_clip_norm", 0.0)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx
