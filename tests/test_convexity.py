"""Convexity facts in float64: closed forms, a constructed negative-curvature point, the saddle."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import convexity as convexity_config
from dlassign.analysis.convexity import (
    BinaryData,
    flip_first_two_layers,
    mean_loss,
    mse_second_derivative,
    run_study,
)
from dlassign.analysis.hessian import exact_hessian, flatten_loss
from dlassign.models import DeepLinear, LogisticRegression


def blobs(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float64)
    x = rng.normal(size=(n, d)) + np.where(y[:, None] == 1, 1.0, -1.0)
    return BinaryData(x, y, "blobs")


def logistic(data, loss):
    model = LogisticRegression()
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.PRNGKey(0), jnp.asarray(data.x[:1]))["params"])
    f, x0, unravel = flatten_loss(mean_loss(model, loss, data), params)
    z = lambda v: model.apply({"params": unravel(v)}, jnp.asarray(data.x))
    return f, x0, z


@pytest.mark.slow
def test_closed_form_logistic_hessians_match_autodiff():
    with jax.enable_x64(True):
        data = blobs()
        for loss in ("cross_entropy", "mse"):
            f, x0, z = logistic(data, loss)
            theta = jax.random.normal(jax.random.PRNGKey(1), x0.shape, jnp.float64) * 2
            jac = np.asarray(jax.jacobian(z)(theta))
            p = jax.nn.sigmoid(z(theta))
            d = p * (1 - p) if loss == "cross_entropy" else mse_second_derivative(p, data.y)
            closed = jac.T @ (jac * np.asarray(d)[:, None]) / data.y.size
            np.testing.assert_allclose(exact_hessian(f, theta), closed, atol=1e-14)


def test_mse_second_derivative_closed_form():
    with jax.enable_x64(True):
        z = jnp.linspace(-6, 6, 121)
        g = jax.vmap(jax.grad(jax.grad(lambda z: (jax.nn.sigmoid(z) - 1.0) ** 2)))(z)
        p = np.asarray(jax.nn.sigmoid(z))
        np.testing.assert_allclose(g, 2 * p * (1 - p) ** 2 * (3 * p - 1), atol=1e-15)
        assert np.all(np.asarray(g)[p < 1 / 3 - 1e-9] < 0)
        assert np.all(np.asarray(g)[p > 1 / 3 + 1e-9] > 0)


def test_constructed_point_mse_negative_ce_not():
    with jax.enable_x64(True):
        data = blobs()
        f_ce, x0, z = logistic(data, "cross_entropy")
        f_mse, _, _ = logistic(data, "mse")
        # Confidently wrong on every example: theta = -c * (the class-mean direction).
        jac = np.asarray(jax.jacobian(z)(x0))
        direction = jac.T @ (data.y - 0.5)
        theta = jnp.asarray(-3.0 * direction / np.linalg.norm(direction))
        p = np.asarray(jax.nn.sigmoid(z(theta)))
        assert np.mean(np.where(data.y == 1, p < 1 / 3, p > 2 / 3)) > 0.8
        ce = np.linalg.eigvalsh(exact_hessian(f_ce, theta))
        mse = np.linalg.eigvalsh(exact_hessian(f_mse, theta))
        assert ce[0] >= -1e-12 * ce[-1]
        assert mse[0] < -1e-3


def deep_linear(data, depth, loss, width=3):
    model = DeepLinear(hidden_sizes=(width,) * depth)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.PRNGKey(0), jnp.asarray(data.x[:1]))["params"])
    raw = mean_loss(model, loss, data)
    f, x0, unravel = flatten_loss(raw, params)
    return raw, f, x0, unravel


@pytest.mark.slow
@pytest.mark.parametrize("loss,slope", [("cross_entropy", 1.0), ("mse", 0.5)])
def test_one_hidden_layer_origin_is_a_strict_saddle(loss, slope):
    with jax.enable_x64(True):
        data = blobs()
        _, f, x0, _ = deep_linear(data, 1, loss)
        h = np.asarray(exact_hessian(f, jnp.zeros_like(x0)))
        values = np.linalg.eigvalsh(h)
        g = np.linalg.norm((slope * (0.5 - data.y)[:, None] * data.x).mean(0))
        assert values[0] == pytest.approx(-g, rel=1e-12)
        assert values[-1] == pytest.approx(g, rel=1e-12)
        np.testing.assert_allclose(jax.grad(f)(jnp.zeros_like(x0)), 0.0, atol=1e-15)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [2, 3])
def test_deeper_origin_is_a_degenerate_saddle(depth):
    with jax.enable_x64(True):
        data = blobs()
        raw, f, x0, unravel = deep_linear(data, depth, "cross_entropy")
        h = np.asarray(exact_hessian(f, jnp.zeros_like(x0)))
        assert np.abs(h).max() == 0.0
        # Descent along one direction and ascent along another: a saddle, not an extremum.
        params = unravel(x0)
        last = f"layer{depth}"
        z = raw(unravel(jnp.zeros_like(x0)))
        along = lambda p, t: raw(jax.tree.map(lambda a: t * a, p))
        flipped = dict(params)
        flipped[last] = jax.tree.map(lambda a: -a, params[last])
        changes = [along(params, 0.3) - z, along(flipped, 0.3) - z]
        assert min(changes) < 0 < max(changes)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_midpoint_certificate(depth, loss):
    with jax.enable_x64(True):
        data = blobs()
        raw, f, x0, unravel = deep_linear(data, depth, loss)
        step = jax.jit(lambda t: t - 0.5 * jax.grad(f)(t))
        theta = x0
        for _ in range(300):  # a few GD steps to get below the zero predictor's loss
            theta = step(theta)
        a = unravel(theta)
        b = flip_first_two_layers(a)
        mid = jax.tree.map(lambda u, v: (u + v) / 2, a, b)
        assert float(raw(a)) == pytest.approx(float(raw(b)), rel=1e-12)
        zero_loss = np.log(2) if loss == "cross_entropy" else 0.25
        assert float(raw(mid)) == pytest.approx(zero_loss, rel=1e-12)
        assert float(raw(mid)) > (float(raw(a)) + float(raw(b))) / 2


@pytest.mark.slow
def test_study_derives_the_answers_on_synthetic_data():
    cfg = convexity_config.get_config()
    cfg.data.name = "synthetic"
    cfg.data.synthetic_examples = 60
    cfg.data.synthetic_dim = 4
    cfg.logistic.reference_steps = 300
    cfg.logistic.points_per_scale = 3
    cfg.logistic.train_steps = 200
    cfg.logistic.snapshot_every = 100
    cfg.logistic.train_seeds = 1
    cfg.logistic.slice_points = 41
    cfg.deep_linear.train_steps = 200
    cfg.deep_linear.snapshot_every = 100
    cfg.deep_linear.points_per_scale = 1
    results = run_study(ml_collections.ConfigDict(cfg))
    assert results["answers"] == {"q1": "cross_entropy", "q2": "d"}
    lr = results["logistic_regression"]
    assert lr["cross_entropy"]["num_negative"] == 0 and lr["mse"]["num_negative"] > 0
    assert lr["mse"]["min_eigenvalue"] < 0
    for row in results["deep_linear"]:
        lo, hi = row["origin_eigenvalues"]
        if row["hidden_layers"] == 1:
            assert lo < 0 < hi
            np.testing.assert_allclose([lo, hi], row["origin_closed_form"], rtol=1e-10)
        else:
            assert lo == hi == 0.0
        m = row["midpoint"]
        assert m["loss_mid"] > (m["loss_a"] + m["loss_b"]) / 2


def test_diverging_gradient_descent_names_the_learning_rate():
    from dlassign.analysis.convexity import gradient_descent
    from dlassign.errors import NumericalError

    with jax.enable_x64(True):
        f = lambda x: jnp.sum(x**4)
        with pytest.raises(NumericalError, match=r"diverged at step \d+ with deep_linear.lr=10"):
            gradient_descent(f, jnp.ones(3), 10.0, 50, 10, lambda x: 0.0, "deep_linear.lr")
