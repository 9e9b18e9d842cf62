"""torchvision -> Flax porting: exact parity for every architecture, strict errors, round trips.

The torch models are built with weights=None and BatchNorm statistics and affine parameters
randomised, so a mapping that mixes up running mean and variance, or scale and bias, shows.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dlassign.errors import PortingError  # noqa: E402
from dlassign.models import architecture, architectures, get_model, placement  # noqa: E402
from dlassign.porting import flax_to_torch, read_state_dict, torch_to_flax, write_state_dict  # noqa: E402
from dlassign.porting.torch_models import build  # noqa: E402

# Every architecture with a torch name table; a new one is checked without editing this file.
PORTABLE = [name for name, arch in architectures().items() if arch.portable]


def input_side(arch: str) -> int:
    """32 (SVHN's), or the next multiple of 32 the architecture needs (AlexNet: 64)."""
    need = architecture(arch).smallest_input()
    return max(32, -(-need // 32) * 32)


def randomised(arch, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = build(arch, num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.num_batches_tracked.fill_(7)
    return model


def state_dict_numpy(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_every_torchvision_architecture_is_portable():
    assert {"lenet5", "alexnet", "vgg16", "vgg16_bn", "resnet18", "resnet50",
            "resnet101"} <= set(PORTABLE)


@pytest.mark.slow
@pytest.mark.parametrize("arch", PORTABLE)
def test_parity_and_round_trip(arch):
    size = input_side(arch)
    model = randomised(arch)
    x = np.random.default_rng(1).normal(size=(2, 3, size, size))
    # placed as the trainer places it on the CPU: the kernels (and batch-minor where it pays)
    flax_model, _ = placement(get_model(arch, num_classes=10), platform="cpu",
                              input_shape=(2, size, size, 3))
    apply = jax.jit(flax_model.apply)  # one compilation, where eager mode compiles every op

    # float64: the same function to round-off.
    model64 = model.double()
    sd64 = state_dict_numpy(model64)
    with torch.no_grad():
        ref64 = model64(torch.from_numpy(x)).numpy()
    variables = torch_to_flax(sd64, arch)
    with jax.enable_x64(True):
        out64 = np.asarray(apply(jax.tree.map(jnp.asarray, variables),
                                 jnp.asarray(x.transpose(0, 2, 3, 1))))
    scale = np.abs(ref64).max()
    assert np.abs(out64 - ref64).max() <= 1e-10 * max(1.0, scale)

    # Round trip: back to torch names and layouts, bit for bit, and torch accepts it strictly.
    back = flax_to_torch(variables, arch, num_batches_tracked=7)
    assert set(back) == set(sd64)
    for k in sd64:
        np.testing.assert_array_equal(back[k], sd64[k], err_msg=k)
    fresh = build(arch, 10).double().eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(torch.from_numpy(x)).numpy(), ref64)

    # float32: within 1e-4 of the logits' scale.
    model32 = model64.float()
    with torch.no_grad():
        ref32 = model32(torch.from_numpy(x.astype(np.float32))).numpy()
    v32 = torch_to_flax(state_dict_numpy(model32), arch)
    out32 = np.asarray(apply(v32, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)))
    assert np.abs(out32 - ref32).max() <= 1e-4 * max(1.0, np.abs(ref32).max())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16_bn", "resnet18"])
def test_train_mode_batch_norm_parity(arch):
    """Training-mode forward passes agree (batch statistics normalise), running means update
    identically, and running variances differ only by the documented batch term: torch adds
    the unbiased batch variance, Flax the biased one, a factor (m - 1) / m."""
    model = randomised(arch).double().train()
    for m in model.modules():  # dropout draws differ between frameworks: switch it off
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    before = state_dict_numpy(model)
    x = np.random.default_rng(2).normal(size=(3, 3, 32, 32))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    after = state_dict_numpy(model)
    variables = torch_to_flax(before, arch)
    with jax.enable_x64(True):
        kwargs = {"dropout": 0.0} if arch.startswith("vgg") else {}
        placed, _ = placement(get_model(arch, num_classes=10, **kwargs), platform="cpu",
                              input_shape=x.transpose(0, 2, 3, 1).shape)
        apply = jax.jit(functools.partial(placed.apply, train=True, mutable=["batch_stats"]))
        out, updates = apply(jax.tree.map(jnp.asarray, variables),
                             jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    new = flax_to_torch({"params": variables["params"], "batch_stats": updates["batch_stats"]},
                        arch, num_batches_tracked=8)
    means = [k for k in after if k.endswith("running_mean")]
    assert means
    for k in means:
        np.testing.assert_allclose(new[k], after[k], rtol=0, atol=1e-12, err_msg=k)
        var = k.replace("running_mean", "running_var")
        torch_batch = (after[var] - 0.9 * before[var]) / 0.1  # unbiased batch variance
        flax_batch = (new[var] - 0.9 * before[var]) / 0.1  # biased batch variance
        ratio = flax_batch / torch_batch
        m = 1.0 / (1.0 - ratio.mean())  # elements per channel that the layer normalised
        assert m > 2 and abs(m - round(m)) < 1e-6, (k, m)
        np.testing.assert_allclose(ratio, (round(m) - 1) / round(m), rtol=1e-9, err_msg=k)


@pytest.fixture(scope="module")
def resnet18_sd():
    return state_dict_numpy(randomised("resnet18"))


def test_missing_key_is_named(resnet18_sd):
    sd = dict(resnet18_sd)
    del sd["layer2.0.bn1.running_var"]
    with pytest.raises(PortingError, match=r"1 missing keys \(layer2.0.bn1.running_var\)"):
        torch_to_flax(sd, "resnet18")


def test_unexpected_key_is_named(resnet18_sd):
    sd = dict(resnet18_sd, **{"extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(PortingError, match=r"1 unexpected keys \(extra.weight\)"):
        torch_to_flax(sd, "resnet18")


def test_misshaped_key_names_both_shapes(resnet18_sd):
    sd = dict(resnet18_sd)
    sd["layer1.0.conv1.weight"] = np.zeros((64, 64, 5, 5), np.float32)
    with pytest.raises(PortingError, match=r"layer1.0.conv1.weight: checkpoint has shape "
                                           r"\(64, 64, 5, 5\), resnet18 with 10 classes needs "
                                           r"\(64, 64, 3, 3\)"):
        torch_to_flax(sd, "resnet18")


@pytest.mark.slow
def test_head_may_differ_only_when_asked(resnet18_sd):
    with pytest.raises(PortingError, match=r"fc.weight: checkpoint has shape \(10, 512\).*"
                                           r"needs \(7, 512\).*replace_head"):
        torch_to_flax(resnet18_sd, "resnet18", num_classes=7)
    v = torch_to_flax(resnet18_sd, "resnet18", num_classes=7, replace_head=True)
    assert v["params"]["fc"]["kernel"].shape == (512, 7)
    np.testing.assert_array_equal(v["params"]["conv1"]["kernel"],
                                  resnet18_sd["conv1.weight"].transpose(2, 3, 1, 0))
    # Only the head: a mis-shaped body layer is still an error with replace_head.
    sd = dict(resnet18_sd, **{"bn1.weight": np.zeros(32, np.float32)})
    with pytest.raises(PortingError, match="bn1.weight"):
        torch_to_flax(sd, "resnet18", num_classes=7, replace_head=True)


def test_other_architecture_is_recognised(resnet18_sd):
    with pytest.raises(PortingError, match="does not fit resnet50.*look like a resnet18 "
                                           "checkpoint"):
        torch_to_flax(resnet18_sd, "resnet50", num_classes=10)


def test_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"these are not the weights you are looking for")
    with pytest.raises(PortingError, match="is not a PyTorch checkpoint"):
        read_state_dict(str(bad))
    bad_st = tmp_path / "weights.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(PortingError, match="is not a safetensors file"):
        read_state_dict(str(bad_st))
    with pytest.raises(PortingError, match="does not exist"):
        read_state_dict(str(tmp_path / "missing.pth"))


def test_pth_and_safetensors_files_round_trip(tmp_path):
    model = randomised("lenet5")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pth")
    sd = read_state_dict(str(tmp_path / "wrapped.pth"))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(sd[k], v.numpy())
    write_state_dict(sd, str(tmp_path / "lenet.safetensors"))
    again = read_state_dict(str(tmp_path / "lenet.safetensors"))
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k])
