"""The Gauss-Newton study (`analysis.gauss_newton`) against exact matrices, in float64 on small
generated problems: H, G and R of the three losses against `jax.hessian` and the dense
J^T H_out J; logistic regression's closed form, where H = G and R = 0; the Lanczos run's extreme
pairs against `eigvalsh`; the class-mean Gram matrix against its dense construction, below G
one by one, and equal to G where each class's examples coincide; the main job's section on a
trained checkpoint."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from dlassign.analysis import gauss_newton as gn
from dlassign.analysis.hessian import Curvature
from dlassign.errors import ConfigError

LOSSES = ("cross_entropy", "mse", "square")
C = 3  # classes


def mlp_apply(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def mlp_problem(seed=0, n=24, d=4, hidden=5, duplicate=False):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % C
    x = rng.normal(size=(n, d))
    if duplicate:  # every example of a class is the same image
        x = x[labels]
    params = {"w1": rng.normal(size=(d, hidden)), "b1": rng.normal(size=hidden) * 0.1,
              "w2": rng.normal(size=(hidden, C)), "b2": rng.normal(size=C) * 0.1}
    return jax.tree.map(jnp.asarray, params), jnp.asarray(x), labels


def curvature_of(apply_fn, params, x, labels, loss):
    per_example = gn.per_example_loss(loss)
    return Curvature.from_outputs(lambda p, b: apply_fn(p, b["x"]),
                                  lambda z, b: per_example(z, b["y"]).mean(), params,
                                  {"x": x, "y": jnp.asarray(labels)})


def dense_gauss_newton(apply_fn, params, x, labels, loss):
    """J^T H_out J from the full Jacobian of the logits and the exact Hessian in the logits."""
    x0, unravel = ravel_pytree(params)
    logits = apply_fn(params, x)
    jac = np.asarray(jax.jacfwd(lambda v: apply_fn(unravel(v), x))(x0)).reshape(-1, x0.size)
    per_example = gn.per_example_loss(loss)
    h_out = np.asarray(jax.hessian(lambda z: per_example(z.reshape(logits.shape),
                                                         jnp.asarray(labels)).mean())(
        logits.ravel()))
    return jac.T @ h_out @ jac


@pytest.mark.parametrize("loss", LOSSES)
def test_h_g_r_of_each_loss_are_the_exact_matrices(loss):
    with jax.enable_x64(True):
        params, x, labels = mlp_problem()
        curvature = curvature_of(mlp_apply, params, x, labels, loss)
        x0, unravel = ravel_pytree(params)
        per_example = gn.per_example_loss(loss)
        exact = np.asarray(jax.hessian(
            lambda v: per_example(mlp_apply(unravel(v), x), jnp.asarray(labels)).mean())(x0))
        h, g, r = (curvature.dense(), curvature.gauss_newton().dense(),
                   curvature.residual().dense())
        np.testing.assert_allclose(h, exact, atol=1e-10)
        np.testing.assert_allclose(g, dense_gauss_newton(mlp_apply, params, x, labels, loss),
                                   atol=1e-10)
        assert np.abs(h - g - r).max() <= 1e-10
        lowest = np.linalg.eigvalsh(g).min()
        if loss == "mse":  # not convex in the logits: G itself has negative curvature here
            assert lowest < -1e-4
        else:  # convex in the logits: G is positive semi-definite
            assert lowest >= -1e-10


@pytest.mark.parametrize("loss", ["cross_entropy", "square"])
def test_logistic_regression_closed_form_h_equals_g_and_r_vanishes(loss):
    """Softmax regression z = W^T [x; 1]: the logits are linear in W, so H = G exactly, and
    H = (1/N) sum_i kron(x_i x_i^T, H_out,i) with H_out = diag(p) - p p^T (cross-entropy) or
    I (square loss)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        n, d = 30, 3
        x = np.concatenate([rng.normal(size=(n, d)), np.ones((n, 1))], axis=1)
        labels = rng.integers(0, C, n)
        params = {"w": jnp.asarray(rng.normal(size=(d + 1, C)))}

        def apply_fn(p, xs):
            return xs @ p["w"]

        z = x @ np.asarray(params["w"])
        closed = np.zeros(((d + 1) * C,) * 2)
        for i in range(n):
            if loss == "cross_entropy":
                p = np.exp(z[i] - z[i].max())
                p /= p.sum()
                h_out = np.diag(p) - np.outer(p, p)
            else:
                h_out = np.eye(C)
            closed += np.kron(np.outer(x[i], x[i]), h_out) / n  # w.ravel(): index j * C + k
        curvature = curvature_of(apply_fn, params, jnp.asarray(x), labels, loss)
        np.testing.assert_allclose(curvature.dense(), closed, atol=1e-10)
        np.testing.assert_allclose(curvature.gauss_newton().dense(), closed, atol=1e-10)
        assert np.abs(curvature.residual().dense()).max() <= 1e-10


def test_split_spectrum_extremes_are_the_exact_eigenvalues_with_residuals():
    with jax.enable_x64(True):
        params, x, labels = mlp_problem(seed=2)
        curvature = curvature_of(mlp_apply, params, x, labels, "mse")
        out = gn.split_spectrum(curvature, order=curvature.dim, top_k=3, tol=1e-8)
        for matrix in ("hessian", "gauss_newton", "residual"):
            exact = np.linalg.eigvalsh(getattr(curvature, matrix)().dense())
            m = out[matrix]
            np.testing.assert_allclose(m["top"], exact[::-1][:3], atol=1e-9)
            np.testing.assert_allclose(m["smallest"], exact[0], atol=1e-9)
            assert all(m["top_converged"]) and m["smallest_converged"]
            assert max(m["top_residual"]) <= 1e-8
            # a full-order run's quadrature is exact on the negative part's sign pattern
            np.testing.assert_allclose(sorted(m["ritz_values"]), exact, atol=1e-9)
        # one start vector for all three: the SLQ traces add up as H = G + R
        assert abs(out["hessian"]["trace"] - out["gauss_newton"]["trace"]
                   - out["residual"]["trace"]) <= 1e-9 * abs(out["hessian"]["trace"])
        split = out["hessian_smallest_split"]
        assert split["value"] < 0 and split["residual"] < 0


def test_lanczos_relation_residuals_are_the_measured_ones():
    """The residuals a run reports without a product (beta_m |s_m|) are those measured."""
    with jax.enable_x64(True):
        params, x, labels = mlp_problem(seed=5)
        hessian = curvature_of(mlp_apply, params, x, labels, "cross_entropy")
        rng = jax.random.PRNGKey(0)
        measured, _ = gn.matrix_spectrum(hessian, 12, 6, 1e-6, rng)
        estimated, _ = gn.matrix_spectrum(hessian, 12, 6, 1e-6, rng, measured_k=1)
        assert estimated["top_measured"] == 1 and measured["top_measured"] == 6
        np.testing.assert_allclose(estimated["top"], measured["top"], rtol=1e-10)
        np.testing.assert_allclose(estimated["top_residual"], measured["top_residual"],
                                   rtol=1e-6, atol=1e-12)
        assert max(measured["top_residual"]) > 1e-6  # a short run: not all converged


def test_count_outliers_takes_the_largest_gap():
    assert gn.count_outliers([50, 40, 30, 3, 2.5, 2]) == {"count": 3, "ratio": 10.0, "edge": 3.0}
    assert gn.count_outliers([5, -1])["count"] is None


def dense_class_means(params, x, labels, loss):
    """The columns a_ck of `class_mean_gram`, built from per-example Jacobians."""
    x0, unravel = ravel_pytree(params)
    jac = np.asarray(jax.jacfwd(lambda v: mlp_apply(unravel(v), x))(x0))  # [N, C, P]
    w, d = (np.asarray(a) for a in gn.output_factors(loss, mlp_apply(params, x)))
    n = len(labels)
    cols = []
    for c in range(C):
        rows = labels == c
        for k in range(C):
            total = sum(w[i, k] * jac[i].T @ d[i, k] for i in np.flatnonzero(rows))
            cols.append(total / np.sqrt(n * w[rows, k].sum()) if rows.any()
                        else np.zeros(x0.size))
    return np.stack(cols, axis=1)  # [P, C^2]


@pytest.mark.parametrize("loss", ["cross_entropy", "square"])
@pytest.mark.parametrize("counts", [(8, 8, 8), (13, 0, 11)])  # padded classes, an empty one
def test_class_mean_gram_is_its_dense_construction_and_lies_below_g(loss, counts):
    with jax.enable_x64(True):
        params, x, _ = mlp_problem(seed=3)
        labels = np.random.default_rng(0).permutation(np.repeat(np.arange(C), counts))
        gram = gn.class_mean_gram(mlp_apply, params, x, labels, loss, C)
        a = dense_class_means(params, x, labels, loss)
        np.testing.assert_allclose(gram, a.T @ a, atol=1e-10)
        g = np.linalg.eigvalsh(dense_gauss_newton(mlp_apply, params, x, labels, loss))[::-1]
        means = np.linalg.eigvalsh(gram)[::-1]
        assert np.all(means <= g[:means.size] + 1e-10)  # G = A A^T + PSD spread
        assert means[0] < g[0] - 1e-6  # distinct inputs: the spread is not zero
        parts = gn.gram_parts(gram, C)
        for a_part, b_part in (("class", "cross_class"), ("output", "cross_output")):
            np.testing.assert_allclose(sum(parts[a_part]) + sum(parts[b_part]), np.trace(gram),
                                       rtol=1e-10)


@pytest.mark.parametrize("loss", ["cross_entropy", "square"])
def test_class_means_are_all_of_g_where_each_class_is_one_image(loss):
    with jax.enable_x64(True):
        params, x, labels = mlp_problem(seed=4, duplicate=True)
        gram = gn.class_mean_gram(mlp_apply, params, x, labels, loss, C)
        g = np.linalg.eigvalsh(dense_gauss_newton(mlp_apply, params, x, labels, loss))[::-1]
        means = np.linalg.eigvalsh(gram)[::-1]
        np.testing.assert_allclose(means, g[:means.size], atol=1e-10)
        assert np.all(np.abs(g[means.size:]) <= 1e-10)


def test_mse_has_no_class_mean_gram():
    with pytest.raises(ValueError, match="'mse' has no sum-of-squares.*cross_entropy, square"):
        gn.output_factors("mse", jnp.zeros((2, C)))


def test_bad_study_configs_are_one_line_naming_the_field():
    from configs.curvature import get_config

    config = get_config("digits")
    gn.validate_config(config)
    for field, value, message in (("losses", ("cross_entropy", "hinge"), "unknown losses entry "
                                   "'hinge'"),
                                  ("networks.mlp.measure_at", (0, 400), "networks.mlp.measure_at"),
                                  ("networks.cnn.top_k", 99, "networks.cnn.top_k=99"),
                                  ("tol", 0.0, "tol")):
        bad = get_config("digits")
        bad.update_from_flattened_dict({field: value})
        with pytest.raises(ConfigError, match=message):
            gn.validate_config(bad)
    with pytest.raises(ValueError, match="configs/curvature.py:svhn"):
        get_config("svhn")


def test_main_job_section_on_a_trained_digits_checkpoint(tmp_path):
    from dlassign.training.trainer import train_and_evaluate
    from tests.helpers import tiny_config

    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config({"num_epochs": 2, "data.subset_fraction": 0.25}), workdir)
    out = gn.checkpoint_section(workdir, num_examples=128, lanczos_order=20, top_k=6)
    h, g = out["hessian"], out["gauss_newton"]
    assert abs(out["num_examples"] - 128) <= 10 and len(h["top"]) == 6  # stratified rounding
    # cross-entropy: G has no negative curvature, and the section says so from the number
    assert g["smallest"] >= -out["tol"] * g["top"][0]
    section = out["section"]
    assert "no negative curvature in G" in section
    assert f"{h['top'][0]:.4g}" in section and f"{g['top'][0]:.4g}" in section
    assert "for C = 10 classes" in section


def test_study_runs_end_to_end_on_the_digits(tmp_path):
    from configs.curvature import get_config

    config = get_config("digits")
    config.losses = ("square",)
    config.networks = ml_collections.ConfigDict(
        {"mlp": dict(model=dict(name="mlp", hidden_sizes=(8,), activation="relu"),
                     num_steps=4, measure_at=(0, 4), lanczos_order=12, top_k=4)})
    config.data.curvature_examples = 60
    result = gn.write_outputs(gn.run_study(config), str(tmp_path))
    run = result["networks"]["mlp"]["runs"][0]
    assert [m["step"] for m in run["moments"]] == [0, 4] and len(run["train_loss"]) == 4
    assert (tmp_path / "results.json").exists() and (tmp_path / "densities.png").exists()
    assert "| mlp | square | 4 |" in result["split_table"]
    other = dict(result, networks={"cnn": result["networks"]["mlp"]})
    merged = gn.merge_results([result, other])
    assert list(merged["networks"]) == ["mlp", "cnn"] and "split_table" not in merged
    with pytest.raises(ValueError, match=r"share networks \['mlp'\]"):
        gn.merge_results([result, result])
    with pytest.raises(ValueError, match=r"\['tol'\] differ"):
        gn.merge_results([result, dict(other, tol=0.5)])


def test_entry_point_faults_are_one_line(tmp_path):
    from tests.test_faults import cli, one_line_error

    one_line_error(cli("experiments.curvature", "--config=configs/curvature.py:digits",
                       f"--workdir={tmp_path / 'w'}", "--config.only=resnet"),
                   "only='resnet' is invalid", "cnn, mlp")
    one_line_error(cli("experiments.curvature", f"--workdir={tmp_path / 'w'}",
                       f"--merge={tmp_path / 'nothing'}"), "holds no results.json")
