"""Cost of a Hessian-vector product over a gradient, and ours against PyTorch's HVP.

  python -m benchmarks.hessian [--models=cnn,lenet5,resnet18] [--batch_size=128]
  python -m benchmarks.hessian --pyhessian    (needs `pip install pyhessian`)

Ours: forward-over-reverse (`jax.jvp` of `jax.grad`) on flattened parameters, BatchNorm on
running statistics. PyTorch: double backward (`autograd.grad` with create_graph=True, then the
gradient of g.v). Same model, batch and float32 in both, timed in alternating rounds.

--pyhessian: accuracy side by side with PyHessian (Yao et al.) on the small CNN of
docs/curvature.md, the same weights in both, float64: one HVP, the top three eigenvalues and the
trace against the exact Hessian's, with the products each spent.
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


def _torch_small_cnn(torch):
    """docs/curvature.md's SmallCNN in torch: conv 4 3x3 SAME, tanh, dense 3 on the NHWC-ordered
    flattening."""

    class SmallCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.dense = torch.nn.Linear(144, 3)

        def forward(self, x):
            x = torch.tanh(self.conv(x))
            return self.dense(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))

    return SmallCNN()


def pyhessian_side_by_side(jax, torch, smoothing: float = 0.1) -> dict:
    """PyHessian's defaults (and a tight tolerance) against `Curvature` and the exact Hessian."""
    import sys

    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from jax.flatten_util import ravel_pytree
    from pyhessian import hessian as PyHessian  # noqa: N812 (its class name)

    from dlassign.analysis.hessian import Curvature

    pyhessian_module = sys.modules["pyhessian.hessian"]
    torch.set_default_dtype(torch.float64)

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x))
            return nn.Dense(3, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))

    model = SmallCNN()
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(64, 6, 6, 1)), rng.integers(0, 3, 64)
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]

    def loss_fn(params, batch):
        x, y = batch
        targets = optax.smooth_labels(jax.nn.one_hot(y, 3), smoothing)
        return optax.softmax_cross_entropy(model.apply({"params": params}, x), targets).mean()

    flat, unravel = ravel_pytree(params)
    exact = np.linalg.eigvalsh(np.asarray(jax.hessian(
        lambda f: loss_fn(unravel(f), (images, labels)))(flat)))[::-1]

    net = _torch_small_cnn(torch)
    to_torch = {"conv.weight": (params["Conv_0"]["kernel"], (3, 2, 0, 1)),
                "conv.bias": (params["Conv_0"]["bias"], None),
                "dense.weight": (params["Dense_0"]["kernel"], (1, 0)),
                "dense.bias": (params["Dense_0"]["bias"], None)}
    net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(
        np.asarray(a).transpose(t) if t else np.asarray(a))) for k, (a, t) in to_torch.items()})
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    data = (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))

    products = [0]
    plain = pyhessian_module.hessian_vector_product

    def counted(*a, **k):
        products[0] += 1
        return plain(*a, **k)

    pyhessian_module.hessian_vector_product = counted
    torch.manual_seed(0)
    theirs = PyHessian(net, criterion, data=data, cuda=False)
    curvature = Curvature(loss_fn, params, [(images, labels)])

    v = [torch.randn_like(p) for p in net.parameters()]  # conv kernel, bias, dense kernel, bias
    their_hv = [t.detach().numpy() for t in plain(theirs.gradsH, theirs.params, v)]
    ours_hv = curvature.hvp({"Conv_0": {"kernel": jnp.asarray(v[0].numpy().transpose(2, 3, 1, 0)),
                                        "bias": jnp.asarray(v[1].numpy())},
                             "Dense_0": {"kernel": jnp.asarray(v[2].numpy().T),
                                         "bias": jnp.asarray(v[3].numpy())}})
    ours_hv = [np.asarray(ours_hv["Conv_0"]["kernel"]).transpose(3, 2, 0, 1),
               np.asarray(ours_hv["Conv_0"]["bias"]), np.asarray(ours_hv["Dense_0"]["kernel"]).T,
               np.asarray(ours_hv["Dense_0"]["bias"])]
    rows = [{"what": "one HVP, max |difference| / max |Hv|",
             "pyhessian": max(float(np.abs(a - b).max()) for a, b in zip(ours_hv, their_hv))
             / max(float(np.abs(b).max()) for b in their_hv)}]

    def spent(f):
        products[0] = 0
        before = curvature.products
        out = f()
        return out, products[0] + curvature.products - before

    defaults, n_default = spent(lambda: theirs.eigenvalues(top_n=3)[0])
    tight, n_tight = spent(lambda: theirs.eigenvalues(top_n=3, maxIter=2000, tol=1e-10)[0])
    ours, n_ours = spent(lambda: curvature.eigenvalues(top_k=3))
    for what, values, n in (("PyHessian eigenvalues(top_n=3), defaults", defaults, n_default),
                            ("PyHessian, maxIter=2000, tol=1e-10", tight, n_tight),
                            ("Curvature.eigenvalues(3)", ours.values, n_ours)):
        rows.append({"what": what, "values": list(np.asarray(values, np.float64)),
                     "max_error": float(np.abs(np.asarray(values) - exact[:3]).max()),
                     "products": n})
    trace_theirs, n_trace = spent(lambda: theirs.trace())
    trace_ours, n_trace_ours = spent(lambda: curvature.trace(rel_tol=0.05))
    rows.append({"what": "PyHessian trace(), defaults", "value": float(np.mean(trace_theirs)),
                 "standard_error": float(np.std(trace_theirs, ddof=1)
                                         / np.sqrt(len(trace_theirs))),
                 "error": float(np.mean(trace_theirs) - exact.sum()), "products": n_trace})
    rows.append({"what": "Curvature.trace(rel_tol=0.05)", "value": trace_ours.value,
                 "standard_error": trace_ours.standard_error,
                 "error": trace_ours.value - float(exact.sum()), "products": n_trace_ours})
    pyhessian_module.hessian_vector_product = plain
    return {"exact_top3": list(exact[:3]), "exact_trace": float(exact.sum()), "rows": rows}


def main():
    args = parse(__doc__, models="cnn,lenet5,resnet18", extra=lambda p: p.add_argument(
        "--pyhessian", action="store_true", help="accuracy side by side with PyHessian"))
    jax = start_jax(1)
    import torch

    if args.pyhessian:
        jax.config.update("jax_enable_x64", True)
        out = pyhessian_side_by_side(jax, torch)
        print(f"exact: top three {np.round(out['exact_top3'], 6).tolist()}, "
              f"trace {out['exact_trace']:.4f}")
        for row in out["rows"]:
            print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else
                             f"{k} {np.round(v, 6).tolist()}" if isinstance(v, list) else
                             f"{k} {v}" for k, v in row.items()))
        return

    rows = [measure(jax, torch, name, args) for name in args.models.split(",")]
    print(f"\nbatch {args.batch_size}, float32, one CPU device (XLA threads over all cores)\n")
    report(rows, [("model", "model", "{}"), ("grad ms", "grad_ms", "{:.1f}"),
                  ("HVP ms", "hvp_ms", "{:.1f}"), ("HVP / grad", "hvp_over_grad", "{:.2f}x"),
                  ("PyTorch HVP ms", "torch_hvp_ms", "{:.1f}"),
                  ("PyTorch HVP / grad", "torch_hvp_over_grad", "{:.2f}x"),
                  ("ours vs PyTorch HVP", "speedup", "{:.2f}x")], args.json)


if __name__ == "__main__":
    main()
