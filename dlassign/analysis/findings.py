"""The report's sentences that state a result, each computed from the measured numbers: what
the edge-of-stability runs did, what the Hessian spectrum shows, where the quadratic model of
the loss holds. A different outcome gives a different sentence."""

from __future__ import annotations

import numpy as np

# |ratio - 1| within this: the second difference along an eigenvector is the quadratic model's
QUADRATIC_TOLERANCE = 0.05


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


def edge_of_stability_run(run: dict, tolerance: float, every: int) -> str:
    """One run's trace in a sentence: whether and when the sharpness reached 2/eta (within
    `tolerance`), whether it overshot, was thrown back below, and where it ended, and how
    often the loss rose (measured every `every` steps)."""
    s = run["summary"]
    ratio = np.asarray(run["sharpness"], np.float64) / s["threshold"]
    head = f"{run['loss']} at eta {run['eta']:g} (2/eta = {s['threshold']:.4g}): "
    if run["diverged_at"] is not None:
        return head + f"diverged at step {run['diverged_at']}."
    losses = np.asarray(run["train_loss"], np.float64)
    rises = int(np.sum(np.diff(losses) > 0))
    loss = (f"the loss rose on {rises} of {len(losses) - 1} steps" if rises
            else "the loss fell at every step")
    if s["reach_step"] is None:
        return head + (f"the sharpness never came within {tolerance:.0%} of 2/eta (at most "
                       f"{np.nanmax(ratio):.2f} of it, {ratio[-1]:.2f} at the end); {loss}.")
    parts = [f"the sharpness reached 2/eta at step {s['reach_step']}"]
    if s["max_ratio"] > 1 + tolerance:
        parts.append(f"overshot it to {s['max_ratio']:.2f} times")
    if s["min_ratio"] < 1 - tolerance:
        parts.append(f"fell back to {s['min_ratio']:.2f} of it")
    held = round(s["within_fraction"] * s["measurements_after"]) * every
    parts.append(f"stayed within {tolerance:.0%} of it for about {_steps(held)} in all "
                 f"(the last at step {s['last_within_step']})" if s["last_within_step"]
                 is not None else f"never stayed within {tolerance:.0%} of it")
    end = ("ended below it" if ratio[-1] < 1 - tolerance else "ended above it"
           if ratio[-1] > 1 + tolerance else "ended at it")
    return head + ", ".join(parts) + f", and {end} ({ratio[-1]:.2f}); {loss}."


def edge_of_stability(result: dict) -> str:
    """The runs' outcome: how many reached 2/eta, then a sentence per run."""
    runs, tol = result["runs"], result["reach_tolerance"]
    reached = sum(r["summary"]["reach_step"] is not None and r["diverged_at"] is None
                  for r in runs)
    head = (f"In {reached} of {len(runs)} runs the sharpness reached 2/eta (within "
            f"{tol:.0%})." if reached else
            f"In none of the {len(runs)} runs did the sharpness reach 2/eta (within {tol:.0%}).")
    return " ".join([head, *(edge_of_stability_run(r, tol, result["eval_every"])
                             for r in runs)])


def spectrum(spec: dict) -> str:
    """What the spectrum says about the trained network: negative directions or none, and how
    far the top eigenvalues stand above the mean one (trace / parameters)."""
    top, low = spec["lanczos_max"], spec["lanczos_min"]
    mean = spec["trace"] / spec["num_params"]
    outliers = (f"the top eigenvalue is {spec['top_eigenvalues'][0] / mean:.3g} times the mean "
                f"one (trace / parameters = {mean:.3g})" if mean > 0
                else f"the trace is {spec['trace']:.3g}, not positive")
    if low < 0:
        return (f"The loss is not convex here: Lanczos finds negative curvature down to "
                f"{low:.4g}, {abs(low) / top:.2%} of the largest eigenvalue in size; "
                f"{outliers}.")
    return (f"Lanczos finds no negative curvature (smallest Ritz value {low:.4g}): the loss is "
            f"locally convex on this sample; {outliers}.")


def quadratic_model(check: dict, tolerance: float = QUADRATIC_TOLERANCE) -> str:
    """Where the second difference along the top eigenvector matches its eigenvalue (ratio
    within `tolerance` of 1), by step length."""
    ratios, steps = check["ratios"], check["steps"]
    held = [h for q, h in zip(ratios, steps) if abs(q - 1) <= tolerance]
    off = [(q, h) for q, h in zip(ratios, steps) if abs(q - 1) > tolerance]
    if not held:
        return (f"The quadratic model holds at none of the steps checked (no ratio within "
                f"{tolerance:.0%} of 1).")
    if not off:
        return (f"The quadratic model holds at every step checked, up to {max(held):.2g} "
                f"(every ratio within {tolerance:.0%} of 1).")
    q, h = off[int(np.argmax([abs(q - 1) for q, _ in off]))]
    return (f"The quadratic model holds (ratio within {tolerance:.0%} of 1) at steps "
            f"{', '.join(f'{x:.2g}' for x in held)}, and not at "
            f"{', '.join(f'{x:.2g}' for _, x in off)} (at {h:.2g} the ratio is {q:.3f}).")
