"""Every program we compile lowers for the accelerators, and takes no CPU kernel there.

The train and evaluation steps of every registered architecture (float32 and bfloat16 compute)
and the analysis programs (Hessian-vector products, power-iteration and Lanczos steps, the
landscape, sharpness and convexity programs) are exported with `jax.export` for 'cuda' and
'tpu' from this CPU machine. A spy on the CPU kernels shows that `kernels.placement` never
chose one for those platforms, and that it does choose them for the CPU (so the spy can fail).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from dlassign.models import architectures, get_model, placement
from dlassign.training.setup import DTYPES, INPUT_DTYPES
from dlassign.training.steps import StepConfig, make_eval_step, make_train_step
from dlassign.training.train_state import create_train_state
from tests.helpers import synthetic_dataset

ACCELERATORS = ("cuda", "tpu")


@pytest.fixture
def cpu_kernels(monkeypatch):
    """The names of the CPU kernels called while a program is traced, in call order."""
    called = []
    for module, name in (("dlassign.kernels", "cpu_conv_general_dilated"),
                         ("dlassign.kernels", "im2col_conv_general_dilated"),
                         ("dlassign.kernels", "max_pool"),
                         ("dlassign.kernels", "batch_minor"),
                         ("dlassign.kernels", "BatchMinorDense"),
                         ("dlassign.kernels.batch_minor", "batch_minor_conv")):
        real = getattr(sys.modules[module], name)

        def spy(*args, _real=real, _name=name, **kwargs):
            called.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(sys.modules[module], name, spy)
    return called


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), tree)


def _export(fn, *args, platform: str) -> str:
    """The StableHLO text of `fn` exported for `platform` at the shapes of `args`."""
    exported = export.export(fn if hasattr(fn, "trace") else jax.jit(fn),
                             platforms=(platform,))(*args)
    assert exported.platforms == (platform,)
    return exported.mlir_module()


def _steps(model, dtype: str, platform: str, input_shape, impl: str = "auto"):
    """(train step, eval step, abstract state, abstract batch) of `model` placed for
    `platform`, as the trainer builds them."""
    import optax

    placed, _ = placement(model, platform=platform, input_shape=input_shape, impl=impl)
    data = synthetic_dataset(n_train=4, n_test=2, num_classes=10, size=input_shape[1],
                             channels=input_shape[3])
    cfg = StepConfig("cross_entropy", data.normalizer, dtype=INPUT_DTYPES[dtype])
    state = jax.eval_shape(lambda k: create_train_state(placed, optax.sgd(0.1, 0.9), k,
                                                        input_shape), jax.random.PRNGKey(0))
    batch = {"image": jax.ShapeDtypeStruct(input_shape, jnp.uint8),
             "label": jax.ShapeDtypeStruct(input_shape[:1], jnp.int32),
             "mask": jax.ShapeDtypeStruct(input_shape[:1], jnp.bool_)}
    return make_train_step(cfg), make_eval_step(cfg), state, batch


def _input_shape(name: str) -> tuple[int, int, int, int]:
    arch = architectures()[name]
    side = arch.image_size or max(arch.smallest_input(), 8)
    return (2, side, side, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(architectures()))
def test_train_and_eval_steps_of_every_architecture_export_for_the_accelerators(name,
                                                                                 cpu_kernels):
    shape = _input_shape(name)
    for dtype in ("float32", "bfloat16"):
        model = get_model(name, 10, dtype=DTYPES[dtype])
        # one placement serves both accelerators (XLA's own operations), so the steps are
        # traced once and lowered for each
        assert len({placement(model, platform=p)[0] for p in ACCELERATORS}) == 1
        train, evaluate, state, batch = _steps(model, dtype, ACCELERATORS[0], shape)
        train, evaluate = jax.jit(train), jax.jit(evaluate)
        for platform in ACCELERATORS:
            assert "stablehlo" in _export(train, state, batch, platform=platform)
            assert "stablehlo" in _export(evaluate, state, batch, platform=platform)
    assert cpu_kernels == []


def test_placement_takes_no_cpu_kernel_for_an_accelerator(cpu_kernels):
    """The CNN's train step for 'cuda' is the program with the kernels off, and calls none of
    them; placed for the CPU, the same step calls them and lowers to another program."""
    model = get_model("cnn", 10, conv_features=(4, 8), dense_width=16)
    shape = (2, 12, 12, 1)
    texts = {}
    for platform, impl in (("cuda", "auto"), ("cpu", "xla"), ("cpu", "auto")):
        train, _, state, batch = _steps(model, "float32", platform, shape, impl)
        cpu_kernels.clear()
        texts[platform, impl] = _export(train, state, batch, platform="cuda")
        assert bool(cpu_kernels) == (platform == "cpu" and impl == "auto"), cpu_kernels
    assert {"batch_minor", "max_pool"} <= set(cpu_kernels)  # the CPU's choice: the kernels
    assert texts["cuda", "auto"] == texts["cpu", "xla"]  # XLA's own operations only
    assert "stablehlo.convolution" in texts["cuda", "auto"]
    assert "stablehlo.convolution" not in texts["cpu", "auto"]


def _small_cnn(platform):
    model = get_model("cnn", 3, conv_features=(2, 3), dense_width=4, padding="same")
    placed, _ = placement(model, platform=platform, input_shape=(4, 8, 8, 1))
    params = jax.eval_shape(lambda: placed.init(jax.random.PRNGKey(0), jnp.zeros((4, 8, 8, 1)),
                                                train=False))
    return placed, params


@pytest.mark.parametrize("platform", ACCELERATORS)
def test_analysis_programs_export_for_the_accelerators(platform, cpu_kernels):
    from jax.flatten_util import ravel_pytree

    from dlassign.analysis import convexity, landscape, sharpness
    from dlassign.analysis.hessian import model_batch_loss, operators, spectrum
    from dlassign.models import DeepLinear

    model, variables = _small_cnn(platform)
    params = variables["params"]
    dim = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    batch = {"image": jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32),
             "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
    vec = jax.ShapeDtypeStruct((dim,), jnp.float32)
    basis = jax.ShapeDtypeStruct((3, dim), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    batch_loss = model_batch_loss(model, variables, "cross_entropy")
    texts = [
        _export(operators._batch_hvp, batch_loss, params, vec, batch, scalar, platform=platform),
        _export(spectrum._power_step, basis, vec, vec, platform=platform),  # power iteration
        _export(spectrum._lanczos_step, basis, jax.ShapeDtypeStruct((), jnp.int32), vec, vec,
                vec, scalar, platform=platform),  # Lanczos
        _export(landscape._chunk_sums, batch_loss, params, basis,
                jax.ShapeDtypeStruct((8, 3), jnp.float32), batch, platform=platform),
        _export(landscape._direction_program(), params, jax.random.PRNGKey(0),
                platform=platform),
    ]
    mlp = get_model("mlp", 3, hidden_sizes=(5,), activation="tanh")
    mlp_params = jax.eval_shape(lambda: mlp.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((4, 8, 8, 1))))["params"]
    mean_loss = sharpness.mean_loss_fn(mlp, "cross_entropy")
    texts += [_export(sharpness.gd_steps, mean_loss, mlp_params, batch, scalar, 3,
                      platform=platform),
              _export(sharpness.accuracy, mlp, mlp_params, batch, platform=platform)]
    linear = DeepLinear((3,))
    data = convexity.BinaryData(np.zeros((6, 4)), np.arange(6) % 2, "two classes")
    linear_params = linear.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))["params"]
    _, unravel = ravel_pytree(linear_params)
    f = lambda x: convexity.mean_loss(linear, "cross_entropy", data)(unravel(x))  # noqa: E731
    descent = convexity._descent(f, lambda x: jnp.zeros(()), 0.1, 4, 2)
    texts.append(_export(descent, jax.ShapeDtypeStruct((4 * 3 + 3,), jnp.float32),
                         platform=platform))
    assert all("stablehlo" in t or "func.func" in t for t in texts)
    assert cpu_kernels == []
