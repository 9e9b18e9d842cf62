"""Every bad config value is refused before any data is read, with a message naming it."""

import pytest

from configs import base
from dlassign.errors import ConfigError
from dlassign.training.config_validation import validate_train_config, validate_tune_config

CASES = [
    ("model.name", "resnet19", "unknown model.name 'resnet19'; expected one of alexnet"),
    ("model.activation", "relu6", "unknown model.activation 'relu6'; expected one of elu"),
    ("model.dropout", 1.0, "model.dropout=1.0 is invalid; expected a number >= 0 and < 1"),
    ("model.hidden_sizes", (64, 0), "model.hidden_sizes=(64, 0) is invalid"),
    ("data.name", "cifar10", "unknown data.name 'cifar10'; expected one of digits, "),
    ("data.subset_fraction", 0.0, "data.subset_fraction=0.0 is invalid; expected a number > 0"),
    ("data.subset_fraction", 1.5, "data.subset_fraction=1.5 is invalid"),
    ("data.validation_fraction", 1.0, "data.validation_fraction=1.0 is invalid; expected a "
                                      "number >= 0 and < 1"),
    ("data.validation_fraction", -0.1, "data.validation_fraction=-0.1 is invalid"),
    ("eval_every_steps", -5, "eval_every_steps=-5 is invalid; expected an integer >= 0"),
    ("checkpoint_best", True, "checkpoint_best=True needs a validation split"),
    ("data.normalization", "zscore", "unknown data.normalization 'zscore'"),
    ("data.channels", 2, "data.channels=2 is invalid"),
    ("data.pad_to", -1, "data.pad_to=-1 is invalid"),
    ("loss", "hinge", "unknown loss 'hinge'; expected one of cross_entropy, mse, square"),
    ("optimizer.name", "rmsprop", "unknown optimizer.name 'rmsprop'; expected one of adam, "
                                  "adamw, sgd"),
    ("optimizer.schedule", "step", "unknown optimizer.schedule 'step'; expected one of "
                                   "constant, cosine"),
    ("optimizer.learning_rate", 0.0, "optimizer.learning_rate=0.0 is invalid; expected a "
                                     "number > 0"),
    ("optimizer.learning_rate", -0.1, "optimizer.learning_rate=-0.1 is invalid"),
    ("optimizer.momentum", 1.0, "optimizer.momentum=1.0 is invalid"),
    ("optimizer.weight_decay", -1e-4, "optimizer.weight_decay=-0.0001 is invalid"),
    ("batch_size", 0, "batch_size=0 is invalid; expected an integer >= 1"),
    ("batch_size", -32, "batch_size=-32 is invalid"),
    ("eval_batch_size", 0, "eval_batch_size=0 is invalid"),
    ("num_epochs", 0, "num_epochs=0 is invalid; expected an integer >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 is invalid"),
    ("steps_per_call", -1, "steps_per_call=-1 is invalid; expected an integer >= 0"),
    ("max_call_seconds", 0.0, "max_call_seconds=0.0 is invalid; expected a number > 0"),
    ("dtype", "float16", "unknown dtype 'float16'; expected one of bfloat16, float32"),
    ("impl", "gpu", "unknown impl 'gpu'; expected one of auto, cpu, im2col, xla"),
    ("mesh.num_devices", -1, "mesh.num_devices=-1 is invalid"),
    ("seed", -3, "seed=-3 is invalid"),
    *[(field, value, f"{field}={value!r} is invalid; expected a finite number")
      for field, value in [("optimizer.learning_rate", float("nan")),
                           ("optimizer.learning_rate", float("inf")),
                           ("optimizer.weight_decay", float("nan")),
                           ("optimizer.momentum", float("nan")),
                           ("optimizer.grad_clip_norm", float("inf")),
                           ("optimizer.backbone_lr_scale", float("nan")),
                           ("optimizer.warmup_epochs", float("inf")),
                           ("optimizer.warmup_epochs", float("nan")),
                           ("model.dropout", float("nan")),
                           ("data.subset_fraction", float("nan")),
                           ("data.validation_fraction", float("nan")),
                           ("data.validation_fraction", float("inf")),
                           ("mesh.cpu_data_parallel_min_step_flops", float("inf"))]],
]


@pytest.mark.parametrize("field,value,message", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_bad_value_is_named(field, value, message):
    config = base.get_config()
    with config.unlocked():
        config.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError) as e:
        validate_train_config(config)
    assert message in str(e.value)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "square"])
def test_every_loss_is_accepted(loss):
    config = base.get_config()
    config.loss = loss
    validate_train_config(config)


def test_unknown_model_field():
    config = base.get_config()
    config.model.name = "cnn"  # base's model block holds MLP fields
    with pytest.raises(ConfigError, match="model.hidden_sizes is not a field of model 'cnn'"):
        validate_train_config(config)


def test_image_too_small_for_alexnet():
    config = base.get_config()
    config.model = {"name": "alexnet"}
    config.data.name = "mnist"
    config.data.image_size = 62
    with pytest.raises(ConfigError, match="image size 62 is too small for model 'alexnet', "
                                          "which needs at least 63x63"):
        validate_train_config(config)
    config.data.image_size = 63
    config.data.channels = 3
    validate_train_config(config)


def test_data_dir_must_hold_the_files(tmp_path):
    config = base.get_config()
    config.data.name = "mnist"
    config.data.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.data_dir=.*nowhere' is not a directory"):
        validate_train_config(config)
    config.data.data_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="lacks the mnist files; expected train-images-idx3"):
        validate_train_config(config)
    config.data.name = "svhn_cropped"
    with pytest.raises(ConfigError, match="lacks the svhn_cropped files; expected "
                                          "train_32x32.mat"):
        validate_train_config(config)


def test_imagenet_normalisation_needs_three_channels():
    config = base.get_config()
    config.data.normalization = "imagenet"
    with pytest.raises(ConfigError, match="needs 3 channels; set data.channels=3"):
        validate_train_config(config)


def test_tune_needs_two_folds_and_a_grid():
    config = base.get_config()
    with config.unlocked():
        config.tune = {"num_folds": 1, "grid": {"model": {"activation": ["relu"]}}}
    with pytest.raises(ConfigError, match="tune.num_folds=1 is invalid; expected an integer >= 2"):
        validate_tune_config(config)
    config.tune.num_folds = 3
    config.tune.grid = {"model": {"widths": [1, 2]}}
    with pytest.raises(ConfigError, match="no field 'model.widths'"):
        validate_tune_config(config)
    config.tune.share_programs = 1
    with pytest.raises(ConfigError, match="tune.share_programs=1 is invalid; expected true"):
        validate_tune_config(config)
    config.tune.share_programs = False
    config.tune.grid = {"model": {"activation": []}}
    with pytest.raises(ConfigError, match="tune.grid.model.activation=\\[\\] is invalid"):
        validate_tune_config(config)


def test_every_config_file_is_valid():
    """Every file in configs/ (each architecture of the parameterised ones) passes validation;
    a new config file fails here until it is handled."""
    import importlib
    import inspect
    import pathlib

    from dlassign.models import architectures
    from dlassign.training.config_validation import validate_tune_config

    portable = [n for n, a in architectures().items() if a.portable]
    arch_args = {"svhn": portable, "digits32": portable, "mnist_ported": ["lenet5", "resnet18"]}
    # configs/convexity.py, curvature.py and sharpness.py are their studies' own configs
    # (validated as the study runs; tests/test_sharpness.py and tests/test_gauss_newton.py
    # validate theirs)
    study_configs = {"convexity", "curvature", "sharpness"}

    def check(config):
        (validate_tune_config if "tune" in config else validate_train_config)(config)

    names = sorted(p.stem for p in pathlib.Path("configs").glob("*.py") if p.stem != "__init__")
    assert len(names) >= 12
    checked = 0
    for name in names:
        module = importlib.import_module(f"configs.{name}")
        if name in study_configs:
            continue
        if inspect.signature(module.get_config).parameters:
            assert name in arch_args, f"configs/{name}.py takes an argument; list its values"
            for arch in arch_args[name]:
                check(module.get_config(arch))
                checked += 1
        elif name == "main":
            main = module.get_config()
            for part in (main.tune_mlp, main.tune_cnn, *main.transfer.values()):
                check(part)
                checked += 1
        else:
            check(module.get_config())
            checked += 1
    assert checked >= len(names) - len(study_configs)
