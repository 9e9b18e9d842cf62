"""Edge of stability (Cohen, Kaur, Li, Kolter and Talwalkar, "Gradient Descent on Neural Networks
Typically Occurs at the Edge of Stability", ICLR 2021), measured.

Full-batch gradient descent (no momentum, constant step size eta) trains a small network on a
fixed stratified subset of a training split. Every `eval_every` steps the sharpness, the top
eigenvalue of the full-batch loss's Hessian, is measured by power iteration warm-started from the
previous eigenvector (the first from Lanczos; `hessian.power_iteration` on `hessian.dataset_hvp`,
through the loss of `hessian.model_batch_loss`, the one the networks train on), and at a few
points checked against a cold-started Lanczos on the same parameters. Every measurement records
its relative residual ||Hv - lambda v|| / |lambda| and whether it met `tol` (`residual`,
`converged`). The paper's finding: the sharpness rises until it
reaches 2/eta (progressive sharpening; on a quadratic, gradient descent diverges beyond it) and
then hovers at or just above 2/eta while the loss keeps falling, non-monotonically.

The functions up to `edge_of_stability_summary` are pure (the training and the Hessian-vector
product are jitted once per loss and shape); `run_study` runs the configured grid (losses x step
sizes) and `write_outputs` writes results.json, the table and the figure.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dlassign.analysis.hessian import (
    dataset_hvp,
    lanczos_eigenpairs,
    model_batch_loss,
    power_iteration,
)
from dlassign.data import datasets, prepare, stratified_subset
from dlassign.errors import ConfigError
from dlassign.models import get_model
from dlassign.models.layers import ACTIVATIONS
from dlassign.report import markdown_table, plt
from dlassign.runtime.files import finite_or_none, read_results, save_figure, write_json
from dlassign.training.config_validation import _choice, _number, check_data_dir
from dlassign.training.losses import LOSSES, get_loss
from dlassign.training.train_state import init_compiler_options

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


# ----------------------------------------------------------------------------- config


def validate_sharpness_config(config) -> None:
    """One-line `ConfigError` naming the first field of a sharpness config that cannot work."""
    _number("seed", config.get("seed", 0), low=0, integer=True)
    _choice("data.name", config.data.get("name"), datasets())
    _number("data.num_examples", config.data.get("num_examples", 0), low=0, integer=True)
    check_data_dir(config.data.name, config.data.get("data_dir", ""))
    sizes = config.model.get("hidden_sizes", ())
    if not sizes or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                            for w in sizes):
        raise ConfigError(f"model.hidden_sizes={tuple(sizes)!r} is invalid; expected one or more "
                          "positive integers")
    _choice("model.activation", config.model.get("activation"), ACTIVATIONS)
    if not config.get("step_sizes"):
        raise ConfigError("step_sizes is empty; expected e.g. {'cross_entropy': [0.02, 0.04]}")
    for loss, etas in config.step_sizes.items():
        _choice("step_sizes key", loss, LOSSES)
        if not isinstance(etas, (list, tuple)) or not etas:
            raise ConfigError(f"step_sizes.{loss}={etas!r} is invalid; expected a non-empty "
                              "list of positive step sizes")
        for eta in etas:
            _number(f"step_sizes.{loss}", eta, low=0, low_open=True)
    _number("num_steps", config.num_steps, low=1, integer=True)
    for loss, steps in config.get("num_steps_per_loss", {}).items():
        _choice("num_steps_per_loss key", loss, LOSSES)
        _number(f"num_steps_per_loss.{loss}", steps, low=1, integer=True)
    for loss in selected_losses(config):
        _choice("losses entry", loss, config.step_sizes)
    _number("eval_every", config.eval_every, low=1, integer=True)
    _number("power_iters", config.power_iters, low=2, integer=True)
    _number("tol", config.tol, low=0, high=1, low_open=True, high_open=True)
    _number("lanczos_checks", config.lanczos_checks, low=0, integer=True)
    _number("lanczos_order", config.lanczos_order, low=2, integer=True)
    _number("reach_tolerance", config.reach_tolerance, low=0, high=1, low_open=True,
            high_open=True)


def selected_losses(config) -> list[str]:
    """The losses to run: `config.losses` (comma-separated) or, where empty, every key of
    `step_sizes`, so that one config can be run a loss at a time."""
    chosen = [x.strip() for x in str(config.get("losses", "") or "").split(",") if x.strip()]
    return chosen or list(config.step_sizes.keys())


def steps_of(config, loss: str) -> int:
    """The gradient descent steps of a run of `loss`: `num_steps_per_loss[loss]` or
    `num_steps` (a loss trained with small step sizes, the square loss, needs more)."""
    return int(config.get("num_steps_per_loss", {}).get(loss, config.num_steps))


# ----------------------------------------------------------------------------- pure parts


def full_batch(config) -> tuple[dict, int, str]:
    """The fixed stratified subset of the training split as one float batch.

    Returns:
      ({"image": float32[N, H, W, C] normalised, "label": int32[N]}, number of classes,
      dataset name).
    """
    data = prepare(config.data, config.seed)
    train = data.train
    n = config.data.get("num_examples", 0) or len(train)
    if n < len(train):
        train = train.take(stratified_subset(train.labels, n / len(train), config.seed))
    images = np.asarray(data.normalizer(train.images, jnp.float32))
    return {"image": images, "label": train.labels.astype(np.int32)}, data.num_classes, data.name


def mean_loss_fn(model, loss: str) -> Callable:
    """`(params, batch) -> mean loss over the batch` (float32)."""
    per_example = get_loss(loss)

    def mean_loss(params, batch):
        return per_example(model.apply({"params": params}, batch["image"]), batch["label"]).mean()

    return mean_loss


@functools.lru_cache(maxsize=16)
def _loss_functions(model, loss: str) -> tuple[Callable, Callable]:
    """One (mean loss, batch loss) pair per model and loss, so that the runs of one loss at
    different step sizes share their compiled descent and Hessian-vector programs (the step
    size is an argument, not a constant)."""
    return mean_loss_fn(model, loss), model_batch_loss(model, {}, loss)


@functools.partial(jax.jit, static_argnums=0)
def _loss_at(mean_loss: Callable, params, batch: dict) -> jax.Array:
    return mean_loss(params, batch)


@functools.partial(jax.jit, static_argnums=(0, 4))
def gd_steps(mean_loss: Callable, params, batch: dict, eta: jax.Array, num_steps: int):
    """`num_steps` steps of full-batch gradient descent, params - eta * grad.

    Returns:
      (params after the steps, float32[num_steps] the loss before each step).
    """
    def step(p, _):
        loss, grad = jax.value_and_grad(mean_loss)(p, batch)
        return jax.tree.map(lambda w, g: w - eta * g, p, grad), loss

    return jax.lax.scan(step, params, None, length=num_steps)


@functools.partial(jax.jit, static_argnums=0)
def accuracy(model, params, batch: dict) -> jax.Array:
    """The share of `batch` that `model` (a hashable Flax module) classifies right."""
    logits = model.apply({"params": params}, batch["image"])
    return jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def edge_of_stability_summary(steps, sharpness, eta: float, tolerance: float = 0.1) -> dict:
    """What a sharpness trace says about the edge of stability.

    A mean over the measurements after the reach step mixes an overshoot with a late decline;
    the median and the window of measurements within the tolerance say which one dominates.

    Args:
      steps: the steps of the measurements, increasing.
      sharpness: the top Hessian eigenvalue at each.
      eta: the step size; the threshold is 2 / eta.
      tolerance: reaching means sharpness >= (1 - tolerance) * 2 / eta.

    Returns:
      {threshold, reach_step (the first step within `tolerance` of 2/eta, None if never),
       and from that step on: median_ratio, mean_ratio, min_ratio, max_ratio (sharpness /
       (2/eta)), within_fraction (the share of measurements within `tolerance` of 2/eta),
       first_within_step and last_within_step (the window those measurements cover),
       measurements_after; final_ratio (the last measurement's ratio, every trace);
       None where it never reached}.
    """
    steps, sharpness = np.asarray(steps), np.asarray(sharpness, np.float64)
    threshold = 2.0 / eta
    ratio = sharpness / threshold
    reached = np.flatnonzero(ratio >= 1.0 - tolerance)
    out = {"threshold": threshold, "reach_step": None, "median_ratio": None, "mean_ratio": None,
           "min_ratio": None, "max_ratio": None, "within_fraction": None,
           "first_within_step": None, "last_within_step": None, "measurements_after": 0,
           "final_ratio": float(ratio[-1]) if ratio.size else None}
    if reached.size == 0:
        return out
    after = ratio[reached[0]:]
    within = np.flatnonzero(np.abs(after - 1.0) <= tolerance)
    out.update(reach_step=int(steps[reached[0]]), median_ratio=float(np.median(after)),
               mean_ratio=float(after.mean()), min_ratio=float(after.min()),
               max_ratio=float(after.max()), within_fraction=within.size / after.size,
               first_within_step=(int(steps[reached[0] + within[0]]) if within.size else None),
               last_within_step=(int(steps[reached[0] + within[-1]]) if within.size else None),
               measurements_after=int(after.size))
    return out


# ----------------------------------------------------------------------------- the study


def train_and_measure(model, params0, batch: dict, loss: str, eta: float, config) -> dict:
    """One run: full-batch GD at step size `eta` from `params0`, the sharpness every
    `eval_every` steps (warm-started power iteration) and a Lanczos check at `lanczos_checks`
    evenly spaced measurements (the last one included)."""
    mean_loss, batch_loss = _loss_functions(model, loss)
    n = int(batch["label"].shape[0])
    every, total = config.eval_every, steps_of(config, loss)
    checks = ({int(round(total / every * (i + 1) / config.lanczos_checks)) * every
               for i in range(config.lanczos_checks)} if config.lanczos_checks else set())
    params, vector = params0, None
    steps, sharpness, iterations, losses, accuracies, lanczos_rows = [], [], [], [], [], []
    residuals, converged = [], []
    diverged_at, start = None, time.perf_counter()
    eta_arg = jnp.asarray(eta, jnp.float32)
    key = jax.random.PRNGKey(config.seed)
    for step in range(0, total + 1, every):
        matvec, x0, _ = dataset_hvp(batch_loss, params, [batch], count=n)
        calls = [0]

        def counted(v, matvec=matvec, calls=calls):
            calls[0] += 1
            return matvec(v)

        dim = int(x0.size)
        pairs = power_iteration(counted, dim, 1, jax.random.fold_in(key, step),
                                max_iters=config.power_iters, tol=config.tol, start=vector)
        vector = pairs.vectors[0]
        steps.append(step)
        sharpness.append(float(pairs.values[0]))
        residuals.append(float(pairs.residuals[0]))
        converged.append(bool(pairs.converged[0]))
        iterations.append(calls[0])
        accuracies.append(float(accuracy(model, params, batch)))
        if step in checks:
            cold = lanczos_eigenpairs(matvec, dim, 1, jax.random.fold_in(key, 10**9 + step),
                                      config.tol, config.lanczos_order)
            top = float(cold.values[0])
            lanczos_rows.append({"step": step, "power": sharpness[-1], "lanczos": top,
                                 "relative_difference": float(np.float64(sharpness[-1] - top)
                                                              / abs(top)),
                                 "power_residual": residuals[-1],
                                 "lanczos_residual": float(cold.residuals[0]),
                                 "converged": bool(converged[-1] and cold.converged[0])})
        if step == total:
            break
        if not np.isfinite(sharpness[-1]):
            diverged_at = step
            break
        params, chunk = gd_steps(mean_loss, params, batch, eta_arg, every)
        chunk = np.asarray(chunk, np.float64)
        losses.extend(chunk.tolist())
        bad = ~np.isfinite(chunk)
        if bad.any():
            diverged_at = step + int(np.argmax(bad))
            break
    if diverged_at is not None:
        logging.warning("%s eta=%g diverged at step %d", loss, eta, diverged_at)
    if not all(converged):
        logging.warning("%s eta=%g: %d of %d sharpness measurements did not reach the relative "
                        "residual %g within %d products", loss, eta, converged.count(False),
                        len(converged), config.tol, config.power_iters)
    final = float(_loss_at(mean_loss, params, batch)) if diverged_at is None else float("nan")
    if diverged_at is None:
        losses.append(final)  # the loss after the last step: losses[t] is the loss at step t
    summary = edge_of_stability_summary(steps, sharpness, eta, config.reach_tolerance)
    logging.info("%s eta=%g: sharpness %.4g -> %.4g (2/eta = %.4g), reach step %s, median "
                 "ratio after %s, final loss %.4g, %.0f s", loss, eta, sharpness[0],
                 sharpness[-1], 2 / eta, summary["reach_step"], summary["median_ratio"], final,
                 time.perf_counter() - start)
    return {"loss": loss, "eta": eta, "num_steps": total, "steps": steps, "sharpness": sharpness,
            "residual": residuals, "converged": converged,
            "iterations": iterations, "train_loss": losses, "accuracy": accuracies,
            "lanczos_checks": lanczos_rows, "diverged_at": diverged_at, "final_loss": final,
            "final_accuracy": accuracies[-1], "summary": summary,
            "trained": bool(diverged_at is None and final < losses[0]),
            "seconds": time.perf_counter() - start}


def run_study(config) -> dict:
    """Every (loss, step size) of `config` from the same initial parameters."""
    validate_sharpness_config(config)
    batch, num_classes, name = full_batch(config)
    model = get_model("mlp", num_classes=num_classes,
                      hidden_sizes=tuple(config.model.hidden_sizes),
                      activation=config.model.activation)
    # one compiled initialiser instead of every layer's draws op by op
    params0 = jax.jit(model.init, compiler_options=init_compiler_options())(
        jax.random.PRNGKey(config.seed), batch["image"][:1])["params"]
    num_params = int(sum(np.size(x) for x in jax.tree.leaves(params0)))
    logging.info("edge of stability: MLP %s (%s, %d parameters) on %d %s training examples, "
                 "full-batch GD", tuple(config.model.hidden_sizes), config.model.activation,
                 num_params, len(batch["label"]), name)
    batch = jax.device_put(batch)
    runs = [train_and_measure(model, params0, batch, loss, float(eta), config)
            for loss in selected_losses(config) for eta in config.step_sizes[loss]]
    return {"dataset": name, "num_examples": int(batch["label"].shape[0]),
            "model": {"hidden_sizes": list(config.model.hidden_sizes),
                      "activation": config.model.activation},
            "num_params": num_params, "num_steps": config.num_steps,
            "eval_every": config.eval_every, "power_iters": config.power_iters, "tol": config.tol,
            "lanczos_order": config.lanczos_order, "reach_tolerance": config.reach_tolerance,
            "runs": runs}


# ----------------------------------------------------------------------------- outputs


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _measured(r: dict, i: int) -> str:
    """The i-th sharpness of run `r` with its relative residual, marked where it did not
    converge."""
    value = f"{r['sharpness'][i]:.4g}"
    if "residual" not in r:
        return value
    flag = "" if r["converged"][i] else "not converged, "
    return f"{value} ({flag}residual {r['residual'][i]:.1e})"


def summary_table(result: dict) -> str:
    """One row per run: loss, eta, 2/eta, the sharpness at the start and end (each with its
    relative residual, marked where it did not converge), steps to reach 2/eta, the ratio
    sharpness/(2/eta) from then on (median, min, max, share within the tolerance and the window
    of steps those measurements cover), the measurements that converged, final loss and
    accuracy."""
    tol = result["reach_tolerance"]
    header = ["loss", "eta", "2/eta", "sharpness at step 0", "at the end",
              f"steps to reach 2/eta (within {tol:.0%})", "median ratio after", "min", "max",
              f"share within {tol:.0%}", f"steps within {tol:.0%} (first-last)",
              "measurements converged", "final loss", "final train acc"]
    rows = []
    for r in result["runs"]:
        s = r["summary"]
        converged = r.get("converged", [True] * len(r["sharpness"]))
        end = ("diverged at step " + str(r["diverged_at"]) if r["diverged_at"] is not None
               else _measured(r, -1) if r["trained"]
               else f"{_measured(r, -1)} (did not train: the loss rose)")
        window = ("-" if s.get("first_within_step") is None
                  else f"{s['first_within_step']}-{s['last_within_step']}")
        rows.append([r["loss"], f"{r['eta']:g}", f"{s['threshold']:.4g}", _measured(r, 0), end,
                     "not reached" if s["reach_step"] is None else s["reach_step"],
                     _fmt(s.get("median_ratio")), _fmt(s["min_ratio"]), _fmt(s["max_ratio"]),
                     _fmt(s["within_fraction"], ".0%"), window,
                     f"{sum(converged)}/{len(converged)}", _fmt(r["final_loss"], ".4g"),
                     f"{r['final_accuracy']:.2%}"])
    return markdown_table(header, rows)


def lanczos_table(result: dict) -> str:
    rows = [[r["loss"], f"{r['eta']:g}", c["step"], f"{c['power']:.6g}", f"{c['lanczos']:.6g}",
             f"{c['relative_difference']:+.2e}", _fmt(c.get("power_residual"), ".1e"),
             _fmt(c.get("lanczos_residual"), ".1e")]
            for r in result["runs"] for c in r["lanczos_checks"]]
    return markdown_table(["loss", "eta", "step", "power iteration (warm)",
                           "Lanczos (cold)", "relative difference", "power residual",
                           "Lanczos residual"], rows)


def agreement(result: dict) -> float | None:
    """The largest |power - Lanczos| / |Lanczos| over every check."""
    diffs = [abs(c["relative_difference"]) for r in result["runs"] for c in r["lanczos_checks"]]
    return max(diffs) if diffs else None


def figure(result: dict, path: str) -> None:
    """Sharpness against steps with the 2/eta lines (top) and the training loss (bottom), one
    column per loss."""
    pyplot = plt()
    losses = list(dict.fromkeys(r["loss"] for r in result["runs"]))
    fig, axes = pyplot.subplots(2, len(losses), figsize=(5.5 * len(losses), 7), squeeze=False,
                                sharex="col")
    for col, loss in enumerate(losses):
        top, bottom = axes[0, col], axes[1, col]
        for i, r in enumerate(x for x in result["runs"] if x["loss"] == loss):
            color = COLORS[i % len(COLORS)]
            top.plot(r["steps"], r["sharpness"], color=color, lw=1.2,
                     label=f"eta = {r['eta']:g}")
            top.axhline(2 / r["eta"], color=color, ls="--", lw=0.9)
            bottom.semilogy(np.arange(len(r["train_loss"])), r["train_loss"], color=color,
                            lw=0.8)
        top.set_title(f"{loss}: sharpness (solid) and 2/eta (dashed)", fontsize=10)
        top.set_ylabel("top Hessian eigenvalue")
        top.legend(fontsize=8)
        bottom.set_ylabel("training loss (full batch)")
        bottom.set_xlabel("gradient descent step")
    fig.suptitle(f"Edge of stability: MLP {tuple(result['model']['hidden_sizes'])} "
                 f"{result['model']['activation']}, {result['num_examples']} "
                 f"{result['dataset']} images, full-batch GD", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    pyplot.close(fig)


LOSS_LABELS = {"cross_entropy": "Cross-entropy", "mse": "MSE on softmax probabilities",
               "square": "The square loss on the outputs"}


def _span(values, spec: str) -> str:
    """'a' where every value formats alike, else 'a-b' (smallest to largest)."""
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}-{hi}"


def _etas(runs) -> str:
    return ", ".join(f"{r['eta']:g}" for r in runs)


def edge_of_stability_findings(result: dict) -> list[str]:
    """The study's findings as sentences, one paragraph per loss, computed from the measured
    traces (`run_study`'s result), so that a report says what this run measured and not what an
    earlier one did.

    A run "hovers at 2/eta" when, from its reach step on, its median ratio sharpness/(2/eta) is
    within the tolerance of 1 and at least half of its measurements are; it "overshoots" when
    its largest ratio exceeds 1 + tolerance; it "leaves 2/eta from below" when its last ratio is
    below 1 - tolerance.
    """
    tol = result["reach_tolerance"]
    pct = f"{tol:.0%}"
    out = []
    for loss in dict.fromkeys(r["loss"] for r in result["runs"]):
        runs = sorted((r for r in result["runs"] if r["loss"] == loss), key=lambda r: r["eta"])
        text = [f"**{LOSS_LABELS.get(loss, loss)}** (eta {_etas(runs)})."]
        first = runs[0]
        initial = f"{_span([r['sharpness'][0] for r in runs], '.4g')}"
        if "residual" in first:
            ok = all(r["converged"][0] for r in runs)
            initial += (f" ({'converged' if ok else 'not converged'}: relative residual "
                        f"{_span([r['residual'][0] for r in runs], '.1e')})")
        text.append(f"The sharpness at initialisation is {initial}; 2/eta is "
                    f"{_span([r['summary']['threshold'] for r in runs], '.4g')}.")
        failed = [r for r in runs if r["diverged_at"] is not None or not r["trained"]]
        for r in failed:
            what = (f"diverges at step {r['diverged_at']}" if r["diverged_at"] is not None
                    else "does not train (the loss rises)")
            text.append(f"At eta {r['eta']:g} (2/eta {r['summary']['threshold']:.4g}) gradient "
                        f"descent {what}.")
        trained = [r for r in runs if r not in failed]
        reached = [r for r in trained if r["summary"]["reach_step"] is not None]
        never = [r for r in trained if r["summary"]["reach_step"] is None]
        if never:
            top = max(max(r["sharpness"]) / r["summary"]["threshold"] for r in never)
            text.append(f"At eta {_etas(never)} the sharpness never comes within {pct} of 2/eta "
                        f"(largest ratio sharpness/(2/eta) {top:.2f}).")
        if reached:
            at_start = [r for r in reached if r["summary"]["reach_step"] == 0]
            later = [r for r in reached if r["summary"]["reach_step"] > 0]
            how = []
            if later:
                how.append("rises to it by step " + ", ".join(
                    f"{r['summary']['reach_step']} (eta {r['eta']:g})" for r in later))
            if at_start:
                ratios = [r["sharpness"][0] / r["summary"]["threshold"] for r in at_start]
                how.append(f"is already within {pct} of it at initialisation at eta "
                           f"{_etas(at_start)} (ratio {_span(ratios, '.2f')})")
            text.append(f"The sharpness comes within {pct} of 2/eta in {len(reached)} of "
                        f"{len(trained)} runs that trained: it " + "; it ".join(how) + ".")
            summaries = [r["summary"] for r in reached]
            windows = [f"{s['first_within_step']}-{s['last_within_step']}" for s in summaries
                       if s["first_within_step"] is not None]
            text.append(
                f"From then on the median ratio sharpness/(2/eta) is "
                f"{_span([s['median_ratio'] for s in summaries], '.2f')}, "
                f"{_span([s['within_fraction'] for s in summaries], '.0%')} of the measurements "
                f"lie within {pct} of 2/eta" + (f" (steps {', '.join(windows)})" if windows
                                                 else "") + ".")
            hover = [r for r, s in zip(reached, summaries)
                     if abs(s["median_ratio"] - 1) <= tol and s["within_fraction"] >= 0.5]
            if len(hover) == len(reached):
                text.append("Every one of these runs hovers at 2/eta.")
            elif hover:
                text.append(f"{len(hover)} of {len(reached)} hover at 2/eta (eta "
                            f"{_etas(hover)}); the others spend most of the time away from it.")
            else:
                below = all(s["median_ratio"] < 1 for s in summaries)
                text.append("None of them hovers at 2/eta: the sharpness spends most of the "
                            "time " + ("below" if below else "away from") + " it.")
            over = [r for r, s in zip(reached, summaries) if s["max_ratio"] > 1 + tol]
            if over:
                text.append(f"It overshoots 2/eta by more than {pct} in {len(over)} of "
                            f"{len(reached)} runs (up to "
                            f"{max(r['summary']['max_ratio'] for r in over):.2f} x 2/eta).")
            left = [r for r, s in zip(reached, summaries) if s["final_ratio"] < 1 - tol]
            last = reached[0]["steps"][-1]
            if left:
                text.append(f"By the last measurement (step {last}) it has left 2/eta from "
                            f"below in {len(left)} of {len(reached)} runs (final ratio "
                            f"{_span([r['summary']['final_ratio'] for r in left], '.2f')}).")
            else:
                text.append(f"At the last measurement (step {last}) it is still at or above "
                            f"{1 - tol:.2g} x 2/eta in every run (final ratio "
                            f"{_span([s['final_ratio'] for s in summaries], '.2f')}).")
        out.append(" ".join(text))
    agree = agreement(result)
    if agree is not None:
        checks = [c for r in result["runs"] for c in r["lanczos_checks"]]
        out.append(f"Power iteration agrees with a cold-started Lanczos on the same parameters "
                   f"to {agree:.1e} (relative) at the {len(checks)} points checked; "
                   f"{sum(c.get('converged', True) for c in checks)} of them converged.")
    return out


def merge_studies(parts: Sequence[dict]) -> dict:
    """One study from `run_study` results of the same setup over different runs (e.g. one per
    loss, run in separate processes): the first part's fields with every part's runs, in order.

    Raises:
      ConfigError (a ValueError): the parts differ in anything but their runs; names the
        fields.
    """
    first = parts[0]
    for part in parts[1:]:
        differ = sorted(k for k in {*first, *part} - {"runs"} if first.get(k) != part.get(k))
        if differ:
            raise ConfigError(f"studies of different setups cannot be merged: {differ} differ")
    return dict(first, runs=[r for part in parts for r in part["runs"]])


DERIVED = ("table", "lanczos_table", "power_lanczos_max_relative_difference", "findings")


def load_results(workdir: str) -> dict:
    """The `run_study` result saved in `workdir`'s results.json, without what `write_outputs`
    derives from it (so that studies run separately, e.g. a loss each, can be merged).

    Raises:
      ConfigError: no readable results.json there (`files.read_results`).
    """
    saved = read_results(workdir, "experiments.sharpness")
    return {k: v for k, v in saved.items() if k not in DERIVED}


def write_outputs(result: dict, workdir: str) -> dict:
    """results.json (with the tables) and sharpness.png in `workdir`; returns `result` with
    `table`, `lanczos_table`, `power_lanczos_max_relative_difference` and `findings` (the
    sentences of `edge_of_stability_findings`) added."""
    os.makedirs(workdir, exist_ok=True)
    result = dict(result, table=summary_table(result), lanczos_table=lanczos_table(result),
                  power_lanczos_max_relative_difference=agreement(result),
                  findings=edge_of_stability_findings(result))
    # a diverged run's losses and sharpness are NaN or infinite: null in the (strict) JSON
    write_json(os.path.join(workdir, "results.json"), finite_or_none(result))
    figure(result, os.path.join(workdir, "sharpness.png"))
    return result
