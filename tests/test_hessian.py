"""The Hessian toolkit in float64 against exact Hessians of small models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlassign.analysis.hessian import (
    dataset_hvp,
    exact_hessian,
    flatten_loss,
    hutchinson_trace,
    hvp,
    lanczos,
    model_batch_loss,
    power_iteration,
    ritz,
    slq_density,
)
from dlassign.models import get_model, placement
from tests.helpers import synthetic_split, tiny_config


@pytest.fixture(scope="module")
def small_problem():
    """A tanh MLP (P = 8*3*... parameters) on synthetic data, its batches and its exact Hessian."""
    with jax.enable_x64(True):
        split = synthetic_split(50, num_classes=3, size=3)
        model = get_model("mlp", num_classes=3, hidden_sizes=(4,), activation="tanh")
        x = jnp.asarray(split.images, jnp.float64) / 255.0
        params = jax.tree.map(lambda a: a.astype(jnp.float64),
                              model.init(jax.random.PRNGKey(0), x)["params"])
        batch_loss = model_batch_loss(model, {}, "cross_entropy")
        # 50 examples in batches of 16: the last batch is padded and masked.
        batches = []
        for s in range(0, 50, 16):
            idx = np.arange(s, s + 16) % 50
            batches.append({"image": x[idx], "label": jnp.asarray(split.labels[idx]),
                            "mask": jnp.asarray(np.arange(s, s + 16) < 50)})
        full = {"image": x, "label": jnp.asarray(split.labels)}
        mean_loss = lambda p: batch_loss(p, full)[0] / 50
        f, x0, _ = flatten_loss(mean_loss, params)
        h = np.asarray(exact_hessian(f, x0))
        matvec, _, _ = dataset_hvp(batch_loss, params, batches)
        yield {"f": f, "x0": x0, "h": h, "matvec": matvec, "dim": x0.size}


def test_dataset_hvp_compiles_once_for_fresh_and_computed_vectors():
    """A Lanczos run feeds the matvec a fresh random vector and then products; placed params
    (a train state's) made those two programs until the matvec placed v like them."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dlassign.analysis.hessian.operators import _batch_hvp

    split = synthetic_split(8, num_classes=3, size=3)
    model = get_model("mlp", num_classes=3, hidden_sizes=(5,))
    x = jnp.asarray(split.images, jnp.float32) / 255.0
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    params = jax.device_put(model.init(jax.random.PRNGKey(0), x)["params"],
                            NamedSharding(mesh, PartitionSpec()))
    batch = jax.device_put({"image": x, "label": jnp.asarray(split.labels)},
                           NamedSharding(mesh, PartitionSpec("data")))
    batch_loss = model_batch_loss(model, {}, "cross_entropy")
    matvec, x0, _ = dataset_hvp(batch_loss, params, [batch], count=8)
    before = _batch_hvp._cache_size()
    fresh = jax.random.normal(jax.random.PRNGKey(1), x0.shape)  # uncommitted
    computed = matvec(fresh)  # committed
    matvec(computed)
    matvec(computed / jnp.linalg.norm(computed))
    assert _batch_hvp._cache_size() == before + 1


@pytest.mark.slow
def test_hessian_is_symmetric_and_hvp_matches(small_problem):
    p = small_problem
    with jax.enable_x64(True):
        np.testing.assert_allclose(p["h"], p["h"].T, atol=1e-12)
        v = jax.random.normal(jax.random.PRNGKey(1), (p["dim"],), jnp.float64)
        np.testing.assert_allclose(hvp(p["f"], p["x0"], v), p["h"] @ np.asarray(v), rtol=1e-10,
                                   atol=1e-12)
        # The dataset HVP over padded, masked batches equals the full-data Hessian times v.
        np.testing.assert_allclose(p["matvec"](v), p["h"] @ np.asarray(v), rtol=1e-10,
                                   atol=1e-12)


def test_lanczos_to_full_order_recovers_every_eigenvalue(small_problem):
    p = small_problem
    with jax.enable_x64(True):
        t, basis = lanczos(p["matvec"], p["dim"], p["dim"], jax.random.PRNGKey(2), jnp.float64)
        exact = np.linalg.eigvalsh(p["h"])
        np.testing.assert_allclose(np.linalg.eigvalsh(t), exact, atol=1e-10 * np.abs(exact).max())
        np.testing.assert_allclose(basis @ basis.T, np.eye(p["dim"]), atol=1e-10)


def test_lanczos_extremes_converge_before_full_order(small_problem):
    p = small_problem
    with jax.enable_x64(True):
        t, _ = lanczos(p["matvec"], p["dim"], 20, jax.random.PRNGKey(3), jnp.float64)
        values, weights = ritz(t)
        exact = np.linalg.eigvalsh(p["h"])
        assert values[-1] == pytest.approx(exact[-1], rel=1e-6)
        assert weights.sum() == pytest.approx(1.0)


def test_lanczos_takes_a_matvec_that_returns_numpy(small_problem):
    p = small_problem
    with jax.enable_x64(True):
        on_host, _ = lanczos(lambda v: p["h"] @ np.asarray(v), p["dim"], 20,
                             jax.random.PRNGKey(3), jnp.float64)
        on_device, _ = lanczos(p["matvec"], p["dim"], 20, jax.random.PRNGKey(3), jnp.float64)
        np.testing.assert_allclose(on_host, on_device, rtol=1e-8, atol=1e-10)


def test_power_iteration_top_k(small_problem):
    p = small_problem
    with jax.enable_x64(True):
        # float64 from the matvec itself: no dtype= to repeat
        pairs = power_iteration(p["matvec"], p["dim"], 3, jax.random.PRNGKey(4),
                                max_iters=2000, tol=1e-10)
        exact = np.linalg.eigvalsh(p["h"])
        top = exact[np.argsort(-np.abs(exact))][:3]
        np.testing.assert_allclose(pairs.values, top, rtol=1e-9)
        assert pairs.all_converged and pairs.vectors.dtype == np.float64
        for value, vec, residual in zip(pairs.values, pairs.vectors, pairs.residuals):
            measured = np.linalg.norm(p["h"] @ vec - value * vec) / abs(value)
            assert measured <= residual + 1e-14  # the reported residual is the real one
            assert residual <= 1e-10


def test_hutchinson_trace_within_three_standard_errors(small_problem):
    p = small_problem
    with jax.enable_x64(True):
        mean, se = hutchinson_trace(p["matvec"], p["dim"], 200, jax.random.PRNGKey(5),
                                    jnp.float64)
        exact = np.trace(p["h"])
        assert abs(mean - exact) <= 3 * se
        assert se < abs(exact)  # the estimate is informative, not just wide


def test_slq_density_integrates_to_one_and_covers_the_spectrum(small_problem):
    p = small_problem
    with jax.enable_x64(True):
        d = slq_density(p["matvec"], p["dim"], p["dim"], 3, jax.random.PRNGKey(6),
                        dtype=jnp.float64)
        exact = np.linalg.eigvalsh(p["h"])
        assert np.trapezoid(d.density, d.grid) == pytest.approx(1.0, abs=1e-2)
        assert d.grid[0] <= exact[0] and d.grid[-1] >= exact[-1]
        # At full order each draw's weights put mass exactly on H's eigenvalues.
        np.testing.assert_allclose(np.sort(d.ritz_values[0]), exact, atol=1e-9)


def _mass_and_first_moment(d):
    """The density's integral, its first moment, and the quadrature's own first moment (the mean
    over draws of sum_i w_i theta_i, which the kernel smoothing must keep)."""
    mass = np.trapezoid(d.density, d.grid)
    first = np.trapezoid(d.grid * d.density, d.grid)
    quadrature = np.asarray([np.sum(v * w) for v, w in zip(d.ritz_values, d.weights)])
    return mass, first, quadrature


def test_slq_density_keeps_the_mass_bunched_at_an_edge_of_the_spectrum():
    """900 zero eigenvalues and 100 in [0.1, 1]: the zeros sit on the spectrum's lower edge,
    where a grid ending one kernel width past them lost 14% of the mass (0.857)."""
    eigenvalues = np.concatenate([np.zeros(900), np.linspace(0.1, 1.0, 100)])
    with jax.enable_x64(True):
        diagonal = jnp.asarray(eigenvalues)
        d = slq_density(lambda v: diagonal * v, 1000, 30, 3, jax.random.PRNGKey(0),
                        dtype=jnp.float64)
    mass, first, quadrature = _mass_and_first_moment(d)
    assert mass == pytest.approx(1.0, abs=1e-9)
    assert first == pytest.approx(quadrature.mean(), rel=1e-6)  # the kernels keep their tails
    # The zeros' peak: 90% of the mass within a few kernel widths of 0, none of it cut off.
    sigma = 0.01 * (max(v.max() for v in d.ritz_values) - min(v.min() for v in d.ritz_values))
    near_zero = np.abs(d.grid) <= 5 * sigma
    assert np.trapezoid(d.density[near_zero], d.grid[near_zero]) == pytest.approx(0.9, abs=0.01)
    assert d.grid[0] <= min(v.min() for v in d.ritz_values) - 5 * sigma
    assert d.grid[-1] >= max(v.max() for v in d.ritz_values) + 5 * sigma


@pytest.fixture(scope="module")
def trained_mlp_hessian(tmp_path_factory):
    """The exact float64 Hessian of an MLP (P = 2410) trained close to interpolation on a
    quarter of the embedded digits (337 images, 40 epochs), over those images: about a third of
    its eigenvalues are zero and the most negative is -0.7% of the largest, so the zeros are
    bunched at the spectrum's lower edge."""
    from dlassign.training.evaluation import restore_run
    from dlassign.training.trainer import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("digits_mlp_40_epochs"))
    train_and_evaluate(tiny_config({"num_epochs": 40, "data.subset_fraction": 0.25}), workdir)
    run, state, _ = restore_run(workdir)
    train = run.dataset.train
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state.params)
        batch_loss = model_batch_loss(run.model, state.variables, run.config.loss,
                                      run.dataset.normalizer)
        batch = {"image": jnp.asarray(train.images), "label": jnp.asarray(train.labels)}
        f, x0, _ = flatten_loss(lambda p: batch_loss(p, batch)[0] / len(train), params)
        return np.asarray(jax.jit(exact_hessian, static_argnums=0)(f, x0))


@pytest.mark.slow
def test_slq_first_moment_times_dim_is_the_trace_of_a_trained_mlps_hessian(trained_mlp_hessian):
    """Before the grid reached past the kernel's tail: mass 0.85 and dim x first moment 30.3
    against an exact trace of 14.3."""
    h = trained_mlp_hessian
    dim = h.shape[0]
    exact = np.linalg.eigvalsh(h)
    assert exact.min() > -0.01 * exact.max() and np.mean(np.abs(exact) < 1e-8) > 0.3
    with jax.enable_x64(True):
        hj = jnp.asarray(h)
        # Each draw's first moment is v^T H v / |v|^2 for a Gaussian v, a trace estimate with a
        # relative spread of about 45% on this spectrum: 300 draws make it about 3%.
        d = slq_density(lambda v: hj @ v, dim, 8, 300, jax.random.PRNGKey(0), dtype=jnp.float64)
    mass, first, quadrature = _mass_and_first_moment(d)
    assert mass == pytest.approx(1.0, abs=1e-9)
    assert first == pytest.approx(quadrature.mean(), rel=1e-6)  # the kernels keep their tails
    standard_error = dim * quadrature.std(ddof=1) / np.sqrt(quadrature.size)
    assert abs(dim * first - exact.sum()) <= min(0.05 * exact.sum(), 3 * standard_error)


@pytest.mark.parametrize("name,shape,kwargs", [
    ("cnn", (2, 12, 12, 1), {"conv_features": (2, 3), "dense_width": 4, "padding": "same"}),
    ("lenet5", (2, 32, 32, 3), {}),
    ("resnet18", (2, 16, 16, 3), {"stage_sizes": (1, 1, 1, 1)}),
])
@pytest.mark.slow
def test_forward_over_reverse_hvp_through_every_layer(name, shape, kwargs):
    """HVPs run through the CPU fast paths (pooling, im2col, BatchNorm) and agree with
    reverse-over-reverse."""
    with jax.enable_x64(True):
        model, _ = placement(get_model(name, num_classes=3, **kwargs), platform="cpu",
                             input_shape=shape)
        x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64)
        y = jnp.arange(shape[0]) % 3
        variables = jax.tree.map(lambda a: a.astype(jnp.float64), jax.jit(model.init)(
            jax.random.PRNGKey(1), x.astype(jnp.float32)))
        batch_loss = model_batch_loss(model, variables, "cross_entropy")
        f, x0, _ = flatten_loss(lambda p: batch_loss(p, {"image": x, "label": y})[0],
                                variables["params"])
        v = jax.random.normal(jax.random.PRNGKey(2), x0.shape, jnp.float64)
        # jitted: one compilation each, where eager mode compiles every operation
        reverse_over_reverse = jax.jit(jax.grad(lambda p: jnp.vdot(jax.grad(f)(p), v)))(x0)
        np.testing.assert_allclose(jax.jit(lambda p: hvp(f, p, v))(x0), reverse_over_reverse,
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_model_losses_run_nhwc_for_hessian_vector_products():
    """A batch-minor model's HVP took longer (ResNet-18: 550 against 434 ms), so the Hessian's
    loss runs it NHWC; the values are the same."""
    from dlassign.analysis.hessian import model_batch_loss

    model, _ = placement(get_model("cnn", 10, conv_features=(4, 8), dense_width=16),
                         platform="cpu", input_shape=(2, 28, 28, 1))
    assert model.layout.batch_minor
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 28, 28, 1))
    variables = model.init(jax.random.PRNGKey(1), x)
    batch = {"image": x, "label": jnp.array([1, 2])}
    loss = model_batch_loss(model, variables, "cross_entropy")
    assert "f32[1,28,28,2]" not in str(jax.make_jaxpr(loss)(variables["params"], batch))
    direct = _cross_entropy_sum(model.apply(variables, x), batch["label"])
    np.testing.assert_allclose(loss(variables["params"], batch)[0], direct, rtol=1e-5)


def _cross_entropy_sum(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).sum()
