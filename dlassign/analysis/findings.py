"""The report's sentences that state a result, each computed from the measured numbers: what
the Hessian spectrum shows, where the quadratic model of the loss holds (the edge-of-stability
runs' are `sharpness.edge_of_stability_findings`). A different outcome gives a different
sentence."""

from __future__ import annotations

import numpy as np

# |ratio - 1| within this: the second difference along an eigenvector is the quadratic model's
QUADRATIC_TOLERANCE = 0.05


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
