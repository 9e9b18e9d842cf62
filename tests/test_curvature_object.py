"""`hessian.Curvature` on a model written here, as a user would: a small Flax CNN with its own
label-smoothed loss, in float64, against the exact Hessian (`jax.hessian` of the flattened
parameters), the dense J^T H_out J, and the exact trace; bad inputs are one clear error; and
eigenvalues 10% apart converge (and say so) from a cold start."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh

from dlassign.analysis.hessian import Curvature, model_batch_loss, power_iteration
from dlassign.analysis.hessian.spectrum import lanczos_eigenpairs


class TinyCNN(nn.Module):
    """No `train` argument, no dict batches: a module as anyone writes it."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(2, (3, 3), param_dtype=jnp.float64, dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64, dtype=jnp.float64)(x.reshape(len(x), -1))


def smoothed_cross_entropy(logits, labels):
    """Per-example cross-entropy against labels smoothed by 0.1: float[B]."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                  0.1)
    return optax.softmax_cross_entropy(logits, targets)


@pytest.fixture(scope="module")
def problem():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        images = rng.normal(size=(40, 4, 4, 1))
        labels = rng.integers(0, 3, 40)
        model = TinyCNN()
        params = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]))["params"]

        def loss_fn(params, batch):  # a plain mean
            images, labels = batch
            return smoothed_cross_entropy(model.apply({"params": params}, images), labels).mean()

        # unequal batches: the mean over all 40 examples weighs each batch by its rows
        batches = [(images[:24], labels[:24]), (images[24:], labels[24:])]
        x0, unravel = ravel_pytree(params)
        exact = np.asarray(jax.hessian(lambda x: loss_fn(unravel(x), (images, labels)))(x0))
        yield {"model": model, "params": params, "loss_fn": loss_fn, "batches": batches,
               "images": images, "labels": labels, "exact": exact, "x0": x0, "unravel": unravel}


def test_top_eigenvalues_are_those_of_the_exact_hessian_with_pytree_vectors(problem):
    with jax.enable_x64(True):
        curvature = Curvature(problem["loss_fn"], problem["params"], problem["batches"])
        assert curvature.dtype == jnp.float64 and curvature.num_examples == 40
        top = curvature.eigenvalues(top_k=3, tol=1e-9)
        exact = np.linalg.eigvalsh(problem["exact"])[::-1][:3]
        np.testing.assert_allclose(top.values, exact, rtol=0, atol=1e-8)
        assert top.all_converged and np.all(top.residuals <= 1e-9)
        for value, vector in zip(top.values, top.vectors):
            assert jax.tree.structure(vector) == jax.tree.structure(problem["params"])
            flat, _ = ravel_pytree(vector)
            np.testing.assert_allclose(problem["exact"] @ flat, value * flat, atol=1e-8)
        v = jax.tree.map(jnp.ones_like, problem["params"])
        np.testing.assert_allclose(ravel_pytree(curvature.hvp(v))[0],
                                   problem["exact"] @ np.ones(curvature.dim), atol=1e-12)


def test_trace_is_within_its_stated_error_of_the_exact_trace(problem):
    with jax.enable_x64(True):
        curvature = Curvature(problem["loss_fn"], problem["params"], problem["batches"])
        trace = curvature.trace(rel_tol=0.02, max_samples=2000)
        exact = np.trace(problem["exact"])
        assert trace.converged and trace.standard_error <= 0.02 * abs(trace.value)
        assert abs(trace.value - exact) <= 3 * trace.standard_error
        assert trace.samples < 2000


def test_sum_count_loss_mesh_and_density_agree_with_the_mean_loss(problem):
    with jax.enable_x64(True):
        model, images, labels = problem["model"], problem["images"], problem["labels"]

        def sum_count(params, batch):
            per_example = smoothed_cross_entropy(model.apply({"params": params}, batch["x"]),
                                                 batch["y"])
            return per_example.sum(), per_example.shape[0]

        batches = [{"x": images[:32], "y": labels[:32]}, {"x": images[32:], "y": labels[32:]}]
        mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
        curvature = Curvature(sum_count, problem["params"], batches, mesh=mesh)
        v = jax.random.normal(jax.random.PRNGKey(1), (curvature.dim,), jnp.float64)
        np.testing.assert_allclose(curvature.hvp(v), problem["exact"] @ np.asarray(v),
                                   atol=1e-12)
        density = curvature.density(order=curvature.dim, num_draws=1)
        exact = np.linalg.eigvalsh(problem["exact"])
        np.testing.assert_allclose(np.sort(density.ritz_values[0]), exact,
                                   atol=1e-9 * np.abs(exact).max())
        # the Flax module's own loss: any module, any per-example loss
        batch_loss = model_batch_loss(model, {}, smoothed_cross_entropy)
        pairs = [(images[:24], labels[:24]), (images[24:], labels[24:])]
        other = Curvature(batch_loss, problem["params"], pairs)
        np.testing.assert_allclose(other.hvp(v), problem["exact"] @ np.asarray(v), atol=1e-12)


def test_gauss_newton_is_j_transpose_h_out_j_and_h_minus_g_is_the_residual(problem):
    with jax.enable_x64(True):
        model, images, labels = problem["model"], problem["images"], problem["labels"]

        def output_fn(params, batch):
            return model.apply({"params": params}, batch[0])

        def output_loss(logits, batch):
            return smoothed_cross_entropy(logits, batch[1]).mean()

        curvature = Curvature.from_outputs(output_fn, output_loss, problem["params"],
                                           problem["batches"])
        x0, unravel = problem["x0"], problem["unravel"]
        outputs = lambda x: output_fn(unravel(x), (images, labels))  # noqa: E731
        jac = np.asarray(jax.jacfwd(outputs)(x0)).reshape(-1, x0.size)  # [B*K, P]
        logits = outputs(x0)
        h_out = np.asarray(jax.hessian(
            lambda z: output_loss(z.reshape(logits.shape), (images, labels)))(logits.ravel()))
        gauss_newton = jac.T @ h_out @ jac
        hessian, g, r = (curvature.dense(), curvature.gauss_newton().dense(),
                         curvature.residual().dense())
        np.testing.assert_allclose(hessian, problem["exact"], atol=1e-12)
        np.testing.assert_allclose(g, gauss_newton, atol=1e-12)
        assert np.abs(hessian - g - r).max() <= 1e-10
        assert np.abs(r).max() > 1e-3  # a network's Hessian is not its Gauss-Newton matrix
        top = curvature.gauss_newton().eigenvalues(2, tol=1e-9)
        np.testing.assert_allclose(top.values, np.linalg.eigvalsh(gauss_newton)[::-1][:2],
                                   atol=1e-8)


def test_bad_inputs_are_one_clear_error(problem):
    with jax.enable_x64(True):
        params, batches = problem["params"], problem["batches"]
        model = problem["model"]

        def per_example(params, batch):  # neither a mean nor (sum, count)
            return smoothed_cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

        with pytest.raises(ValueError, match=r"loss returned float64\[24\].*scalar mean"):
            Curvature(per_example, params, batches)
        with pytest.raises(ValueError, match="batch 1 is .*same structure"):
            Curvature(problem["loss_fn"], params, [batches[0], {"x": batches[1][0]}])
        complex_params = jax.tree.map(lambda x: x.astype(jnp.complex128), params)
        with pytest.raises(TypeError, match="complex128.*real floating-point"):
            Curvature(problem["loss_fn"], complex_params, batches)
        with pytest.raises(ValueError, match="needs the loss split into outputs"):
            Curvature(problem["loss_fn"], params, batches).gauss_newton()
        with pytest.raises(ValueError, match="top_k=0 is invalid"):
            Curvature(problem["loss_fn"], params, batches).eigenvalues(0)
        with pytest.raises(ValueError,
                           match="max_order=2 is invalid; expected an integer >= top_k=3"):
            Curvature(problem["loss_fn"], params, batches).eigenvalues(3, max_order=2)


def gapped_regression(gap: float = 0.1, dim: int = 60):
    """Least squares through a bias-free Dense layer, X chosen so that the Hessian X^T X / n has
    top eigenvalues 10 and 10 (1 - gap), the rest in [0.1, 5]."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eig = np.concatenate([[10.0, 10.0 * (1 - gap)], rng.uniform(0.1, 5.0, dim - 2)])
    n = dim
    u, _ = np.linalg.qr(rng.normal(size=(n, dim)))
    x = u @ np.diag(np.sqrt(eig * n)) @ q.T  # X^T X / n = Q diag(eig) Q^T
    y = rng.normal(size=(n, 1))
    model = nn.Dense(1, use_bias=False, param_dtype=jnp.float64)
    params = model.init(jax.random.PRNGKey(0), x[:1])["params"]

    def loss_fn(params, batch):
        return 0.5 * jnp.mean((model.apply({"params": params}, batch[0]) - batch[1]) ** 2)

    return loss_fn, params, (x, y), np.sort(eig)[::-1]


def test_a_top_pair_ten_percent_apart_converges_from_a_cold_start():
    """The sharpness study's budget (30 products) and a 1e-6 residual bound: the cold start
    (Lanczos) converges where plain power iteration, whose error falls like 0.9^t, would need
    about 130 products; both pairs are within 1e-8 of eigvalsh and carry their residuals."""
    with jax.enable_x64(True):
        loss_fn, params, batch, eig = gapped_regression()
        x0, unravel = ravel_pytree(params)
        exact = np.linalg.eigvalsh(np.asarray(jax.hessian(
            lambda x: loss_fn(unravel(x), batch))(x0)))[::-1]
        np.testing.assert_allclose(exact[:2], eig[:2], rtol=1e-10)
        curvature = Curvature(loss_fn, params, batch)
        pairs = power_iteration(curvature.matvec, curvature.dim, 2, jax.random.PRNGKey(0),
                                max_iters=30, tol=1e-6)
        assert pairs.all_converged and np.all(pairs.residuals <= 1e-6)
        np.testing.assert_allclose(pairs.values, exact[:2], rtol=0, atol=1e-8)
        assert pairs.products <= 2 * 30
        top = curvature.eigenvalues(2, tol=1e-6, max_order=30)
        assert top.all_converged
        np.testing.assert_allclose(top.values, exact[:2], rtol=0, atol=1e-8)
        # too small a budget is reported, not hidden
        short = lanczos_eigenpairs(curvature.matvec, curvature.dim, 1, jax.random.PRNGKey(0),
                                   tol=1e-6, max_order=4)
        assert not short.all_converged and short.residuals[0] > 1e-6
        starved = power_iteration(curvature.matvec, curvature.dim, 1, jax.random.PRNGKey(0),
                                  max_iters=3, tol=1e-6)
        assert not starved.converged[0] and starved.residuals[0] > 1e-6


def test_dataset_hvp_and_model_batch_loss_take_any_loss_and_module(problem):
    """The old entry points: `dataset_hvp` on a plain mean loss (it used to need (sum, count)),
    and `model_batch_loss` on a module without `train`, with dict batches and a mask, and a
    loss function of its own; both give the exact Hessian's products."""
    from dlassign.analysis.hessian import dataset_hvp

    with jax.enable_x64(True):
        v = jax.random.normal(jax.random.PRNGKey(2), (problem["x0"].size,), jnp.float64)
        want = problem["exact"] @ np.asarray(v)
        matvec, _, _ = dataset_hvp(problem["loss_fn"], problem["params"], problem["batches"])
        assert matvec.dtype == jnp.float64
        np.testing.assert_allclose(matvec(v), want, atol=1e-12)
        images, labels = problem["images"], problem["labels"]
        # 40 examples in batches of 16: the last one padded with 8 masked rows
        idx = np.arange(48) % 40
        batches = [{"x": images[idx[s:s + 16]], "y": labels[idx[s:s + 16]],
                    "mask": np.arange(s, s + 16) < 40} for s in (0, 16, 32)]
        batch_loss = model_batch_loss(problem["model"], {}, smoothed_cross_entropy,
                                      inputs="x", targets="y")
        matvec, _, _ = dataset_hvp(batch_loss, problem["params"], batches)
        np.testing.assert_allclose(matvec(v), want, atol=1e-12)
        with pytest.raises(ValueError, match="a batch must be a dict with keys 'image'"):
            model_batch_loss(problem["model"], {}, "cross_entropy")(problem["params"],
                                                                    {"x": images})


def test_a_warm_start_off_the_eigenvector_is_refined_within_the_budget():
    """A start 30% off the top eigenvector, toward the second (10% below it): power steps
    alone would need about 130 products; the refinement by Lanczos from the start converges
    within 10, and the vector reported is the one whose residual is reported."""
    with jax.enable_x64(True):
        loss_fn, params, batch, _ = gapped_regression()
        curvature = Curvature(loss_fn, params, batch)
        h = curvature.dense()
        values, vectors = np.linalg.eigh(h)
        start = vectors[:, -1] + 0.3 * vectors[:, -2]
        pairs = power_iteration(curvature.matvec, curvature.dim, 1, jax.random.PRNGKey(0),
                                max_iters=10, tol=1e-6, start=start)
        assert pairs.all_converged and pairs.products <= 10
        assert abs(pairs.values[0] - values[-1]) <= 1e-8
        v = pairs.vectors[0]
        assert np.linalg.norm(h @ v - pairs.values[0] * v) / pairs.values[0] == pytest.approx(
            pairs.residuals[0], rel=1e-3, abs=1e-12)
