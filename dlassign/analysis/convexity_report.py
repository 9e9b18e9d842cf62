"""The convexity study's report section and figures, written from its results dict."""

from __future__ import annotations

import os

import numpy as np

from dlassign.analysis.convexity import LOSS_NAMES, Q2_TEXT
from dlassign.report import markdown_table, plt

LABEL = {"cross_entropy": "cross-entropy", "mse": "MSE"}


def _g(x: float) -> str:
    return f"{x:.3g}"


def figures(results: dict, workdir: str) -> dict[str, str]:
    """Writes the figures; returns {name: file name relative to workdir}."""
    pyplot = plt()
    d = results["logistic_details"]
    out = {}

    fig, ax = pyplot.subplots(1, 2, figsize=(10, 3.8))
    for name, color in zip(LOSS_NAMES, ("C0", "C3")):
        pts = d["points"]
        lo = np.array([p[name][0] for p in pts])
        hi = np.array([np.abs(p[name][1]) for p in pts])
        rel = lo / np.maximum(hi, results["logistic_regression"][name]["curvature_scale"])
        ax[0].scatter(np.arange(len(pts)), rel, s=8, color=color, label=LABEL[name])
    ax[0].axhline(0, color="k", lw=0.6)
    ax[0].set_yscale("symlog", linthresh=1e-12)
    ax[0].set_xlabel("parameter point (random | saturated | trajectories)")
    ax[0].set_ylabel("min eigenvalue / max(|max|, scale)")
    ax[0].set_title("Logistic regression: smallest Hessian eigenvalue")
    ax[0].legend()
    s = d["mse_second_derivative"]
    z = np.asarray(s["z"])
    p = 1 / (1 + np.exp(-z))
    ax[1].plot(p, s["closed_form"], color="C3", label="2p(1-p)^2(3p-1), closed form")
    ax[1].plot(p[::80], s["autodiff"][::80], "k.", label="autodiff")
    ax[1].axhline(0, color="k", lw=0.6)
    ax[1].axvline(1 / 3, color="gray", ls="--", label="p = 1/3")
    ax[1].set_xlabel("p = sigmoid(z), label y = 1")
    ax[1].set_ylabel("d^2/dz^2 (p - 1)^2")
    ax[1].set_title("MSE curvature per example")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    out["eigenvalues"] = "convexity_eigenvalues.png"
    fig.savefig(os.path.join(workdir, out["eigenvalues"]), dpi=120)
    pyplot.close(fig)

    fig, ax = pyplot.subplots(1, 2, figsize=(10, 3.6))
    t = np.asarray(d["slices"]["t"])
    for i, name in enumerate(LOSS_NAMES):
        ax[i].plot(t, d["slices"][name], color=("C0", "C3")[i])
        ax[i].set_xlabel("t  (theta = t * unit CE-minimiser direction)")
        ax[i].set_title(f"{LABEL[name]} along a line: "
                        f"{d['slices']['negative_second_differences'][name]} concave steps")
    fig.tight_layout()
    out["slices"] = "convexity_slices.png"
    fig.savefig(os.path.join(workdir, out["slices"]), dpi=120)
    pyplot.close(fig)

    fig, ax = pyplot.subplots(1, 3, figsize=(13, 3.6))
    for name, ls in zip(LOSS_NAMES, ("-", "--")):
        for start, color in (("zero", "C0"), ("random0", "C2"), ("saturated", "C3")):
            c = d["curves"][name][start]
            label = f"{LABEL[name]}, {start} start"
            ax[0].plot(c["loss"], ls=ls, color=color, label=label)
            ax[1].plot(c["accuracy"], ls=ls, color=color)
            ax[2].plot(c["grad_norm"], ls=ls, color=color)
    ax[0].set_yscale("log")
    ax[2].set_yscale("log")
    for a, title in zip(ax, ("training loss", "training accuracy", "gradient norm")):
        a.set_xlabel("gradient-descent step")
        a.set_title(title)
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    out["training"] = "convexity_training.png"
    fig.savefig(os.path.join(workdir, out["training"]), dpi=120)
    pyplot.close(fig)

    rows = results["deep_linear"]
    fig, ax = pyplot.subplots(1, len(LOSS_NAMES), figsize=(10, 3.6))
    for i, name in enumerate(LOSS_NAMES):
        for r in rows:
            if r["loss"] == name:
                line, = ax[i].plot(r["path"]["s"], r["path"]["loss"],
                                   label=f"{r['hidden_layers']} hidden layer(s)")
                ax[i].plot([0, 1], [r["midpoint"]["loss_a"], r["midpoint"]["loss_b"]], ls="--",
                           color=line.get_color(), lw=0.8)
        ax[i].set_xlabel("s: theta = (1 - s) theta_a + s theta_b")
        ax[i].set_title(f"deep linear, {LABEL[name]}: path (solid) above chord (dashed)")
        ax[i].legend(fontsize=8)
    fig.tight_layout()
    out["midpoint"] = "convexity_midpoint.png"
    fig.savefig(os.path.join(workdir, out["midpoint"]), dpi=120)
    pyplot.close(fig)
    return out


def line_verdict(negative: dict[str, int]) -> str:
    """Each loss along a line through the origin: convex where none of its second differences
    is negative (`negative`: their count per loss)."""
    return "Along a line through the origin, " + " and ".join(
        f"{LABEL[n]} is {'convex' if negative[n] == 0 else 'not convex'} ({negative[n]} "
        "negative second differences)" for n in LOSS_NAMES) + "."


def eigenvalue_verdict(r: dict, name: str) -> str:
    """What one loss's smallest Hessian eigenvalue says: real negative curvature, or round-off
    on a singular matrix (the closed form's smallest eigenvalue beside it)."""
    if not r["convex"]:
        return (f"{name}'s smallest eigenvalue, {_g(r['min_eigenvalue'])}, is real negative "
                f"curvature ({r['num_negative']} of {r['num_points']} points).")
    closed = r.get("min_closed_form_eigenvalue")
    return (f"{name}'s smallest eigenvalue, {_g(r['min_eigenvalue'])}, is within round-off of 0 "
            "(the Hessian is singular wherever a feature is constant, as the pixels that are 0 "
            "in every image are)"
            + (f"; its closed form has smallest eigenvalue {_g(closed)}." if closed is not None
               else "."))


def saturated_verdict(training: dict) -> str:
    """Which loss's gradient is small at the saturated start, from the measured norms."""
    ce, mse = (training[n]["saturated"]["initial_grad_norm"] for n in LOSS_NAMES)
    if mse < 1e-3 * ce:
        return f"there MSE's gradient norm is {_g(mse)} against cross-entropy's {_g(ce)}."
    return (f"yet MSE's gradient norm there, {_g(mse)}, is not small against cross-entropy's "
            f"{_g(ce)}.")


def section(results: dict, files: dict[str, str], prefix: str = "") -> str:
    """The markdown section: formal arguments beside the measured evidence."""
    a = results["answers"]
    lr = results["logistic_regression"]
    d = results["logistic_details"]
    s = d["mse_second_derivative"]
    lines = ["## Questions 1 and 2: which losses make the problem convex?\n",
             f"Data: {results['data']}. Everything in float64 with exact Hessians "
             "(`jax.hessian`, eigenvalues by `eigvalsh`).\n",
             f"**Measured answers.** Question 1: **{LABEL.get(a['q1'], a['q1'])}** makes "
             "logistic regression convex. Question 2: **("
             f"{a['q2']}) {Q2_TEXT[a['q2']]}** of the two losses guarantees a convex problem "
             "for a deep network with linear activations.\n",
             "### Question 1: logistic regression\n",
             "*Argument.* With z = w.x + b and p = sigmoid(z), one example's cross-entropy "
             "-y log p - (1 - y) log(1 - p) has d/dz = p - y and d^2/dz^2 = p(1 - p) >= 0. "
             "Since z is linear in theta = (w, b) with Jacobian x~ = (x, 1), the Hessian of the "
             "mean loss is X~^T S X~ / n with S = diag(p_i(1 - p_i)): a sum of positive "
             "semi-definite matrices, so the loss is convex on all of parameter space and every "
             "local minimum is global. With X~ of full column rank and non-separable data it is "
             "strictly convex on bounded sets and the minimiser is unique; with separable data "
             "the infimum is approached as ||w|| grows, and an L2 penalty restores a unique "
             "minimiser. MSE on the sigmoid, (p - y)^2, has d^2/dz^2 = "
             "2p(1 - p)[p(1 - p) + (p - y)(1 - 2p)], which for y = 1 is 2p(1 - p)^2(3p - 1) < 0 "
             "whenever p < 1/3; where every example sits on that side the Hessian "
             "X~^T D X~ / n has negative eigenvalues, so MSE is not convex: it has flat, "
             "saturated regions where gradient descent stalls.\n",
             "*Measured.* Exact Hessians at "
             f"{lr['cross_entropy']['num_points']} parameter points: random points at norms "
             "0.1 to 100, points far out along +-(CE-minimiser direction) where the sigmoid "
             "saturates, and the iterates of gradient-descent runs of both losses.\n"]
    rows = []
    for n in LOSS_NAMES:
        r = lr[n]
        where = r["most_negative_point"]
        rows.append([LABEL[n], _g(r["min_eigenvalue"]), _g(r["max_eigenvalue"]),
                     f"{r['num_negative']} / {r['num_points']}",
                     f"{where['kind']} (scale {where['scale']:g})",
                     _g(r["min_relative_eigenvalue"]), _g(r["closed_form_max_abs_error"]),
                     "yes" if r["convex"] else "**no**"])
    lines.append(markdown_table(
        ["loss", "min eigenvalue", "max eigenvalue", "points with negative curvature",
         "most negative at", "min relative eigenvalue", "closed form vs autodiff (max abs)",
         "convex"], rows))
    ce, mse = lr["cross_entropy"], lr["mse"]
    lines.append(
        f"\nA point counts as negative when its smallest eigenvalue is below "
        f"-{_g(ce['eig_tolerance'])} times the larger of its largest |eigenvalue| and the "
        f"curvature scale {_g(ce['curvature_scale'])} (the CE Hessian's largest eigenvalue at "
        "p = 1/2): autodiff forms p(1 - p) with an absolute round-off of about 1e-16, so at "
        "saturated points a true 0 can come out as -1e-18. "
        f"{eigenvalue_verdict(ce, 'Cross-entropy')} {eigenvalue_verdict(mse, 'MSE')} "
        "The per-example MSE curvature "
        f"turns negative below z = {s['negative_for_z_below']:.2f} on a 0.01 grid (closed form: "
        f"z = log(1/2) = {s['threshold_z']:.3f}, p = 1/3); autodiff and closed form agree to "
        f"{_g(s['max_abs_error'])}.\n")
    lines.append(f"![eigenvalues]({prefix}{files['eigenvalues']})\n")
    neg = d["slices"]["negative_second_differences"]
    lines.append(line_verdict(neg) + "\n")
    lines.append(f"![slices]({prefix}{files['slices']})\n")
    t = d["training"]
    rows = []
    for start in [k for k in t["cross_entropy"] if k != "target_loss"]:
        row = [start]
        for n in LOSS_NAMES:
            r = t[n][start]
            row += [_g(r["initial_grad_norm"]),
                    r["steps_to_target_loss"] if r["steps_to_target_loss"] is not None else "never",
                    f"{100 * r['final_accuracy']:.1f}%"]
        rows.append(row)
    lines.append(
        "*Training.* Full-batch gradient descent, same learning rate and starting points for "
        "both losses. Target loss: every example at p = 0.9 on its class "
        f"(CE {t['cross_entropy']['target_loss']:.3f}, MSE {t['mse']['target_loss']:.3f}). The "
        "saturated start is confidently wrong on every example, where MSE's gradient, "
        f"2(p - y) p(1 - p), carries the factor p(1 - p) that cross-entropy's, p - y, lacks: "
        f"{saturated_verdict(t)}\n")
    lines.append(markdown_table(
        ["start", "CE initial grad norm", "CE steps to target", "CE final accuracy",
         "MSE initial grad norm", "MSE steps to target", "MSE final accuracy"], rows))
    lines.append(f"\n![training]({prefix}{files['training']})\n")

    lines.append("### Question 2: deep linear networks\n")
    lines.append(
        "*Argument.* Let f(x) = w_L^T W_{L-1} ... W_1 x with L >= 2 (at least one hidden "
        "layer). Negating W_1 and W_2 gives theta_b, which computes the same function as theta_a, "
        "so L(theta_a) = L(theta_b) for any loss. Their midpoint has W_1 = W_2 = 0, so it predicts "
        "z = 0 for every input and has the loss of the zero predictor: log 2 for cross-entropy, "
        "1/4 for MSE on the sigmoid. Whenever some theta_a does better than that (any data where "
        "E[(y - 1/2) x] != 0), L(midpoint) > (L(theta_a) + L(theta_b)) / 2, which a convex "
        "function cannot do. This holds for CE and MSE alike, so neither loss guarantees "
        "convexity: answer (d). At the origin the gradient vanishes; with one hidden layer the "
        "Hessian there is [[0, B], [B^T, 0]] with B built from g = E[l'(0) x], whose eigenvalues "
        "are +-||g||: a strict saddle. With two or more hidden layers every second derivative "
        "at the origin contains a zero factor: the Hessian is 0, a degenerate saddle, and "
        "along t*theta_a the loss changes as t^(L) with descent one way and ascent another.\n")
    rows = []
    for r in results["deep_linear"]:
        m = r["midpoint"]
        o = r["origin_probe"]
        rows.append([r["hidden_layers"], LABEL[r["loss"]], r["num_params"],
                     f"[{_g(r['origin_eigenvalues'][0])}, {_g(r['origin_eigenvalues'][1])}]",
                     f"[{_g(r['origin_closed_form'][0])}, {_g(r['origin_closed_form'][1])}]",
                     f"{_g(o['descent'])} / +{_g(o['ascent'])}",
                     _g(r["min_eigenvalue_random"]), _g(r["min_eigenvalue_trajectory"]),
                     f"{m['loss_a']:.4g} / {m['loss_b']:.4g} / **{m['loss_mid']:.4g}**"])
    lines.append(markdown_table(
        ["hidden layers", "loss", "params", "origin eigenvalues [min, max]",
         "closed form", "loss change at t=0.1 (descent / ascent)",
         "min eigenvalue, random points", "min eigenvalue, GD iterates",
         "midpoint: L(a) / L(b) / L(mid)"], rows))
    lines.append(f"\n![midpoint]({prefix}{files['midpoint']})\n")
    return "\n".join(lines) + "\n"


def run_and_report(config, workdir: str, prefix: str = "") -> dict:
    """Runs the study and writes results.json, the figures and report.md into `workdir`.

    Returns the results with the report section under "section" (figure links get `prefix`).
    """
    from dlassign.analysis.convexity import run_study
    from dlassign.runtime.files import write_json

    os.makedirs(workdir, exist_ok=True)
    results = run_study(config)
    results["config"] = config.to_dict()
    write_json(os.path.join(workdir, "results.json"), results)
    files = figures(results, workdir)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(section(results, files))
    results["section"] = section(results, files, prefix)
    return results
