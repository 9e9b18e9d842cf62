"""A model declared outside the library, as a user adds one: Flax code built from
`dlassign.models.layers` plus its `Architecture`. It trains, ports both ways against its torch
twin, and exports for the accelerators, without naming a kernel or a layout."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlassign.models import Architecture, TorchEntry, architectures, get_model, placement
from dlassign.models.layers import batch_norm, conv, flatten_dense, logits, max_pool
from dlassign.training.trainer import train_and_evaluate
from tests.helpers import synthetic_dataset, tiny_config
from tests.test_export import ACCELERATORS, _export, _steps, cpu_kernels  # noqa: F401

SIZE = 12


class TinyNet(nn.Module):
    """conv 3x3 (padding 1), BatchNorm, ReLU, 2x2 max pool, dense head over the flattened map."""

    num_classes: int
    features: int = 8
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(self.features, 3, 1, 1, dtype=self.dtype, name="conv")(x)
        x = max_pool(nn.relu(batch_norm(train, self.dtype, name="bn")(x)), 2, 2)
        return logits(flatten_dense(x, self.num_classes, "chw", dtype=self.dtype, name="head"))


def torch_table() -> list[TorchEntry]:
    return [TorchEntry("conv", ("conv",), "conv"), TorchEntry("bn", ("bn",), "bn"),
            TorchEntry("head", ("head",), "linear", head=True)]


def torch_module(num_classes: int = 10, in_channels: int = 3):
    import torch

    class TorchTinyNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.head = torch.nn.Linear(8 * (SIZE // 2) ** 2, num_classes)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
            return self.head(torch.flatten(x, 1))

    return TorchTinyNet()


TINY = Architecture("tinynet", TinyNet, head="head", min_image_size=SIZE, image_size=SIZE,
                    torch_table=torch_table, torch_module=torch_module)


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """TinyNet registered for the test, as a module of dlassign.models would declare it."""
    monkeypatch.setitem(architectures(), TINY.name, TINY)


def test_the_model_names_no_kernel_or_layout():
    source = inspect.getsource(TinyNet)
    for word in ("impl", "batch_minor", "active_units", "kernels", "im2col", "cpu"):
        assert word not in source
    placed, devices = placement(get_model("tinynet", 10), platform="cpu",
                                input_shape=(2, SIZE, SIZE, 1))
    assert placed.layout.batch_minor and devices == 1  # chosen by placement, through the layers


def test_it_trains_through_train_and_evaluate(tmp_path):
    config = tiny_config({"num_epochs": 4, "mesh.num_devices": 1})
    config.model = {"name": "tinynet"}
    results = train_and_evaluate(config, str(tmp_path), synthetic_dataset(size=SIZE))
    assert results["test"]["accuracy"] >= 0.9


def test_it_ports_both_ways_with_parity():
    torch = pytest.importorskip("torch")
    from dlassign.porting import flax_to_torch, torch_to_flax
    from tests.test_porting import randomised, state_dict_numpy

    model = randomised("tinynet").double()
    sd = state_dict_numpy(model)
    x = np.random.default_rng(1).normal(size=(2, 3, SIZE, SIZE))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    variables = torch_to_flax(sd, "tinynet")
    placed, _ = placement(get_model("tinynet", 10), platform="cpu", input_shape=(2, SIZE, SIZE, 3))
    assert placed.layout.batch_minor
    with jax.enable_x64(True):
        out = np.asarray(jax.jit(placed.apply)(jax.tree.map(jnp.asarray, variables),
                                               jnp.asarray(x.transpose(0, 2, 3, 1))))
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)
    back = flax_to_torch(variables, "tinynet", num_batches_tracked=7)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_it_exports_for_the_accelerators(dtype, cpu_kernels):  # noqa: F811
    from dlassign.training.setup import DTYPES

    model = get_model("tinynet", 10, dtype=DTYPES[dtype])
    for platform in ACCELERATORS:
        train, evaluate, state, batch = _steps(model, dtype, platform, (2, SIZE, SIZE, 1))
        assert "stablehlo.convolution" in _export(train, state, batch, platform=platform)
        assert "stablehlo.convolution" in _export(evaluate, state, batch, platform=platform)
    assert cpu_kernels == []
