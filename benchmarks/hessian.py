"""Cost of a Hessian-vector product over a gradient, and ours against PyTorch's HVP.

  python -m benchmarks.hessian [--models=cnn,lenet5,resnet18] [--batch_size=128]

Ours: forward-over-reverse (`jax.jvp` of `jax.grad`) on flattened parameters, BatchNorm on
running statistics. PyTorch: double backward (`autograd.grad` with create_graph=True, then the
gradient of g.v). Same model, batch and float32 in both, timed in alternating rounds.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import median_rate, model_spec, parse, report, start_jax, torch_model


def measure(jax, torch, name: str, args) -> dict:
    """Median milliseconds of grad and HVP, ours and PyTorch's, for one model."""
    import time

    import jax.numpy as jnp

    from dlassign.analysis.hessian import hvp, model_batch_loss
    from dlassign.models import get_model

    shape, cfg = model_spec(name)
    model = get_model(cfg["name"], 10, **{k: v for k, v in cfg.items() if k != "name"})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, *shape)).astype(np.float32)
    y = rng.integers(0, 10, args.batch_size).astype(np.int32)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
    batch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
    loss = model_batch_loss(model, variables, "cross_entropy")
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(variables["params"])
    f = lambda v: loss(unravel(v), batch)[0] / args.batch_size
    grad = jax.jit(jax.grad(f))
    hv = jax.jit(lambda p, v: hvp(f, p, v))
    vec = jax.random.normal(jax.random.PRNGKey(1), flat.shape)
    grad(flat).block_until_ready(), hv(flat, vec).block_until_ready()

    tm = torch_model(name).eval()
    params = [p for p in tm.parameters()]
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ty = torch.from_numpy(y.astype(np.int64))
    tv = [torch.randn_like(p) for p in params]

    def torch_grad():
        return torch.autograd.grad(torch.nn.functional.cross_entropy(tm(tx), ty), params)

    def torch_hvp():
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(tm(tx), ty), params,
                                create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, tv)), params)

    torch_grad(), torch_hvp()
    times = {k: [] for k in ("grad", "hvp", "torch_grad", "torch_hvp")}
    for _ in range(args.rounds):
        for key, fn in (("grad", lambda: grad(flat).block_until_ready()),
                        ("hvp", lambda: hv(flat, vec).block_until_ready()),
                        ("torch_grad", torch_grad), ("torch_hvp", torch_hvp)):
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[key].append((time.perf_counter() - t) / args.steps)
    m = {k: median_rate(v) for k, v in times.items()}
    return {"model": name, "grad_ms": 1e3 * m["grad"], "hvp_ms": 1e3 * m["hvp"],
            "hvp_over_grad": m["hvp"] / m["grad"], "torch_hvp_ms": 1e3 * m["torch_hvp"],
            "torch_hvp_over_grad": m["torch_hvp"] / m["torch_grad"],
            "speedup": m["torch_hvp"] / m["hvp"]}


def main():
    args = parse(__doc__, models="cnn,lenet5,resnet18")
    jax = start_jax(1)
    import torch

    rows = [measure(jax, torch, name, args) for name in args.models.split(",")]
    print(f"\nbatch {args.batch_size}, float32, one CPU device (XLA threads over all cores)\n")
    report(rows, [("model", "model", "{}"), ("grad ms", "grad_ms", "{:.1f}"),
                  ("HVP ms", "hvp_ms", "{:.1f}"), ("HVP / grad", "hvp_over_grad", "{:.2f}x"),
                  ("PyTorch HVP ms", "torch_hvp_ms", "{:.1f}"),
                  ("PyTorch HVP / grad", "torch_hvp_over_grad", "{:.2f}x"),
                  ("ours vs PyTorch HVP", "speedup", "{:.2f}x")], args.json)


if __name__ == "__main__":
    main()
