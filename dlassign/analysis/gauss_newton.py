"""The Gauss-Newton split H = G + R of classification losses, and the class structure of G.

G = J^T H_out J (J the Jacobian of the logits in the parameters, H_out the Hessian of the loss in
the logits) is positive semi-definite wherever the loss is convex in the logits: cross-entropy,
and the square loss on the logits that Cohen et al. (ICLR 2021) train with. MSE on softmax
probabilities (`loss=mse`) is not convex in the logits, so its G can be indefinite. R = H - G
holds the outputs' own curvature weighted by the loss's gradient; it is where the rest of the
negative curvature lives.

`split_spectrum` measures H, G and R from one Lanczos run each (the same random start): the
run's Ritz values and weights give the SLQ density and the negative part of the spectrum, its
extreme Ritz vectors the top and smallest eigenpairs, each with its measured relative residual.
`class_mean_gram` builds the C^2 x C^2 Gram matrix of the class/cross-class means of the logit
gradients (Papyan 2019, 2020), whose eigenvalues are those of the part of G those means carry.
`run_study` trains MNIST networks under three losses and measures all of it at three moments
(`experiments.curvature`); `checkpoint_section` is the main job's short version.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.flatten_util import ravel_pytree

from dlassign.analysis.hessian import Curvature
from dlassign.analysis.hessian.spectrum import (
    lanczos_run,
    rayleigh_pair,
    ritz,
    ritz_vector,
    smooth_density,
)
from dlassign.data import prepare, stratified_subset
from dlassign.errors import ConfigError, one_of
from dlassign.models import get_model
from dlassign.report import markdown_table, plt
from dlassign.runtime.files import finite_or_none, save_figure, write_json
from dlassign.training import losses
from dlassign.training.config_validation import _choice, _number, check_data_dir
from dlassign.training.train_state import init_compiler_options

MATRIX_NAMES = {"hessian": "H", "gauss_newton": "G", "residual": "R"}


# ----------------------------------------------------------------------------- losses


LOSSES = losses.LOSSES  # cross_entropy, mse (on softmax), square (on the logits)
# losses whose output Hessian is a sum of squares labelled by the outputs (class_mean_gram)
FACTORED = ("cross_entropy", "square")


def per_example_loss(name: str):
    if name not in LOSSES:
        raise one_of("loss", name, LOSSES)
    return LOSSES[name]


def output_factors(name: str, logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weights w float[N, C] and directions d float[N, C, C] with H_out,i = sum_k w_ik d_ik d_ik^T.

    Cross-entropy: w = softmax(z), d_k = e_k - p (diag(p) - p p^T written as a sum of squares);
    the square loss: w = 1, d_k = e_k. MSE on softmax has no such form (its H_out is indefinite).
    """
    n, c = logits.shape
    eye = jnp.eye(c, dtype=logits.dtype)
    if name == "cross_entropy":
        p = jax.nn.softmax(logits)
        return p, eye[None] - p[:, None, :]
    if name == "square":
        return jnp.ones((n, c), logits.dtype), jnp.broadcast_to(eye, (n, c, c))
    raise ValueError(f"loss {name!r} has no sum-of-squares output Hessian; expected one of "
                     f"{', '.join(FACTORED)}")


# ----------------------------------------------------------------------------- spectra


def _measured(matrix: Curvature, vectors: np.ndarray, basis: np.ndarray) -> tuple[list, list,
                                                                                  list]:
    """Ritz vectors from T's eigenvectors, and each pair's Rayleigh quotient and relative
    residual ||M y - lambda y|| / |lambda| measured with one product each."""
    values, residuals, ritz_vectors = [], [], []
    for s in vectors.T:
        y = ritz_vector(s, basis, basis.dtype)
        value, residual = rayleigh_pair(y, matrix.matvec(y))
        values.append(float(value))
        residuals.append(float(residual))
        ritz_vectors.append(y)
    return values, residuals, ritz_vectors


def matrix_spectrum(matrix: Curvature, order: int, top_k: int, tol: float, rng: jax.Array,
                    num_points: int = 400, measured_k: int | None = None
                    ) -> tuple[dict, jax.Array]:
    """One Lanczos run (full re-orthogonalisation, `order` products) on `matrix`: the top `top_k`
    and the smallest eigenpairs with their residuals, the SLQ density of the run, and its
    negative part.

    The first `measured_k` (default all) top pairs and the smallest have their residuals
    measured, one product each; the others carry the Lanczos relation's ||M y - theta y|| =
    beta_m |s_m| (free, and exact in exact arithmetic with full re-orthogonalisation).

    Returns:
      (summary dict, the smallest Ritz vector float[P]).
    """
    order = min(order, matrix.dim)
    tridiag, basis, beta = lanczos_run(matrix.matvec, matrix.dim, order, rng, matrix.dtype)
    theta, s = np.linalg.eigh(tridiag)
    _, weights = ritz(tridiag)
    top = np.argsort(-theta)[:min(top_k, theta.size)]
    measured_k = top.size if measured_k is None else min(measured_k, top.size)
    values, residuals, _ = _measured(matrix, s[:, top[:measured_k]], basis)
    for i in top[measured_k:]:
        values.append(float(theta[i]))
        residuals.append(float(abs(beta * s[-1, i]) / max(abs(theta[i]), 1e-30)))
    low, low_residual, low_vector = _measured(matrix, s[:, :1], basis)
    density = smooth_density([theta], [weights], num_points)
    w = weights / weights.sum()
    negative = theta < 0
    return {
        "top": values, "top_residual": residuals, "top_measured": measured_k,
        "top_converged": [r <= tol for r in residuals],
        "smallest": low[0], "smallest_residual": low_residual[0],
        "smallest_converged": low_residual[0] <= tol,
        # ||M v - lambda v|| / |lambda_top|: the accuracy of a near-zero smallest eigenvalue,
        # whose residual relative to itself cannot be small
        "smallest_residual_scaled": low_residual[0] * abs(low[0]) / max(map(abs, values)),
        # SLQ (one draw): the quadrature's share of eigenvalues below zero, and dim times the
        # quadrature's mass-weighted negative values, an estimate of the sum of the negative
        # eigenvalues; tr = dim sum_i w_i theta_i
        "negative_fraction": float(w[negative].sum()),
        "negative_sum": float(matrix.dim * np.sum(w[negative] * theta[negative])),
        "trace": float(matrix.dim * np.sum(w * theta)),
        "ritz_values": theta.tolist(), "ritz_weights": w.tolist(), "order": int(order),
        "density": {"grid": density.grid.tolist(), "density": density.density.tolist()},
    }, low_vector[0]


def split_spectrum(curvature: Curvature, order: int, top_k: int, tol: float = 1e-3,
                   seed: int = 0, residual_top_k: int = 3, measured_k: int | None = None
                   ) -> dict:
    """`matrix_spectrum` of H, G and R = H - G (all from the same Lanczos start, so the three
    SLQ traces add up exactly), and H's most negative direction v split as v^T H v = v^T G v +
    v^T R v (one more G product).

    Args:
      curvature: built by `Curvature.from_outputs` (any matrix of it).
      top_k: the top eigenvalues of H and G reported (R: `residual_top_k`).
      measured_k: how many of them get a measured residual (`matrix_spectrum`).
    """
    rng = jax.random.PRNGKey(seed)
    out = {"num_params": curvature.dim, "num_examples": curvature.num_examples, "tol": tol}
    vectors = {}
    for matrix, k in (("hessian", top_k), ("gauss_newton", top_k),
                      ("residual", residual_top_k)):
        out[matrix], vectors[matrix] = matrix_spectrum(getattr(curvature, matrix)(), order, k,
                                                       tol, rng, measured_k=measured_k)
    v = vectors["hessian"]
    g_part = float(jnp.vdot(v, curvature.gauss_newton().matvec(v)))
    lam = out["hessian"]["smallest"]
    out["hessian_smallest_split"] = {"value": lam, "gauss_newton": g_part,
                                     "residual": lam - g_part}
    return out


def count_outliers(values) -> dict:
    """Outliers above the bulk by the largest gap: sorted positive eigenvalues l_1 >= l_2 >= ...,
    the count is the i that maximises l_i / l_{i+1}; the bulk edge is l_{count+1}.

    Returns:
      {count, ratio (l_count / l_{count+1}), edge}; count None where fewer than two positive
      eigenvalues are given.
    """
    values = np.sort(np.asarray(values, np.float64))[::-1]
    values = values[values > 0]
    if values.size < 2:
        return {"count": None, "ratio": None, "edge": None}
    ratios = values[:-1] / values[1:]
    i = int(np.argmax(ratios))
    return {"count": i + 1, "ratio": float(ratios[i]), "edge": float(values[i + 1])}


# ----------------------------------------------------------------------------- class means


def class_mean_gram(output_fn, params, images: jax.Array, labels: np.ndarray, loss: str,
                    num_classes: int) -> np.ndarray:
    """The Gram matrix A^T A, float64[C^2, C^2], of the class/cross-class means of the logit
    gradients (Papyan 2019, 2020).

    With H_out,i = sum_k w_ik d_ik d_ik^T (`output_factors`) and g_ik = J_i^T d_ik,
    G = (1/N) sum_i sum_k w_ik g_ik g_ik^T. Grouping the examples by their class c and the terms
    by k, each group's second moment is its weighted mean's outer product plus its spread, so
    G = A A^T + (a PSD remainder) with one column per (c, k), index c * C + k:
    a_ck = sum_{i in c} w_ik g_ik / sqrt(N W_ck), W_ck = sum_{i in c} w_ik. The nonzero
    eigenvalues of A A^T are those of A^T A, and lie below G's one by one (Weyl).

    One program (`_class_columns`) for all classes: each class's examples padded to the largest
    class's count, the padding weighted zero, so no per-class shapes are compiled op by op.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    rows = [np.flatnonzero(labels == c) for c in range(num_classes)]
    width = max(1, max(r.size for r in rows))
    index = np.zeros((num_classes, width), np.int64)
    mask = np.zeros((num_classes, width), bool)
    for c, r in enumerate(rows):
        index[c, :r.size], mask[c, :r.size] = r, True
    # compiled per call (the closure differs each time), so no module-level cache keeps it
    columns = jax.jit(functools.partial(_class_columns, output_fn, loss))
    flat, weight = columns(params, jnp.asarray(images)[index], jnp.asarray(mask))
    flat, weight = np.asarray(flat, np.float64), np.asarray(weight, np.float64)  # [C, C, P]
    # an empty class has zero columns (its sums are zero)
    a = (flat / np.sqrt(n * np.maximum(weight, 1e-300))[..., None]).reshape(-1, flat.shape[-1])
    return a @ a.T  # [C^2, C^2]


def _class_columns(output_fn, loss: str, params, images: jax.Array, mask: jax.Array):
    """For each class c (a row of `images` float[C, M, ...], `mask` bool[C, M] marking its
    examples): sum_i w_ik g_ik for every k, float[C, P], and W_ck, float[C]; the classes one
    after another (`lax.map`), so memory holds one class's C vjps, as a loop over classes."""
    def one_class(inputs):
        x, m = inputs
        logits, vjp = jax.vjp(lambda p: output_fn(p, x), params)
        w, d = output_factors(loss, logits)
        w = jnp.where(m[:, None], w, 0)
        # cotangent for column k: w_ik d_ik on each example i of the class
        grads = jax.vmap(vjp)(jnp.einsum("ik,ikj->kij", w, d))[0]
        return jax.vmap(lambda g: ravel_pytree(g)[0])(grads), jnp.sum(w, axis=0)

    return jax.lax.map(one_class, (images, mask))


def gram_parts(gram: np.ndarray, num_classes: int) -> dict:
    """Eigenvalues (descending) of the class-mean Gram matrix and of its two-way parts.

    The C^2 columns a_ck split orthogonally by averaging: 'class' (for each example class c,
    the mean over k: C directions), 'cross_class' (the rest, C(C-1)); likewise 'output' (for
    each output k, the mean over c) and its rest. Each part's eigenvalues are those of P Gram P
    for its projector P on the column index.
    """
    c = num_classes
    eye, mean = np.eye(c), np.full((c, c), 1.0 / c)
    projectors = {"class": np.kron(eye, mean), "cross_class": np.kron(eye, eye - mean),
                  "output": np.kron(mean, eye), "cross_output": np.kron(eye - mean, eye)}
    out = {"all": np.linalg.eigvalsh(gram)[::-1].tolist()}
    for name, p in projectors.items():
        out[name] = np.linalg.eigvalsh(p @ gram @ p)[::-1].tolist()
    return out


# ----------------------------------------------------------------------------- one moment


def measure(apply_fn, params, images: jax.Array, labels: np.ndarray, loss: str,
            num_classes: int, order: int, top_k: int, tol: float, seed: int,
            measured_k: int | None = None) -> dict:
    """H, G, R (`split_spectrum`) of `loss` at `params` on the fixed images, the outlier counts
    of H and G, and (for the factored losses) the class-mean Gram spectrum.

    Args:
      apply_fn: `(params, images) -> logits float[N, C]`.
    """
    per_example = per_example_loss(loss)
    labels_j = jnp.asarray(labels, jnp.int32)

    def output_fn(p, batch):
        return apply_fn(p, batch["image"])

    def output_loss(z, batch):
        return per_example(z, batch["label"]).mean()

    batch = {"image": images, "label": labels_j}
    curvature = Curvature.from_outputs(output_fn, output_loss, params, batch, seed=seed)
    start = time.perf_counter()
    out = split_spectrum(curvature, order, top_k, tol, seed, measured_k=measured_k)
    for matrix in ("hessian", "gauss_newton"):
        out[matrix]["outliers"] = count_outliers(out[matrix]["top"])
    scores = jax.jit(functools.partial(_loss_and_accuracy, apply_fn, loss))
    out["loss"], out["accuracy"] = map(float, scores(params, images, labels_j))
    if loss in FACTORED:
        gram = class_mean_gram(apply_fn, params, images, labels, loss, num_classes)
        parts = gram_parts(gram, num_classes)
        out["class_means"] = dict(parts, outliers=count_outliers(parts["all"][:top_k]))
    out["seconds"] = time.perf_counter() - start
    return out


def _loss_and_accuracy(apply_fn, loss: str, params, images: jax.Array, labels: jax.Array):
    logits = apply_fn(params, images)
    return (jnp.mean(per_example_loss(loss)(logits, labels)),
            jnp.mean(jnp.argmax(logits, -1) == labels))


def summary_sentences(m: dict, loss: str, num_classes: int) -> list[str]:
    """What one measurement says, in sentences computed from its numbers: the top eigenvalues
    of H, G and R, where the negative curvature sits, and the outliers against the classes."""
    h, g, r = m["hessian"], m["gauss_newton"], m["residual"]

    def pair(x, which="top"):
        value = x["top"][0] if which == "top" else x["smallest"]
        res = x["top_residual"][0] if which == "top" else x["smallest_residual"]
        ok = x["top_converged"][0] if which == "top" else x["smallest_converged"]
        return f"{value:.4g} (relative residual {res:.1e}{'' if ok else ', not converged'})"

    out = [f"On {m['num_examples']:.0f} training images ({m['num_params']} parameters, "
           f"{loss} loss {m['loss']:.3g}, accuracy {m['accuracy']:.1%}), the top eigenvalue of "
           f"the Hessian H is {pair(h)}, of the Gauss-Newton matrix G = J^T H_out J "
           f"{pair(g)} and of R = H - G {pair(r)}."]
    bound = m["tol"] * g["top"][0]
    if g["smallest"] >= -bound:
        verdict = (f"no negative curvature in G (its smallest eigenvalue, {g['smallest']:.2g}, "
                   f"is within {m['tol']:g} of the top one of zero)")
    else:
        verdict = (f"G itself is indefinite (smallest eigenvalue {pair(g, 'smallest')}), as a "
                   "loss that is not convex in the logits allows")
    out.append(f"H's smallest eigenvalue is {pair(h, 'smallest')}; {verdict}.")
    split = m["hessian_smallest_split"]
    if split["value"] < 0:
        share = split["residual"] / split["value"]
        out.append(f"Along H's most negative eigenvector v, v^T G v = {split['gauss_newton']:.3g} "
                   f"and v^T R v = {split['residual']:.3g}: R carries {share:.0%} of that "
                   "negative curvature.")
    out.append(f"The SLQ sums of the negative eigenvalues are {h['negative_sum']:.3g} (H), "
               f"{g['negative_sum']:.3g} (G) and {r['negative_sum']:.3g} (R).")
    ho, go = h["outliers"], g["outliers"]
    if ho["count"] is not None and go["count"] is not None:
        ok = sum(g["top_converged"][:go["count"] + 1])
        text = (f"Above the bulk (the largest ratio between consecutive eigenvalues among the top "
                f"{len(g['top'])}) H has {ho['count']} outliers and G {go['count']} (gap "
                f"x{go['ratio']:.2f} down to {go['edge']:.3g}; {ok} of G's top "
                f"{go['count'] + 1} eigenvalues within tol), for C = {num_classes} classes")
        cm = m.get("class_means")
        if cm:
            k = go["count"]
            ratio = cm["all"][k - 1] / g["top"][k - 1]
            text += (f"; the {num_classes}^2 class/cross-class means of the logit gradients "
                     f"alone give {cm['outliers']['count']} and reach {ratio:.0%} of G's "
                     f"{k}th eigenvalue")
        out.append(text + ".")
    return out


def checkpoint_section(run_dir: str, num_examples: int = 256, lanczos_order: int = 20,
                       top_k: int = 12, tol: float = 1e-3, seed: int = 0,
                       measured_k: int = 1) -> dict:
    """The Gauss-Newton split of a trained checkpoint's training loss (`measure` on a fixed
    stratified sample of its training split), with `summary_sentences` as a report section.
    The defaults keep it to about 100 products on a few hundred images: the main job's
    section costs seconds, not the minutes of the MNIST study.

    Returns:
      `measure`'s dict with `section` (markdown) added.
    """
    from dlassign.analysis.hessian.operators import inference_kwargs
    from dlassign.training.evaluation import restore_run

    run, state, _ = restore_run(run_dir)
    train = run.dataset.train
    rows = stratified_subset(train.labels, min(num_examples, len(train)) / len(train), seed)
    images = jnp.asarray(run.dataset.normalizer(train.images[rows], jnp.float32))
    labels = np.asarray(train.labels[rows], np.int32)
    fixed = {k: v for k, v in state.variables.items() if k != "params"}
    kwargs = inference_kwargs(run.model)

    def apply_fn(params, x):
        return run.model.apply({"params": params, **fixed}, x, **kwargs)

    m = measure(apply_fn, state.params, images, labels, run.config.loss,
                run.dataset.num_classes, lanczos_order, top_k, tol, seed, measured_k)
    sentences = summary_sentences(m, run.config.loss, run.dataset.num_classes)
    section = "\n".join([
        "### Gauss-Newton split of the best CNN\n",
        "H = G + R with G = J^T H_out J (J the Jacobian of the logits, H_out the Hessian of the "
        "loss in the logits): G is positive semi-definite where the loss is convex in the "
        "logits, and R carries the rest. One Lanczos run of "
        f"{m['hessian']['order']} steps per matrix (`dlassign.analysis.gauss_newton`; the "
        "MNIST study is `experiments.curvature`). " + " ".join(sentences) + "\n"])
    return dict(m, section=section)


# ----------------------------------------------------------------------------- the MNIST study


def validate_config(config) -> None:
    """One-line `ConfigError` naming the first field of a curvature-study config that cannot
    work."""
    _number("seed", config.seed, low=0, integer=True)
    check_data_dir(config.data.name, config.data.get("data_dir", ""))
    _number("data.num_train", config.data.num_train, low=0, integer=True)
    _number("data.curvature_examples", config.data.curvature_examples, low=1, integer=True)
    if not config.losses:
        raise ConfigError("losses is empty; expected some of " + ", ".join(LOSSES))
    for loss in config.losses:
        _choice("losses entry", loss, LOSSES)
    if not config.networks:
        raise ConfigError("networks is empty; expected e.g. mlp and cnn blocks")
    for name, net in config.networks.items():
        _choice(f"networks.{name}.model.name", net.model.name, ("mlp", "cnn"))
        _number(f"networks.{name}.num_steps", net.num_steps, low=0, integer=True)
        moments = tuple(net.measure_at)
        if not moments or any(not isinstance(s, int) or not 0 <= s <= net.num_steps
                              for s in moments) or list(moments) != sorted(set(moments)):
            raise ConfigError(f"networks.{name}.measure_at={moments!r} is invalid; expected "
                              f"increasing steps in 0..{net.num_steps}")
        _number(f"networks.{name}.lanczos_order", net.lanczos_order, low=2, integer=True)
        _number(f"networks.{name}.top_k", net.top_k, low=2, integer=True)
        if net.top_k > net.lanczos_order:
            raise ConfigError(f"networks.{name}.top_k={net.top_k} is invalid; expected at most "
                              f"lanczos_order={net.lanczos_order}")
    if config.get("only") and config.only not in config.networks:
        raise ConfigError(f"only={config.only!r} is invalid; expected '' (every network) or one "
                          f"of {', '.join(sorted(config.networks.keys()))}")
    for name, net in config.networks.items():
        _number(f"networks.{name}.curvature_examples", net.get("curvature_examples", 0), low=0,
                integer=True)
    _number("batch_size", config.batch_size, low=1, integer=True)
    _number("learning_rate", config.learning_rate, low=0, low_open=True)
    _number("tol", config.tol, low=0, high=1, low_open=True, high_open=True)


def load_data(config) -> dict:
    """The training subset (stratified, `data.num_train` images; 0: all) as floats."""
    data = prepare(config.data, config.seed)
    train = data.train
    n = config.data.num_train or len(train)
    if n < len(train):
        train = train.take(stratified_subset(train.labels, n / len(train), config.seed))
    images = np.asarray(data.normalizer(train.images, jnp.float32))
    labels = train.labels.astype(np.int32)
    return {"images": images, "labels": labels, "num_classes": data.num_classes,
            "name": data.name}


def curvature_sample(labels: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
    """The fixed stratified sample (indices) the curvature is measured on."""
    m = min(num_examples, len(labels))
    return stratified_subset(labels, m / len(labels), seed + 1)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _train_chunk(model, loss: str, optimizer, params, opt_state, images, labels, order):
    """Adam steps over the minibatch indices `order` int[S, B], one scan."""
    per_example = per_example_loss(loss)

    def step(carry, idx):
        p, s = carry
        value, grad = jax.value_and_grad(
            lambda q: per_example(model.apply({"params": q}, images[idx]), labels[idx]).mean())(p)
        updates, s = optimizer.update(grad, s, p)
        return (optax.apply_updates(p, updates), s), value

    (params, opt_state), values = jax.lax.scan(step, (params, opt_state), order)
    return params, opt_state, values


def train_and_measure(model, params0, data: dict, loss: str, net, config) -> dict:
    """Adam from `params0` on the training subset under `loss`, measuring at `net.measure_at`."""
    optimizer = optax.adam(config.learning_rate)
    params, opt_state = params0, optimizer.init(params0)
    images, labels = jnp.asarray(data["images"]), jnp.asarray(data["labels"])
    sample = curvature_sample(data["labels"], net.get("curvature_examples", 0)
                              or config.data.curvature_examples, config.seed)
    sample_images, sample_labels = images[sample], data["labels"][sample]
    rng = np.random.default_rng(config.seed)
    n, b = len(data["labels"]), config.batch_size

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    step, moments, train_loss = 0, [], []
    for target in net.measure_at:
        while step < target:
            count = min(target - step, max(1, n // b))
            order = np.stack([rng.choice(n, b, replace=False) for _ in range(count)])
            params, opt_state, values = _train_chunk(model, loss, optimizer, params, opt_state,
                                                     images, labels, jnp.asarray(order))
            train_loss.extend(np.asarray(values, np.float64).tolist())
            step += count
        m = measure(apply_fn, params, sample_images, sample_labels, loss, data["num_classes"],
                    net.lanczos_order, net.top_k, config.tol, config.seed)
        m["step"] = step
        h, g, r = m["hessian"], m["gauss_newton"], m["residual"]
        logging.info("%s step %d: loss %.4g acc %.3f; top H %.4g G %.4g R %.4g; smallest H %.3g "
                     "G %.3g R %.3g; %.0f s", loss, step, m["loss"], m["accuracy"], h["top"][0],
                     g["top"][0], r["top"][0], h["smallest"], g["smallest"], r["smallest"],
                     m["seconds"])
        moments.append(m)
    return {"loss": loss, "moments": moments, "train_loss": train_loss}


def run_study(config) -> dict:
    """Every network x loss of `config`, each loss from the same initial parameters."""
    validate_config(config)
    data = load_data(config)
    out = {"dataset": data["name"], "num_train": len(data["labels"]),
           "learning_rate": config.learning_rate, "batch_size": config.batch_size,
           "tol": config.tol, "networks": {}}
    for name, net in config.networks.items():
        if config.get("only") and name != config.only:
            continue
        fields = dict(net.model)
        model = get_model(fields.pop("name"), num_classes=data["num_classes"], **fields)
        params0 = jax.jit(model.init, compiler_options=init_compiler_options())(
            jax.random.PRNGKey(config.seed), data["images"][:1])["params"]
        num_params = int(sum(np.size(x) for x in jax.tree.leaves(params0)))
        logging.info("%s: %s, %d parameters", name, net.model.to_dict(), num_params)
        start = time.perf_counter()
        runs = [train_and_measure(model, params0, data, loss, net, config)
                for loss in config.losses]
        out["networks"][name] = {"model": net.model.to_dict(), "num_params": num_params,
                                 "curvature_examples": runs[0]["moments"][0]["num_examples"],
                                 "num_steps": net.num_steps,
                                 "lanczos_order": net.lanczos_order, "top_k": net.top_k,
                                 "runs": runs, "seconds": time.perf_counter() - start}
    return out


# ----------------------------------------------------------------------------- outputs


def _g(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def _value(value, converged) -> str:
    """A value with a mark where its pair missed the residual bound."""
    return f"{value:.4g}" + ("" if converged else "*")


def split_table(result: dict) -> str:
    """One row per network x loss x moment: loss and accuracy on the sample, the top and the
    smallest eigenvalue of H, G and R (* where the residual missed tol), the SLQ sums of the
    negative eigenvalues, and the split of H's most negative direction."""
    header = ["network", "loss", "step", "sample loss", "acc", "top H", "top G", "top R",
              "min H", "min G", "min R", "neg. sum H", "neg. sum G", "neg. sum R",
              "v^T G v", "v^T R v"]
    rows = []
    for net, block in result["networks"].items():
        for run in block["runs"]:
            for m in run["moments"]:
                h, g, r = m["hessian"], m["gauss_newton"], m["residual"]
                s = m["hessian_smallest_split"]
                rows.append([net, run["loss"], m["step"], f"{m['loss']:.3g}",
                             f"{m['accuracy']:.1%}",
                             *(_value(x["top"][0], x["top_converged"][0]) for x in (h, g, r)),
                             *(_value(x["smallest"], x["smallest_converged"]) for x in (h, g, r)),
                             *(f"{x['negative_sum']:.3g}" for x in (h, g, r)),
                             f"{s['gauss_newton']:.3g}", f"{s['residual']:.3g}"])
    return markdown_table(header, rows)


def residual_table(result: dict) -> str:
    """The largest relative residual among the reported eigenvalues of each matrix, per run."""
    header = ["network", "loss", "step", "H top-k max residual", "G top-k max residual",
              "R top max residual", "min H residual", "min G residual", "min R residual"]
    rows = []
    for net, block in result["networks"].items():
        for run in block["runs"]:
            for m in run["moments"]:
                h, g, r = m["hessian"], m["gauss_newton"], m["residual"]
                rows.append([net, run["loss"], m["step"],
                             *(f"{max(x['top_residual']):.1e}" for x in (h, g, r)),
                             *(f"{x['smallest_residual']:.1e}" for x in (h, g, r))])
    return markdown_table(header, rows)


def outlier_table(result: dict) -> str:
    """Per network x loss x moment: the outliers of H and G above the bulk (largest gap, with
    the gap's ratio), G's bulk edge, how many of G's top pairs met tol, and how much of G's
    outliers the class-mean Gram matrix and its per-output part (for each output k, the mean of
    the k-th logit's gradient over all classes) hold: their eigenvalues over G's at rank 1 and
    at the rank of G's last outlier."""
    header = ["network", "loss", "step", "H outliers (gap)", "G outliers (gap)", "G bulk edge",
              "top pairs within tol (H, G)", "class-mean Gram outliers (gap)",
              "Gram / G (rank 1, last outlier)", "per-output means / G (rank 1, last outlier)"]
    rows = []
    for net, block in result["networks"].items():
        for run in block["runs"]:
            for m in run["moments"]:
                h, g = m["hessian"]["outliers"], m["gauss_newton"]["outliers"]
                conv = m["gauss_newton"]["top_converged"]
                hconv = m["hessian"]["top_converged"]
                gtop = m["gauss_newton"]["top"]
                cm = m.get("class_means")
                if cm:
                    k = g["count"] or 1
                    gram_cell = f"{cm['outliers']['count']} ({cm['outliers']['ratio']:.2f})"
                    held = f"{cm['all'][0] / gtop[0]:.2f}, {cm['all'][k - 1] / gtop[k - 1]:.2f}"
                    per_output = (f"{cm['output'][0] / gtop[0]:.2f}, "
                                  f"{cm['output'][k - 1] / gtop[k - 1]:.2f}")
                else:
                    gram_cell = held = per_output = "-"
                rows.append([net, run["loss"], m["step"], f"{h['count']} ({h['ratio']:.2f})",
                             f"{g['count']} ({g['ratio']:.2f})", _g(g["edge"]),
                             f"{sum(hconv)}, {sum(conv)} of {len(conv)}", gram_cell, held,
                             per_output])
    return markdown_table(header, rows)


def density_figure(result: dict, path: str) -> None:
    """SLQ densities of H, G and R: a row per network x loss, a column per moment."""
    pyplot = plt()
    cells = [(net, run) for net, block in result["networks"].items() for run in block["runs"]]
    cols = max(len(run["moments"]) for _, run in cells)
    fig, axes = pyplot.subplots(len(cells), cols, figsize=(4.2 * cols, 2.4 * len(cells)),
                                squeeze=False)
    colors = {"hessian": "black", "gauss_newton": "tab:blue", "residual": "tab:red"}
    for row, (net, run) in enumerate(cells):
        for col, m in enumerate(run["moments"]):
            ax = axes[row, col]
            for matrix, color in colors.items():
                d = m[matrix]["density"]
                density = np.maximum(np.asarray(d["density"]), 1e-12)
                ax.semilogy(d["grid"], density, color=color, lw=0.9,
                            label=MATRIX_NAMES[matrix])
            ax.set_ylim(1e-6, None)
            ax.axvline(0, color="gray", lw=0.5)
            ax.set_title(f"{net}, {run['loss']}, step {m['step']}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    sizes = ", ".join(f"{net} {block['curvature_examples']:.0f}"
                      for net, block in result["networks"].items())
    fig.suptitle(f"SLQ densities of H, G = J^T H_out J and R = H - G on fixed samples of "
                 f"{result['dataset']} training images ({sizes})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    pyplot.close(fig)


def outlier_figure(result: dict, path: str) -> None:
    """The top eigenvalues of H, G and the class-mean Gram matrix, log scale, with G's bulk
    edge: a row per network x loss, a column per moment."""
    pyplot = plt()
    cells = [(net, run) for net, block in result["networks"].items() for run in block["runs"]]
    cols = max(len(run["moments"]) for _, run in cells)
    fig, axes = pyplot.subplots(len(cells), cols, figsize=(3.4 * cols, 2.3 * len(cells)),
                                squeeze=False)
    for row, (net, run) in enumerate(cells):
        for col, m in enumerate(run["moments"]):
            ax = axes[row, col]
            for key, color, label in (("hessian", "black", "H"),
                                      ("gauss_newton", "tab:blue", "G")):
                top = np.asarray(m[key]["top"])
                ax.semilogy(np.arange(1, top.size + 1)[top > 0], top[top > 0], "o", ms=3,
                            color=color, mfc="none" if key == "hessian" else color, label=label)
            if "class_means" in m:
                gram = np.asarray(m["class_means"]["all"][:len(m["gauss_newton"]["top"])])
                ax.semilogy(np.arange(1, gram.size + 1)[gram > 0], gram[gram > 0], "x", ms=4,
                            color="tab:green", label="class-mean Gram")
            edge = m["gauss_newton"]["outliers"]["edge"]
            if edge:
                ax.axhline(edge, color="tab:blue", ls=":", lw=0.8)
            ax.set_title(f"{net}, {run['loss']}, step {m['step']}", fontsize=8)
            ax.tick_params(labelsize=7)
            if row == len(cells) - 1:
                ax.set_xlabel("rank", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    pyplot.close(fig)


def merge_results(parts: list[dict]) -> dict:
    """One study from results of the same setup over different networks (e.g. run in separate
    processes with `only`): the first part's fields with every part's networks.

    Raises:
      ValueError: the parts differ in anything but their networks, or share a network.
    """
    first = dict(parts[0])
    first.pop("split_table", None), first.pop("residual_table", None)
    first.pop("outlier_table", None)
    networks = dict(first["networks"])
    for part in parts[1:]:
        differ = sorted(k for k in ("dataset", "num_train", "learning_rate", "batch_size", "tol")
                        if first.get(k) != part.get(k))
        if differ:
            raise ValueError(f"studies of different setups cannot be merged: {differ} differ")
        shared = sorted(set(networks) & set(part["networks"]))
        if shared:
            raise ValueError(f"studies to merge share networks {shared}; expected distinct ones")
        networks.update(part["networks"])
    return dict(first, networks=networks)


def write_outputs(result: dict, workdir: str) -> dict:
    """results.json (with the tables), densities.png and outliers.png in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    result = dict(result, split_table=split_table(result), residual_table=residual_table(result),
                  outlier_table=outlier_table(result))
    write_json(os.path.join(workdir, "results.json"), finite_or_none(result))
    density_figure(result, os.path.join(workdir, "densities.png"))
    outlier_figure(result, os.path.join(workdir, "outliers.png"))
    return result
