"""The porting check on a trained model: exported to a torch state dict and ported back
(bit-for-bit?), and, with PyTorch installed, loaded into torchvision's model (same logits in
float64?)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from dlassign.porting.convert import flax_to_torch, torch_to_flax
from dlassign.runtime.checkpoint import load_variables
from dlassign.training.setup import build_model

# Float64 logits of the same weights agree to round-off; relative to the largest logit.
LOGIT_TOLERANCE = 1e-9


def porting_check(run_dir: str, arch: str, title: str, num_classes: int = 10) -> dict:
    """Checks the newest checkpoint of `run_dir` (a model `arch`, `title` in the sentence).

    Returns:
      {tensors (in the state dict), identical (the round trip), max_logit_difference (None
       without PyTorch), text (the report's sentences)}.
    """
    variables, meta = load_variables(run_dir)  # the newest checkpoint; no data, no train state
    model = build_model(ml_collections.ConfigDict(meta["config"]), num_classes)
    sd = flax_to_torch(variables, arch)
    back = torch_to_flax(sd, arch)
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.tree.map(np.asarray, variables)), jax.tree.leaves(back)))
    out = {"tensors": len(sd), "identical": same, "max_logit_difference": None}
    text = (f"Porting check: the trained {title} exported to a torch state dict ({len(sd)} "
            f"tensors, torchvision names) and ported back is "
            f"{'bit-for-bit identical' if same else 'NOT identical'}.")
    try:
        import torch

        from dlassign.porting.torch_models import build
    except ImportError:
        return dict(out, text=text + " (PyTorch is not installed, so the torchvision comparison "
                    "is skipped; `pip install -e '.[torch]'` adds it.)\n")
    reference = build(arch, num_classes).double().eval()
    reference.load_state_dict({k: torch.from_numpy(v if v.dtype == np.int64 else
                                                   v.astype(np.float64)) for k, v in sd.items()})
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32))
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        logits = np.asarray(jax.jit(model.apply)(v64, x.transpose(0, 2, 3, 1)))
    diff = float(np.abs(logits - ref).max())
    agree = diff <= LOGIT_TOLERANCE * max(1.0, float(np.abs(ref).max()))
    return dict(out, max_logit_difference=diff,
                text=text + f" Loaded into torchvision's {title}, it gives "
                + (f"the same logits as the Flax model to {diff:.1e} in float64.\n" if agree else
                   f"logits that differ from the Flax model's by up to {diff:.1e} in float64: "
                   "the port does NOT reproduce the model.\n"))
