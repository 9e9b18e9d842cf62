"""Loss landscapes: filter normalisation, grid evaluation, and the curvature check along the top
Hessian eigenvector (exact on a quadratic, within 5% on a trained network)."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dlassign.analysis.hessian import model_batch_loss
from dlassign.analysis.landscape import (
    checkpoint_landscape,
    curvature_check,
    filter_normalized_direction,
    loss_along,
    slice_coords,
    top_eigenvectors,
)
from dlassign.errors import ConfigError
from tests.helpers import tiny_config


class _ConvBatchNormDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(5, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.Conv(4, (3, 3), use_bias=False)(nn.relu(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_filter_normalized_direction_matches_each_filter_and_zeroes_biases_and_batchnorm():
    params = _ConvBatchNormDense().init(jax.random.PRNGKey(0), jnp.ones((1, 6, 6, 2)))["params"]
    d = filter_normalized_direction(params, jax.random.PRNGKey(1))
    assert jax.tree.structure(d) == jax.tree.structure(params)
    kinds = {"kernel": 0, "zeroed": 0}
    for (path, w), v in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(d)):
        name = jax.tree_util.keystr(path)
        assert v.shape == w.shape and v.dtype == w.dtype
        if w.ndim < 2:  # biases, BatchNorm scales and offsets (['bn1']['scale'], ...)
            assert not np.any(v), name
            kinds["zeroed"] += 1
            continue
        kinds["kernel"] += 1
        axes = tuple(range(w.ndim - 1))  # filters along the last axis: [..., in, out]
        np.testing.assert_allclose(np.sqrt((np.asarray(v) ** 2).sum(axes)),
                                   np.sqrt((np.asarray(w) ** 2).sum(axes)), rtol=1e-5, err_msg=name)
        assert not np.allclose(v, w)  # a random direction, not the weights
    assert kinds == {"kernel": 3, "zeroed": 4}  # 2 conv and 1 dense kernels; 2 biases, BN's 2
    same = filter_normalized_direction(params, jax.random.PRNGKey(1))
    other = filter_normalized_direction(params, jax.random.PRNGKey(2))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(same)))
    assert not np.allclose(ravel_pytree(d)[0], ravel_pytree(other)[0])


def _quadratic_problem():
    """Mean over 6 'examples' of (x - c_i)^T A (x - c_i) / 2 on a pytree x (P = 16), in batches
    of 4 with the last one padded: a quadratic with Hessian A and known eigenpairs."""
    rng = np.random.default_rng(0)
    dim = 16
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigenvalues = np.linspace(0.1, 3.0, dim)
    a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4))),
                        "bias": jnp.asarray(rng.normal(size=(4,)))}}
    centres = rng.normal(size=(6, dim))

    def batch_loss(p, batch):
        r = ravel_pytree(p)[0][None, :] - batch["c"]
        per_example = 0.5 * jnp.einsum("bi,ij,bj->b", r, a, r)
        return jnp.where(batch["mask"], per_example, 0.0).sum(), batch["mask"].sum()

    padded = np.concatenate([centres, centres[:2]])
    batches = [{"c": jnp.asarray(padded[s:s + 4]), "mask": jnp.asarray(np.arange(s, s + 4) < 6)}
               for s in (0, 4)]

    def mean_loss(x):
        r = x[None, :] - centres
        return float(0.5 * np.einsum("bi,ij,bj->b", r, np.asarray(a), r).mean())

    return params, batch_loss, batches, a, eigenvalues, mean_loss


def test_loss_along_matches_direct_evaluation_with_masked_batches():
    with jax.enable_x64(True):
        params, batch_loss, batches, _, _, mean_loss = _quadratic_problem()
        directions = [filter_normalized_direction(params, k)
                      for k in jax.random.split(jax.random.PRNGKey(0), 2)]
        coords = np.random.default_rng(1).normal(size=(7, 2))  # 7 points, 3 per call: padded
        got = loss_along(batch_loss, params, directions, coords, batches, points_per_call=3)
        x0 = np.asarray(ravel_pytree(params)[0])
        basis = np.stack([np.asarray(ravel_pytree(d)[0]) for d in directions])
        np.testing.assert_allclose(got, [mean_loss(x0 + c @ basis) for c in coords], rtol=1e-12)


@pytest.mark.parametrize("dims", [1, 2])
def test_curvature_along_top_eigenvectors_is_exact_on_a_quadratic(dims):
    with jax.enable_x64(True):
        params, batch_loss, batches, a, eigenvalues, _ = _quadratic_problem()
        x0, unravel = ravel_pytree(params)
        values, vectors, residuals, converged = top_eigenvectors(
            lambda v: a @ v, unravel, x0.size, dims, x0.size, jax.random.PRNGKey(3), jnp.float64,
            tol=1e-9)
        np.testing.assert_allclose(values, eigenvalues[::-1][:dims], rtol=1e-10)
        assert np.all(residuals < 1e-9) and converged.all()
        curvature = curvature_check(batch_loss, params, vectors, values, batches,
                                    [0.5, 0.1, 1e-3], points_per_call=3)
        for c in curvature:  # a quadratic: exact at every step
            assert c["ratios"] == pytest.approx([1.0] * 3, abs=1e-8)
            assert c["ratio"] == c["ratios"][2]
        # The 2-D slice through the eigenvectors holds the same second differences.
        axis, coords = slice_coords(0.5, 3, dims)
        losses = loss_along(batch_loss, params, vectors, coords, batches).reshape((3,) * dims)
        line = losses if dims == 1 else losses[:, 1]
        assert (line[2] - 2 * line[1] + line[0]) / 0.5**2 == pytest.approx(values[0], rel=1e-10)


def test_slice_coords_holds_the_centre_and_rejects_bad_grids():
    axis, coords = slice_coords(2.0, 5, 2)
    np.testing.assert_allclose(axis, [-2, -1, 0, 1, 2])
    assert coords.shape == (25, 2) and tuple(coords[2 * 5 + 3]) == (0.0, 1.0)
    for bad in [(1.0, 4, 1), (1.0, 1, 1), (0.0, 5, 1), (1.0, 5, 3)]:
        with pytest.raises(ConfigError):
            slice_coords(*bad)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """An MLP trained for 3 epochs on the embedded digits (about 90% test accuracy)."""
    from dlassign.training.trainer import train_and_evaluate

    workdir = str(tmp_path_factory.mktemp("digits_mlp"))
    train_and_evaluate(tiny_config(), workdir)
    return workdir


@pytest.mark.slow
def test_top_eigenvector_slice_of_a_trained_network_has_the_eigenvalues_curvature(digits_run,
                                                                                  tmp_path):
    r = checkpoint_landscape(digits_run, "eigen", 1, num_points=21, sample_size=512,
                             batch_size=128, lanczos_order=20, out=str(tmp_path))
    (c,) = r["curvature"]
    # From the slice's own step (0.063) down to 1e-5 of it, in float64: within 5% of the
    # eigenvalue at every step, and 1 to 1e-3 at the shortest (no kink of a ReLU crossed).
    assert c["steps"][0] == pytest.approx(r["axis"][1] - r["axis"][0])
    assert c["steps"][-1] == pytest.approx(1e-5 * c["steps"][0])
    assert c["ratios"] == pytest.approx([1.0] * 6, abs=0.05)
    assert c["ratio"] == c["ratios"][-1] == pytest.approx(1.0, abs=1e-3)
    assert r["converged"] == [True] and r["residual"][0] <= r["tol"]  # a converged eigenvector
    assert r["eigenvalues"][0] > 0 and r["span"] == pytest.approx(np.sqrt(2 / c["eigenvalue"]))
    # The centre is the checkpoint's loss on the sample (a padded last batch weighs nothing).
    from dlassign.training.evaluation import restore_run

    run, state, _ = restore_run(digits_run)
    losses = np.asarray(r["losses"])
    assert losses.argmin() in (9, 10, 11)  # trained: near a minimum along the sharpest direction
    batch_loss = model_batch_loss(run.model, state.variables, run.config.loss,
                                  run.dataset.normalizer)
    from dlassign.data import stratified_subset

    train = run.dataset.train
    sample = train.take(stratified_subset(train.labels, 512 / len(train), 0))
    total, count = batch_loss(state.params, {"image": sample.images, "label": sample.labels})
    assert r["num_examples"] == len(sample) and len(sample) % 128
    assert r["center_loss"] == pytest.approx(float(total / count), rel=1e-5)
    with open(tmp_path / "landscape_eigen_1d.json") as f:
        assert json.load(f)["curvature"][0]["ratio"] == c["ratio"]
    assert os.path.getsize(tmp_path / "landscape_eigen_1d.png") > 0


@pytest.mark.slow
def test_random_two_dimensional_landscape_of_a_trained_network(digits_run, tmp_path):
    r = checkpoint_landscape(digits_run, "random", 2, num_points=5, sample_size=256,
                             batch_size=128, out=str(tmp_path))
    losses = np.asarray(r["losses"])
    assert losses.shape == (5, 5) and np.all(np.isfinite(losses))
    assert losses[2, 2] == r["center_loss"] and losses[2, 2] < losses[[0, -1], :].min()
    assert r["span"] == 1.0 and "curvature" not in r
    assert os.path.getsize(tmp_path / "landscape_random_2d.png") > 0
