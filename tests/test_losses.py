"""The square loss on the outputs (Cohen et al.'s): its value by hand, and its Hessian through
`model_batch_loss` and the curvature tools against dense float64 Hessians of a tiny network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlassign.analysis.hessian import (
    Curvature,
    dataset_hvp,
    exact_hessian,
    flatten_loss,
    model_batch_loss,
)
from dlassign.errors import ConfigError
from dlassign.models import get_model
from dlassign.training.losses import get_loss
from tests.helpers import synthetic_split


def test_square_loss_by_hand():
    logits = jnp.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0], [-1.0, 3.0, 1.0]])
    labels = jnp.array([1, 2, 0])
    # 0.5 * sum_k (logit_k - onehot_k)^2 on the raw logits, no softmax
    expected = [0.5 * (1.0 + 1.0 + 0.25), 0.5 * 1.0, 0.5 * (4.0 + 9.0 + 1.0)]
    np.testing.assert_allclose(get_loss("square")(logits, labels), expected, rtol=1e-6)
    # on softmax probabilities ('mse') the same logits give other values
    assert not np.allclose(get_loss("mse")(logits, labels), expected)
    np.testing.assert_allclose(get_loss("square", binary=True)(jnp.array([0.5, 2.0]),
                                                               jnp.array([1, 0])),
                               [0.125, 2.0], rtol=1e-6)


def test_unknown_loss_names_the_square_loss():
    with pytest.raises(ConfigError, match="unknown loss 'hinge'; expected one of "
                                          "cross_entropy, mse, square"):
        get_loss("hinge")


@pytest.fixture(scope="module")
def tiny_square_problem():
    """A tanh MLP 4-5-3 on 12 examples in float64, its parameters and batches."""
    with jax.enable_x64(True):
        split = synthetic_split(12, num_classes=3, size=2)
        model = get_model("mlp", num_classes=3, hidden_sizes=(5,), activation="tanh")
        x = jnp.asarray(split.images, jnp.float64) / 255.0  # float64[12, 2, 2, 1]
        params = jax.tree.map(lambda a: a.astype(jnp.float64),
                              model.init(jax.random.PRNGKey(0), x)["params"])
        y = jnp.asarray(split.labels)
        yield model, params, x, y


def test_square_loss_hessian_vector_products_match_the_dense_hessian(tiny_square_problem):
    """`model_batch_loss(..., 'square')` through `dataset_hvp` (two batches, one masked) and
    `Curvature` equal the dense Hessian of a mean square loss written out here; its
    Gauss-Newton part is J^T J / n (the loss's Hessian in the outputs is the identity)."""
    model, params, x, y = tiny_square_problem
    with jax.enable_x64(True):
        def mean_square(p):
            out = model.apply({"params": p}, x)
            return 0.5 * jnp.sum((out - jax.nn.one_hot(y, 3, dtype=out.dtype)) ** 2) / 12

        f, x0, unravel = flatten_loss(mean_square, params)
        dense = np.asarray(exact_hessian(f, x0))
        assert x0.dtype == jnp.float64 and np.linalg.eigvalsh(dense).min() < -1e-6

        batch_loss = model_batch_loss(model, {}, "square")
        batches = [{"image": x[:8], "label": y[:8], "mask": jnp.ones(8, bool)},
                   {"image": jnp.concatenate([x[8:], x[:4]]),
                    "label": jnp.concatenate([y[8:], y[:4]]),
                    "mask": jnp.arange(8) < 4}]
        matvec, _, _ = dataset_hvp(batch_loss, params, batches)
        rng = np.random.default_rng(0)
        for _ in range(3):
            v = jnp.asarray(rng.standard_normal(x0.size))
            np.testing.assert_allclose(matvec(v), dense @ np.asarray(v), rtol=1e-10,
                                       atol=1e-12)

        curvature = Curvature(batch_loss, params, batches)
        np.testing.assert_allclose(curvature.dense(), dense, rtol=1e-10, atol=1e-12)

        def outputs(p, batch):
            return model.apply({"params": p}, batch["image"])

        def output_loss(out, batch):
            return get_loss("square")(out, batch["label"]).mean()

        full = {"image": x, "label": y}
        gauss_newton = Curvature.from_outputs(outputs, output_loss, params, full,
                                              matrix="gauss_newton")
        jac = jax.jacobian(lambda z: outputs(unravel(z), full).reshape(-1))(x0)
        np.testing.assert_allclose(gauss_newton.dense(), np.asarray(jac.T @ jac) / 12,
                                   rtol=1e-10, atol=1e-12)
        assert np.linalg.eigvalsh(gauss_newton.dense()).min() > -1e-12
