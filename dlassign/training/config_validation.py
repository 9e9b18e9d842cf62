"""Checks every config field before any data is read or any compute starts.

Each failure is one `ConfigError` line that names the field, the value and what would be valid.
"""

from __future__ import annotations

import math
import numbers
import os

from dlassign.data.preprocess import NORMALIZATIONS
from dlassign.data.sources import dataset_info, datasets
from dlassign.errors import ConfigError, one_of
from dlassign.models import IMPLS, architecture, architectures
from dlassign.models.layers import ACTIVATIONS
from dlassign.training.losses import LOSSES
from dlassign.training.optim import OPTIMIZERS, SCHEDULES

DTYPE_NAMES = ("float32", "bfloat16")


def _number(field: str, value, *, low=None, high=None, low_open=False, high_open=False,
            integer=False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(
        value, bool)
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    need = f"{kind}{' ' + ' and '.join(bounds) if bounds else ''}"
    if not ok_type:
        raise ConfigError(f"{field}={value!r} is invalid; expected {need}")
    if not math.isfinite(value):
        raise ConfigError(f"{field}={value!r} is invalid; expected a finite number"
                          f"{' ' + ' and '.join(bounds) if bounds else ''}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{field}={value!r} is invalid; expected {need}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"{field}={value!r} is invalid; expected {need}")


def _choice(field: str, value, valid) -> None:
    if value not in valid:
        raise one_of(field, value, valid)


def _required(config, *paths: str) -> None:
    for path in paths:
        node = config
        for part in path.split("."):
            if part not in node:
                raise ConfigError(f"config has no field {path!r}; see configs/base.py")
            node = node[part]


def check_data_dir(name: str, data_dir: str) -> None:
    """A local data directory must exist and hold the dataset's raw files."""
    if not data_dir:
        return
    spec = dataset_info(name)
    if spec.embedded is not None:
        raise ConfigError(f"data.data_dir={data_dir!r} is set but dataset {name!r} is embedded; "
                          "leave data.data_dir empty")
    if spec.read_local is None:
        raise ConfigError(f"data.data_dir={data_dir!r} is set but dataset {name!r} has no local "
                          "file format; leave data.data_dir empty to load it through TFDS")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"data.data_dir={data_dir!r} is not a directory; expected one holding "
                          f"{spec.local_files}")
    if spec.has_local_files is not None and not spec.has_local_files(data_dir):
        raise ConfigError(f"data.data_dir={data_dir!r} lacks the {name} files; expected "
                          f"{spec.local_files}")


def final_image_size(data_cfg) -> int:
    """The square side length the model sees after padding and resizing."""
    native = dataset_info(data_cfg.name).image_shape[0]
    return data_cfg.get("image_size", 0) or data_cfg.get("pad_to", 0) or native


def validate_model(model_cfg) -> None:
    _choice("model.name", model_cfg.get("name"), architectures())
    fields = architecture(model_cfg.name).fields
    for key, value in model_cfg.items():
        if key == "name":
            continue
        if key not in fields:
            raise ConfigError(f"model.{key} is not a field of model {model_cfg.name!r}; its "
                              f"fields are {', '.join(sorted(fields - {'dtype'}))}")
        if key in ("activation", "conv_activation"):
            _choice(f"model.{key}", value, ACTIVATIONS)
        elif key == "dropout":
            _number("model.dropout", value, low=0, high=1, high_open=True)
        elif key in ("hidden_sizes", "conv_features"):
            if not all(isinstance(w, numbers.Integral) and w > 0 for w in value):
                raise ConfigError(f"model.{key}={tuple(value)!r} is invalid; expected positive "
                                  "integers")
        elif key == "dense_width":
            _number("model.dense_width", value, low=1, integer=True)
        elif key == "padding":
            _choice("model.padding", value, ("same", "valid"))


def validate_data(data_cfg) -> None:
    _choice("data.name", data_cfg.get("name"), datasets())
    _number("data.subset_fraction", data_cfg.get("subset_fraction", 1.0), low=0, high=1,
            low_open=True)
    _number("data.validation_fraction", data_cfg.get("validation_fraction", 0.0), low=0, high=1,
            high_open=True)
    for key in ("pad_to", "image_size", "channels", "random_crop"):
        _number(f"data.{key}", data_cfg.get(key, 0), low=0, integer=True)
    if data_cfg.get("channels", 0) not in (0, 1, 3):
        raise ConfigError(f"data.channels={data_cfg.channels!r} is invalid; expected 0 (as "
                          "stored), 1 or 3")
    _choice("data.normalization", data_cfg.get("normalization", "scale"), NORMALIZATIONS)
    channels = data_cfg.get("channels", 0) or dataset_info(data_cfg.name).image_shape[-1]
    if data_cfg.get("normalization") == "imagenet" and channels != 3:
        raise ConfigError("data.normalization='imagenet' needs 3 channels; set data.channels=3")
    check_data_dir(data_cfg.name, data_cfg.get("data_dir", ""))


def check_image_size(model_cfg, size: int) -> None:
    arch = architecture(model_cfg.name)
    need = arch.smallest_input(model_cfg)
    if size < need:
        raise ConfigError(f"image size {size} is too small for model {model_cfg.name!r}, "
                          f"which needs at least {need}x{need}; set data.image_size>={need}")
    if arch.image_size is not None and size != arch.image_size:
        s = arch.image_size
        raise ConfigError(f"model {model_cfg.name!r} takes {s}x{s} inputs; the data gives "
                          f"{size}x{size} (set data.pad_to={s} or data.image_size={s})")


def validate_train_config(config, image_size: int | None = None) -> None:
    """Raises ConfigError on the first field that cannot work.

    Args:
      config: a training config.
      image_size: the side length of already prepared images; by default derived from the
        config's dataset and geometry fields.
    """
    _required(config, "seed", "model.name", "data.name", "loss", "optimizer.name",
              "optimizer.learning_rate", "batch_size", "eval_batch_size", "num_epochs")
    _number("seed", config.seed, low=0, integer=True)
    validate_model(config.model)
    validate_data(config.data)
    _choice("loss", config.loss, LOSSES)
    opt = config.optimizer
    _choice("optimizer.name", opt.name, OPTIMIZERS)
    _number("optimizer.learning_rate", opt.learning_rate, low=0, low_open=True)
    _choice("optimizer.schedule", opt.get("schedule", "constant"), SCHEDULES)
    _number("optimizer.momentum", opt.get("momentum", 0.0), low=0, high=1, high_open=True)
    for key in ("weight_decay", "warmup_epochs", "grad_clip_norm", "backbone_lr_scale"):
        _number(f"optimizer.{key}", opt.get(key, 0.0), low=0)
    _number("batch_size", config.batch_size, low=1, integer=True)
    _number("eval_batch_size", config.eval_batch_size, low=1, integer=True)
    _number("num_epochs", config.num_epochs, low=1, integer=True)
    for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        _number(key, config.get(key, 0), low=0, integer=True)
    _choice("checkpoint_best", config.get("checkpoint_best", False), (False, True))
    if config.get("checkpoint_best", False) and not config.data.get("validation_fraction", 0.0):
        raise ConfigError("checkpoint_best=True needs a validation split to choose by; set "
                          "data.validation_fraction, e.g. 0.1")
    _number("keep_checkpoints", config.get("keep_checkpoints", 3), low=1, integer=True)
    _number("steps_per_call", config.get("steps_per_call", 0), low=0, integer=True)
    _number("max_call_seconds", config.get("max_call_seconds", 5.0), low=0, low_open=True)
    _choice("dtype", config.get("dtype", "float32"), DTYPE_NAMES)
    _choice("impl", config.get("impl", "auto"), IMPLS)
    _number("mesh.num_devices", config.get("mesh", {}).get("num_devices", 0), low=0,
            integer=True)
    _number("mesh.cpu_data_parallel_max_params",
            config.get("mesh", {}).get("cpu_data_parallel_max_params", 0), low=0, integer=True)
    _number("mesh.cpu_data_parallel_min_step_flops",
            config.get("mesh", {}).get("cpu_data_parallel_min_step_flops", 0.0), low=0)
    _choice("continue_with_changes", config.get("continue_with_changes", False), (False, True))
    validate_curvature(config.get("curvature", {}))
    check_image_size(config.model, image_size or final_image_size(config.data))
    if config.get("init_checkpoint") and not os.path.isdir(config.init_checkpoint):
        raise ConfigError(f"init_checkpoint={config.init_checkpoint!r} is not a directory; "
                          "expected the output of experiments.port_weights or a training workdir")


CURVATURE_FIELDS = ("every_steps", "num_examples", "power_iters", "cold_iters", "tol",
                    "trace_samples")


def validate_curvature(curvature) -> None:
    """The `curvature` block: curvature during training (hessian.tracking.CurvatureHook)."""
    for key in curvature.keys():
        if key not in CURVATURE_FIELDS:
            raise ConfigError(f"curvature.{key} is not a field of curvature; its fields are "
                              f"{', '.join(CURVATURE_FIELDS)}")
    _number("curvature.every_steps", curvature.get("every_steps", 0), low=0, integer=True)
    _number("curvature.num_examples", curvature.get("num_examples", 256), low=1, integer=True)
    _number("curvature.power_iters", curvature.get("power_iters", 10), low=2, integer=True)
    _number("curvature.cold_iters", curvature.get("cold_iters", 30), low=2, integer=True)
    _number("curvature.tol", curvature.get("tol", 1e-3), low=0, high=1, low_open=True,
            high_open=True)
    trace = curvature.get("trace_samples", 0)
    _number("curvature.trace_samples", trace, low=0, integer=True)
    if trace == 1:
        raise ConfigError("curvature.trace_samples=1 is invalid; expected 0 (no trace) or at "
                          "least 2 (the trace's standard error needs two probes)")


def validate_tune_config(config) -> None:
    """A tuning config: a training config plus `tune.num_folds` and a non-empty `tune.grid`."""
    validate_train_config(config)
    every = config.get("curvature", {}).get("every_steps", 0)
    if every:  # the grid's runs take no hooks
        raise ConfigError(f"curvature.every_steps={every} is invalid in a grid search; expected 0 "
                          "(train the chosen cell with experiments.train to track its curvature)")
    _required(config, "tune.grid", "tune.num_folds")
    _number("tune.num_folds", config.tune.num_folds, low=2, integer=True)
    _choice("tune.mode", config.tune.get("mode", "auto"), ("auto", "vmap", "sequential"))
    share = config.tune.get("share_programs", True)
    if not isinstance(share, bool):
        raise ConfigError(f"tune.share_programs={share!r} is invalid; expected true or false")
    grid = config.tune.grid
    if not grid:
        raise ConfigError("tune.grid is empty; expected e.g. {'model': {'dense_width': [32, 64]}}")
    for path, values in flatten_grid(grid):
        _required(config, path)
        if not isinstance(values, (list, tuple)) or len(values) == 0:
            raise ConfigError(f"tune.grid.{path}={values!r} is invalid; expected a non-empty "
                              "list of values")


def flatten_grid(grid, prefix: str = "") -> list[tuple[str, list]]:
    """{'model': {'dense_width': [32, 64]}} -> [('model.dense_width', [32, 64])]."""
    out = []
    for key, value in grid.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.extend(flatten_grid(value, path + "."))
        else:
            out.append((path, list(value) if isinstance(value, (list, tuple)) else value))
    return out
