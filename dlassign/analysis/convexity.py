"""Questions 1 and 2: is the training problem convex? Measured with exact float64 Hessians.

Question 1, logistic regression z = w.x + b: cross-entropy's Hessian is X~^T S X~ / n with
S = diag(p(1-p)) >= 0, so it is convex everywhere; MSE on sigmoid(z) has the per-example second
derivative 2p(1-p)[p(1-p) + (p-y)(1-2p)] (2p(1-p)^2(3p-1) for y = 1), negative for p < 1/3.

Question 2, deep linear networks z = w_L^T W_{L-1} ... W_1 x with at least one hidden layer:
negating W_1 and W_2 leaves the function unchanged, and the midpoint of the two parameter points
has W_1 = W_2 = 0, hence z = 0 for every input. Any point whose loss is below the loss of the
zero predictor therefore violates convexity, for cross-entropy and MSE alike.

Every statement the report makes comes from the measurements gathered here; the answers are
derived from them, not written in.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree
from scipy.special import expit

from dlassign.analysis.hessian import exact_hessian, flatten_loss
from dlassign.data import dataset_info, load_split
from dlassign.errors import NumericalError
from dlassign.models import DeepLinear, LogisticRegression
from dlassign.training.losses import get_loss

LOSS_NAMES = ("cross_entropy", "mse")


@dataclasses.dataclass(frozen=True)
class BinaryData:
    """x: float64[N, D] features; y: float64[N] labels in {0, 1}; a description for the report."""

    x: np.ndarray
    y: np.ndarray
    description: str


def load_binary_data(cfg) -> BinaryData:
    """Two classes of a registered dataset (pixels in [0, 1], flattened), or Gaussian blobs.

    cfg fields: name (a dataset such as 'digits' or 'mnist', or 'synthetic'), data_dir,
    classes (negative, positive),
    max_examples (0: all; a stratified-by-order prefix of the training split otherwise),
    synthetic_examples, synthetic_dim, synthetic_separation, seed.
    """
    if cfg.name == "synthetic":
        rng = np.random.default_rng(cfg.seed)
        n, d = cfg.synthetic_examples, cfg.synthetic_dim
        y = (np.arange(n) % 2).astype(np.float64)
        mean = np.zeros(d)
        mean[0] = cfg.synthetic_separation / 2
        x = rng.normal(size=(n, d)) + np.where(y[:, None] == 1, mean, -mean)
        return BinaryData(x, y, f"{n} Gaussian points in {d} dimensions, means "
                                f"+-{cfg.synthetic_separation / 2:g} e_1, unit covariance")
    split = load_split(cfg.name, "train", cfg.get("data_dir") or None)
    neg, pos = cfg.classes
    keep = np.flatnonzero((split.labels == neg) | (split.labels == pos))
    if cfg.get("max_examples", 0):
        keep = keep[: cfg.max_examples]
    x = split.images[keep].reshape(keep.size, -1).astype(np.float64) / 255.0
    y = (split.labels[keep] == pos).astype(np.float64)
    spec = dataset_info(cfg.name)
    return BinaryData(x, y, f"{cfg.name} training images of classes {spec.class_name(neg)} "
                            f"(label 0) and {spec.class_name(pos)} (label 1): {keep.size} "
                            f"examples, {x.shape[1]} pixel features scaled to [0, 1]")


def mean_loss(model, loss: str, data: BinaryData) -> Callable:
    """params -> mean loss of `model` (scalar logit) on all of `data`."""
    loss_fn = get_loss(loss, binary=True)
    x, y = jnp.asarray(data.x), jnp.asarray(data.y)
    return lambda params: loss_fn(model.apply({"params": params}, x), y).mean()


def eig_extremes(hessian: np.ndarray) -> tuple[float, float]:
    values = np.linalg.eigvalsh(hessian)
    return float(values[0]), float(values[-1])


def gradient_descent(f: Callable, x0: jax.Array, lr: float, steps: int, every: int,
                     accuracy: Callable, lr_field: str = "lr") -> dict:
    """Full-batch gradient descent on a flat vector, as one `lax.scan`.

    Raises:
      NumericalError: the iterates became non-finite; names the step and `lr_field`.

    Returns:
      loss, accuracy, grad_norm per step (float64[steps + 1], index 0 is the start), and the
      iterates every `every` steps (float64[steps // every + 1, P]).
    """
    run = _descent(f, accuracy, lr, steps, every)
    loss, acc, gnorm, snapshots = jax.device_get(run(x0))
    bad = np.flatnonzero(~np.isfinite(loss) | ~np.isfinite(gnorm))
    if bad.size:
        raise NumericalError(f"gradient descent diverged at step {int(bad[0])} with "
                             f"{lr_field}={lr}; lower it (the data's curvature is too high "
                             "for this step size)")
    return {"loss": loss, "accuracy": acc, "grad_norm": gnorm, "snapshots": snapshots}


@functools.lru_cache(maxsize=32)
def _descent(f: Callable, accuracy: Callable, lr: float, steps: int, every: int) -> Callable:
    """The jitted descent from a starting vector: one program per loss and schedule, shared
    by every start (the logistic study runs each loss from five)."""
    value_and_grad = jax.value_and_grad(f)

    def body(x, _):
        loss, g = value_and_grad(x)
        return x - lr * g, (x, loss, accuracy(x), jnp.linalg.norm(g))

    @jax.jit
    def run(x0):
        x_end, (xs, loss, acc, gnorm) = jax.lax.scan(body, x0, None, length=steps)
        loss_end, g_end = value_and_grad(x_end)
        return (jnp.append(loss, loss_end), jnp.append(acc, accuracy(x_end)),
                jnp.append(gnorm, jnp.linalg.norm(g_end)),
                jnp.concatenate([xs[::every], x_end[None]]))

    return run


def first_step_reaching(values: np.ndarray, target: float, below: bool = True) -> int | None:
    hit = np.flatnonzero(values <= target if below else values >= target)
    return int(hit[0]) if hit.size else None


def target_loss(loss: str, probability: float) -> float:
    """The loss of a classifier giving every example `probability` on its correct class."""
    return float(-np.log(probability) if loss == "cross_entropy" else (1 - probability) ** 2)


# ------------------------------------------------------------------------------- question 1


def mse_second_derivative(p: np.ndarray, y: float) -> np.ndarray:
    """d^2/dz^2 (sigmoid(z) - y)^2 as a function of p = sigmoid(z)."""
    return 2 * p * (1 - p) * (p * (1 - p) + (p - y) * (1 - 2 * p))


def logistic_study(cfg, data: BinaryData) -> dict:
    """Exact Hessian spectra of logistic regression under CE and MSE at many parameter points."""
    model = LogisticRegression()
    params0 = jax.tree.map(lambda a: a.astype(jnp.float64),
                           model.init(jax.random.PRNGKey(0), jnp.asarray(data.x[:1]))["params"])
    losses = {name: flatten_loss(mean_loss(model, name, data), params0) for name in LOSS_NAMES}
    _, x0, unravel = losses["cross_entropy"]
    dim = int(x0.size)
    logits = jax.jit(lambda x: model.apply({"params": unravel(x)}, jnp.asarray(data.x)))
    jacobian = np.asarray(jax.jacobian(logits)(x0))  # z = J theta: constant, [N, P]
    accuracy = lambda x: jnp.mean((logits(x) > 0) == (jnp.asarray(data.y) > 0.5))
    hessians = {name: jax.jit(lambda x, f=f: exact_hessian(f, x))
                for name, (f, _, _) in losses.items()}

    # The CE minimiser's direction (long GD from zero) orients slices and saturated points.
    ce = gradient_descent(losses["cross_entropy"][0], jnp.zeros(dim), cfg.lr,
                          cfg.reference_steps, cfg.reference_steps, accuracy, "logistic.lr")
    direction = ce["snapshots"][-1] / np.linalg.norm(ce["snapshots"][-1])

    # Parameter points: random at several scales, saturated along +-direction, and trajectories.
    rng = np.random.default_rng(cfg.seed)
    points: list[tuple[str, float, np.ndarray]] = []
    for scale in cfg.random_scales:
        for _ in range(cfg.points_per_scale):
            points.append(("random", float(scale), scale * rng.normal(size=dim) / np.sqrt(dim)))
    for c in cfg.saturated_scales:
        for sign in (1.0, -1.0):
            points.append(("saturated", float(sign * c), sign * c * direction))
    training = {}
    starts = {"zero": np.zeros(dim)}
    for s in range(cfg.train_seeds):
        starts[f"random{s}"] = cfg.init_scale * np.random.default_rng(
            cfg.seed + 1 + s).normal(size=dim) / np.sqrt(dim)
    starts["saturated"] = -cfg.saturated_init * direction
    for loss in LOSS_NAMES:
        f = losses[loss][0]
        training[loss] = {}
        for start_name, start in starts.items():
            run = gradient_descent(f, jnp.asarray(start), cfg.lr, cfg.train_steps,
                                   cfg.snapshot_every, accuracy, "logistic.lr")
            training[loss][start_name] = run
            points.extend((f"trajectory:{loss}:{start_name}", float(i * cfg.snapshot_every), p)
                          for i, p in enumerate(run["snapshots"]))

    # Exact spectra at every point; closed forms checked against autodiff at every point.
    # Autodiff forms sigmoid'(z) with an absolute (not relative) round-off of ~1e-16, so where
    # the sigmoid saturates a true eigenvalue of 0 can come out as -1e-18 while the largest is
    # 1e-8. Round-off is judged against the larger of the point's largest |eigenvalue| and the
    # curvature scale of the problem, lambda_max(J^T J / n) / 4 (the CE Hessian at p = 1/2).
    curvature_scale = float(np.linalg.eigvalsh(jacobian.T @ jacobian / data.y.size)[-1] / 4)
    summary = {name: {"min_eigenvalue": np.inf, "max_eigenvalue": -np.inf, "num_points": 0,
                      "num_negative": 0, "most_negative_point": None,
                      "closed_form_max_abs_error": 0.0, "min_relative_eigenvalue": np.inf}
               for name in LOSS_NAMES}
    per_point = []
    y = data.y
    for kind, scale, point in points:
        z = jacobian @ point
        p = expit(z)
        # p(1 - p) as sigmoid(z) sigmoid(-z): no cancellation, so this matrix is PSD exactly.
        closed = {"cross_entropy": jacobian.T @ (jacobian * (p * expit(-z))[:, None]) / y.size,
                  "mse": jacobian.T @ (jacobian * mse_second_derivative(p, y)[:, None]) / y.size}
        row = {"kind": kind, "scale": scale}
        for name in LOSS_NAMES:
            h = np.asarray(hessians[name](jnp.asarray(point)))
            lo, hi = eig_extremes(h)
            s = summary[name]
            err = float(np.abs(h - closed[name]).max())
            s["closed_form_max_abs_error"] = max(s["closed_form_max_abs_error"], err)
            s["num_points"] += 1
            rel = lo / max(abs(hi), curvature_scale)
            s["min_relative_eigenvalue"] = min(s["min_relative_eigenvalue"], rel)
            if rel < -cfg.eig_tolerance:
                s["num_negative"] += 1
            if lo < s["min_eigenvalue"]:
                s["min_eigenvalue"] = lo
                s["most_negative_point"] = {"kind": kind, "scale": scale,
                                            "max_eigenvalue_there": hi}
            s["max_eigenvalue"] = max(s["max_eigenvalue"], hi)
            row[name] = [lo, hi]
            row[name + "_closed_form_min"] = eig_extremes(closed[name])[0]
        per_point.append(row)
    for name in LOSS_NAMES:
        summary[name]["convex"] = summary[name]["num_negative"] == 0
        summary[name]["curvature_scale"] = curvature_scale
        summary[name]["eig_tolerance"] = cfg.eig_tolerance
        summary[name]["min_closed_form_eigenvalue"] = min(r[name + "_closed_form_min"]
                                                          for r in per_point)

    # One-dimensional slices through the origin along the CE minimiser's direction.
    ts = np.linspace(-cfg.slice_extent, cfg.slice_extent, cfg.slice_points)
    slice_fns = {n: jax.jit(jax.vmap(lambda t, f=losses[n][0]: f(t * jnp.asarray(direction))))
                 for n in LOSS_NAMES}
    slices = {n: np.asarray(slice_fns[n](jnp.asarray(ts))) for n in LOSS_NAMES}
    second_diff = {n: np.diff(slices[n], 2) for n in LOSS_NAMES}

    # The scalar second derivative in z, autodiff against the closed form, for y = 1.
    zs = np.linspace(-8, 8, 1601)
    g = jax.vmap(jax.grad(jax.grad(lambda z: (jax.nn.sigmoid(z) - 1.0) ** 2)))
    autodiff = np.asarray(g(jnp.asarray(zs)))
    closed_1d = mse_second_derivative(1 / (1 + np.exp(-zs)), 1.0)

    train_summary = {}
    for loss in LOSS_NAMES:
        target = target_loss(loss, cfg.target_probability)
        train_summary[loss] = {
            name: {"final_loss": float(r["loss"][-1]), "final_accuracy": float(r["accuracy"][-1]),
                   "initial_grad_norm": float(r["grad_norm"][0]),
                   "steps_to_target_loss": first_step_reaching(r["loss"], target),
                   "steps_to_target_accuracy": first_step_reaching(
                       r["accuracy"], cfg.target_accuracy, below=False)}
            for name, r in training[loss].items()}
        train_summary[loss]["target_loss"] = target
    return {
        "dim": dim,
        "summary": summary,
        "points": per_point,
        "training": train_summary,
        "curves": {loss: {k: {m: r[m].tolist() for m in ("loss", "accuracy", "grad_norm")}
                          for k, r in runs.items()} for loss, runs in training.items()},
        "slices": {"t": ts.tolist(), **{n: slices[n].tolist() for n in LOSS_NAMES},
                   "negative_second_differences": {
                       n: int(np.sum(second_diff[n] < -1e-12 * np.abs(slices[n]).max()))
                       for n in LOSS_NAMES}},
        "mse_second_derivative": {
            "z": zs.tolist(), "autodiff": autodiff.tolist(), "closed_form": closed_1d.tolist(),
            "max_abs_error": float(np.abs(autodiff - closed_1d).max()),
            "negative_for_z_below": float(zs[np.flatnonzero(autodiff >= 0)[0]]),
            "threshold_z": float(np.log(0.5)),  # p = 1/3  <=>  z = log(1/2)
        },
    }


# ------------------------------------------------------------------------------- question 2


def flip_first_two_layers(params: dict) -> dict:
    """Negates W_1 and W_2: the network computes the same function."""
    flipped = dict(params)
    for name in ("layer0", "layer1"):
        flipped[name] = jax.tree.map(lambda a: -a, params[name])
    return flipped


def deep_linear_study(cfg, data: BinaryData) -> list[dict]:
    """Origin spectrum, spectra at random and trained points, and a midpoint certificate."""
    rows = []
    x = jnp.asarray(data.x)
    for depth in cfg.hidden_layers:
        model = DeepLinear(hidden_sizes=(cfg.width,) * depth)
        init = jax.jit(model.init)  # one program, not every layer's operations one by one
        params0 = jax.tree.map(lambda a: a.astype(jnp.float64),
                               init(jax.random.PRNGKey(cfg.seed), x[:1].astype(jnp.float32))
                               ["params"])
        for loss in LOSS_NAMES:
            f, x0, unravel = flatten_loss(mean_loss(model, loss, data), params0)
            dim = int(x0.size)
            hessian = jax.jit(lambda v, f=f: exact_hessian(f, v))
            out = lambda v, unravel=unravel, model=model: model.apply({"params": unravel(v)}, x)
            accuracy = lambda v, out=out: jnp.mean((out(v) > 0) == (jnp.asarray(data.y) > 0.5))

            origin = np.zeros(dim)
            h0 = np.asarray(hessian(jnp.asarray(origin)))
            origin_lo, origin_hi = eig_extremes(h0)
            scale0 = max(abs(origin_lo), abs(origin_hi), 1e-300)

            # Closed form at the origin with one hidden layer: eigenvalues +-||g||, g = E[l'(0) x].
            dl = (0.5 - data.y) * (1.0 if loss == "cross_entropy" else 0.5)
            g_norm = float(np.linalg.norm((dl[:, None] * data.x).mean(0)))

            run = gradient_descent(f, x0 * cfg.init_scale, cfg.lr, cfg.train_steps,
                                   cfg.snapshot_every, accuracy, "deep_linear.lr")
            randoms = []
            for i, scale in enumerate(np.repeat(cfg.random_scales, cfg.points_per_scale)):
                key = jax.random.PRNGKey(cfg.seed + 1000 * depth + i + 1)
                fresh = init(key, x[:1].astype(jnp.float32))["params"]
                randoms.append(scale * np.asarray(ravel_pytree(fresh)[0], np.float64))
            min_random = min(eig_extremes(np.asarray(hessian(jnp.asarray(p))))[0]
                             for p in randoms)
            traj_min = [eig_extremes(np.asarray(hessian(jnp.asarray(p))))[0]
                        for p in run["snapshots"]]

            trained = unravel(jnp.asarray(run["snapshots"][-1]))
            flipped = flip_first_two_layers(trained)
            mid = jax.tree.map(lambda a, b: (a + b) / 2, trained, flipped)
            path_s = np.linspace(0, 1, 41)
            raw = jax.jit(mean_loss(model, loss, data))  # evaluated some fifty times below
            path = [float(raw(jax.tree.map(lambda a, b, s=s: (1 - s) * a + s * b, trained,
                                           flipped))) for s in path_s]
            loss_a, loss_b, loss_mid = float(raw(trained)), float(raw(flipped)), float(raw(mid))

            # Along the trained direction from the origin: descent one way, ascent another.
            last = f"layer{depth}"
            ascent = dict(trained)
            ascent[last] = jax.tree.map(lambda a: -a, trained[last])
            scaled = lambda p, t=cfg.origin_probe: jax.tree.map(lambda a: t * a, p)
            loss_origin = float(raw(unravel(jnp.zeros(dim))))
            row = {
                "hidden_layers": depth, "loss": loss, "num_params": dim,
                "origin_eigenvalues": [origin_lo, origin_hi],
                "origin_closed_form": [-g_norm, g_norm] if depth == 1 else [0.0, 0.0],
                "origin_is_strict_saddle": bool(origin_lo < -cfg.eig_tolerance * scale0 and
                                                origin_hi > cfg.eig_tolerance * scale0),
                "origin_hessian_is_zero": bool(np.abs(h0).max() <= 1e-14),
                "origin_probe": {"t": cfg.origin_probe, "loss_at_origin": loss_origin,
                                 "descent": float(raw(scaled(trained))) - loss_origin,
                                 "ascent": float(raw(scaled(ascent))) - loss_origin},
                "min_eigenvalue": float(min(min_random, min(traj_min))),
                "min_eigenvalue_random": float(min_random),
                "min_eigenvalue_trajectory": float(min(traj_min)),
                "trajectory_min_eigenvalues": [float(v) for v in traj_min],
                "final_loss": float(run["loss"][-1]),
                "final_accuracy": float(run["accuracy"][-1]),
                "midpoint": {"loss_a": loss_a, "loss_b": loss_b, "loss_mid": loss_mid,
                             "violates_convexity": bool(loss_mid > (loss_a + loss_b) / 2)},
                "path": {"s": path_s.tolist(), "loss": path},
            }
            logging.info("deep linear, %d hidden, %s: origin eigenvalues [%.3g, %.3g], min "
                         "eigenvalue %.3g, midpoint %.4f vs ends %.4f/%.4f", depth, loss,
                         origin_lo, origin_hi, row["min_eigenvalue"], loss_mid, loss_a, loss_b)
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------- answers


Q2_CHOICES = {(True, False): "a", (False, True): "b", (True, True): "c", (False, False): "d"}
Q2_TEXT = {"a": "cross-entropy only", "b": "MSE only", "c": "both", "d": "neither"}


def answers(logistic: dict, deep: list[dict]) -> dict:
    """The answers as the measurements give them.

    q1: the losses whose logistic-regression Hessian had no eigenvalue below round-off (see
    `logistic_study`) at any measured point ('cross_entropy', 'mse', 'both' or 'neither').
    q2: one midpoint whose loss exceeds the mean of its ends disproves convexity, so a loss
    guarantees it only if no depth produced such a certificate; 'a' CE, 'b' MSE, 'c' both,
    'd' neither.
    """
    convex = {n: logistic["summary"][n]["convex"] for n in LOSS_NAMES}
    q1 = {(True, False): "cross_entropy", (False, True): "mse", (True, True): "both",
          (False, False): "neither"}[(convex["cross_entropy"], convex["mse"])]
    ok = {}
    for n in LOSS_NAMES:
        rows = [r for r in deep if r["loss"] == n]
        ok[n] = not any(r["midpoint"]["violates_convexity"] for r in rows)
    return {"q1": q1, "q2": Q2_CHOICES[(ok["cross_entropy"], ok["mse"])]}


def run_study(cfg) -> dict:
    """Both questions, in float64. Returns the results dict (see experiments.convexity)."""
    with jax.enable_x64(True):
        data = load_binary_data(cfg.data)
        logging.info("question 1 on %s", data.description)
        logistic = logistic_study(cfg.logistic, data)
        logging.info("question 2 on the same data")
        deep = deep_linear_study(cfg.deep_linear, data)
    return {
        "answers": answers(logistic, deep),
        "data": data.description,
        "logistic_regression": {n: logistic["summary"][n] for n in LOSS_NAMES},
        "logistic_details": logistic,
        "deep_linear": deep,
    }
