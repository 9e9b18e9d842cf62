"""How fast an MLP training step can be at all: its matrix products alone, against whole steps.

  python -m benchmarks.matmul_floor [--models=mlp,mlp128] [--batch_size=128]

A dense network's training step is its matrix products (forward, input gradients, weight
gradients) plus elementwise work. This times those products alone, one step's worth per call in
JAX and one op each in PyTorch, on the same run, and takes the faster framework's time as the
floor: no step can take less. `floor ratio` is PyTorch's whole step over that floor, the largest
speed-up over PyTorch that any implementation could reach with these matrix kernels; `ours` and
`PyTorch` are whole steps timed as in benchmarks/throughput.py (ours `--steps_per_call` steps per
call).
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import (
    VARIANTS,
    add_steps_per_call,
    median_rate,
    parse,
    report,
    start_jax,
    timed,
)


def products(name: str, batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matrix product in one training step of VARIANTS[name] (an MLP)."""
    shape, cfg = VARIANTS[name]
    if cfg["name"] != "mlp":
        raise ValueError(f"--models: {name!r} is not an MLP; expected one of "
                         f"{', '.join(k for k, (_, c) in VARIANTS.items() if c['name'] == 'mlp')}")
    sizes = [int(np.prod(shape)), *cfg["hidden_sizes"], 10]
    out = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        out.append((batch, a, b))      # forward
        out.append((a, batch, b))      # weight gradient
        if i:
            out.append((batch, b, a))  # input gradient (none for the data)
    return out


def main():
    args = parse(__doc__, models="mlp,mlp128", extra=add_steps_per_call)
    per_call = max(args.steps_per_call, 1)
    steps = -(-args.steps // per_call) * per_call  # whole calls of ours
    jax = start_jax(args.cpu_devices)
    import jax.numpy as jnp
    import torch

    from benchmarks.throughput import ours, theirs

    rng = np.random.default_rng(0)
    rows = []
    for name in args.models.split(","):
        shapes = products(name, args.batch_size)
        pairs = [(rng.random((m, k), np.float32), rng.random((k, n), np.float32))
                 for m, k, n in shapes]
        jax_pairs = [(jnp.asarray(a), jnp.asarray(b)) for a, b in pairs]
        torch_pairs = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in pairs]
        dots = jax.jit(lambda pairs: [jnp.dot(a, b) for a, b in pairs])

        def jax_products(n, pairs=jax_pairs):
            for _ in range(n):
                out = dots(pairs)
            jax.block_until_ready(out)

        def torch_products(n, pairs=torch_pairs):
            for _ in range(n):
                [torch.mm(a, b) for a, b in pairs]

        mine, _, split = ours(jax, name, args.batch_size, steps_per_call=per_call)
        ref = theirs(torch, name, split)
        fns = {"jax": jax_products, "torch": torch_products, "ours": mine, "theirs": ref}
        for f in fns.values():
            f(per_call)
        # at least half a second per timing, in whole calls of ours, as benchmarks/throughput.py
        longest = max(timed(f, per_call) for f in fns.values()) / per_call
        n = max(steps, -(-int(0.5 / longest) // per_call) * per_call)
        ms = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                ms[k].append(timed(f, n) / n * 1e3)
        ms = {k: median_rate(v) for k, v in ms.items()}
        floor = min(ms["jax"], ms["torch"])
        flops = 2 * sum(m * k * n for m, k, n in shapes)
        rows.append({"model": name, "products": len(shapes), "gflop": flops / 1e9,
                     "jax": ms["jax"], "torch_mm": ms["torch"], "rate": flops / floor / 1e6,
                     "ours": ms["ours"], "theirs": ms["theirs"],
                     "ratio": ms["theirs"] / ms["ours"], "floor_ratio": ms["theirs"] / floor})
        print(f"{name}: products {ms['jax']:.2f} ms (JAX) / {ms['torch']:.2f} ms (PyTorch), "
              f"steps {ms['ours']:.2f} / {ms['theirs']:.2f} ms", flush=True)
    print(f"\nbatch {args.batch_size}, float32; medians of {args.rounds} interleaved rounds\n")
    report(rows, [("model", "model", "{}"), ("products", "products", "{}"),
                  ("GFLOP/step", "gflop", "{:.2f}"), ("JAX products ms", "jax", "{:.2f}"),
                  ("PyTorch products ms", "torch_mm", "{:.2f}"),
                  ("GFLOP/s at the floor", "rate", "{:.0f}"),
                  ("ours ms/step", "ours", "{:.2f}"), ("PyTorch ms/step", "theirs", "{:.2f}"),
                  ("ratio", "ratio", "{:.2f}x"), ("floor ratio", "floor_ratio", "{:.2f}x")],
           args.json)


if __name__ == "__main__":
    main()
