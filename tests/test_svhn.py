"""The SVHN path end to end: TFDS mock data, generated .mat files, ported starts, comparison."""

import json
import urllib.error

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import svhn
from dlassign.analysis.compare import compare
from dlassign.data import Dataset, Normalizer, Split
from dlassign.errors import PortingError
from dlassign.training.evaluation import evaluate_checkpoint
from dlassign.training.trainer import train_and_evaluate
from tests.test_data import write_svhn_mat


def small(config, **fields):
    config.num_epochs = 1
    config.batch_size = 16
    config.eval_batch_size = 32
    config.log_every_steps = 0
    config.torchvision_weights = ""
    for key, value in fields.items():
        config.update_from_flattened_dict({key: value})
    return config


@pytest.mark.slow
def test_svhn_on_tfds_mock_data(tmp_path):
    config = small(svhn.get_config("lenet5"))
    with tfds.testing.mock_data(num_examples=64):
        results = train_and_evaluate(config, str(tmp_path))
    assert results["dataset"] == "svhn_cropped" and results["test"]["num_examples"] == 64
    assert set(results["prediction_collapse"]) == {"collapsed", "top_classes", "share"}


@pytest.fixture
def svhn_dir(tmp_path):
    write_svhn_mat(tmp_path / "train_32x32.mat", 96, seed=0)
    write_svhn_mat(tmp_path / "test_32x32.mat", 40, seed=1)
    return tmp_path


@pytest.mark.slow
def test_svhn_mat_files_subset_and_comparison(svhn_dir, tmp_path):
    runs = []
    for arch, extra in (("lenet5", False), ("resnet18", True)):
        config = small(svhn.get_config(arch), **{"data.data_dir": str(svhn_dir),
                                                 "data.subset_fraction": 0.5})
        if extra:
            with config.unlocked():
                config.model.stage_sizes = (1, 1, 1, 1)
        workdir = tmp_path / arch
        results = train_and_evaluate(config, str(workdir))
        assert results["test"]["num_examples"] == 40  # the test split is never subsetted
        assert results["steps"] == 3  # 48 of the 96 training images, batch 16
        runs.append(str(workdir))
    out = compare(runs, str(tmp_path / "cmp"))
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| lenet5 |" in text and "| resnet18 |" in text and out["rows"][1]["num_params"] > 0
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000


def test_collapse_is_recorded_and_warned(tmp_path, caplog):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    train = Split(images, np.zeros(64, np.int32))  # one class only: the model can only collapse
    test = Split(images[:40], (np.arange(40) % 4).astype(np.int32))
    data = Dataset("digits", 4, train, test, Normalizer((0.0,), (1.0,)))
    from tests.helpers import tiny_config

    results = train_and_evaluate(tiny_config(), str(tmp_path), data)
    assert results["prediction_collapse"]["collapsed"]
    assert results["test"]["recall_macro"] == pytest.approx(0.25)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["prediction_collapse"]["collapsed"] is True
    assert any("PREDICTIONS COLLAPSED" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_ported_checkpoint_starts_training_and_evaluates(svhn_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from dlassign.porting.port import port
    from dlassign.porting.torch_models import build

    torch.manual_seed(0)
    model = build("lenet5", 10)
    state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
    config = small(svhn.get_config("lenet5"), **{"data.data_dir": str(svhn_dir)})
    port("lenet5", state_dict, config, False, str(tmp_path / "ported"), "test")
    evaluated = evaluate_checkpoint(str(tmp_path / "ported"))
    assert evaluated["step"] == 0 and evaluated["test"]["num_examples"] == 40
    config.init_checkpoint = str(tmp_path / "ported")
    config.num_epochs = 1
    from dlassign.training.initial import initial_variables
    from dlassign.training.setup import setup

    variables = initial_variables(setup(config))
    np.testing.assert_array_equal(np.asarray(variables["params"]["conv1"]["kernel"]),
                                  state_dict["conv1.weight"].transpose(2, 3, 1, 0))
    results = train_and_evaluate(config, str(tmp_path / "finetuned"))
    assert results["steps"] == 6


def test_ported_checkpoint_of_another_architecture_is_refused(svhn_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from dlassign.errors import CheckpointError
    from dlassign.porting.port import port
    from dlassign.porting.torch_models import build
    from dlassign.training.initial import initial_variables
    from dlassign.training.setup import setup

    torch.manual_seed(0)
    state_dict = {k: v.numpy() for k, v in build("lenet5", 10).state_dict().items()}
    config = small(svhn.get_config("lenet5"), **{"data.data_dir": str(svhn_dir)})
    port("lenet5", state_dict, config, False, str(tmp_path / "ported"), "test")
    other = small(svhn.get_config("resnet18"), **{"data.data_dir": str(svhn_dir)})
    other.init_checkpoint = str(tmp_path / "ported")
    with pytest.raises(CheckpointError, match="holds 'lenet5' weights; this run's model is "
                                              "'resnet18'"):
        initial_variables(setup(other))


def test_torchvision_download_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("torchvision")
    import torch

    from dlassign.porting import torchvision_state_dict

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PortingError, match="could not download torchvision weights resnet18 "
                                           "IMAGENET1K_V1.*--torch_checkpoint"):
        torchvision_state_dict("resnet18", "IMAGENET1K_V1")
    with pytest.raises(PortingError, match="unknown torchvision weights 'IMAGENET9K'"):
        torchvision_state_dict("resnet18", "IMAGENET9K")


@pytest.mark.slow
def test_frozen_layers_and_backbone_learning_rate(tmp_path):
    from tests.helpers import synthetic_dataset, tiny_config

    data = synthetic_dataset()
    config = tiny_config({"optimizer.frozen": ("dense0",)})
    from dlassign.training.setup import make_state, setup

    initial = make_state(setup(config, data)).params
    train_and_evaluate(config, str(tmp_path / "frozen"), data)
    from dlassign.training.evaluation import restore_run

    _, state, _ = restore_run(str(tmp_path / "frozen"), dataset=data)
    np.testing.assert_array_equal(state.params["dense0"]["kernel"], initial["dense0"]["kernel"])
    assert not np.array_equal(state.params["head"]["kernel"], initial["head"]["kernel"])
    config = tiny_config({"optimizer.backbone_lr_scale": 0.0})
    train_and_evaluate(config, str(tmp_path / "scaled"), data)
    _, state, _ = restore_run(str(tmp_path / "scaled"), dataset=data)
    np.testing.assert_array_equal(state.params["dense0"]["kernel"], initial["dense0"]["kernel"])
    assert not np.array_equal(state.params["head"]["kernel"], initial["head"]["kernel"])
