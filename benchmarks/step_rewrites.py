"""The CPU rewrites in the MNIST CNN's and LeNet-5's training steps, each against the plain
form it replaces, side by side.

  python -m benchmarks.step_rewrites [--models=cnn,lenet5] [--rounds=7] [--steps=48]

* dense: the first dense layer reads the batch-minor map where it lies
  (`kernels.BatchMinorDense`); plain: the map transposed back to [N, C*H*W], then `nn.Dense`.
* pool_first: ReLU after the max pool (`layers.activation_max_pool`); plain: ReLU, then the pool.

Both rewrites are exact (tests/test_models.py). Each variant is our training step as the
training loop runs it (`--steps_per_call` batches stacked per call), with the mnist_cnn config's
random shifts of up to 2 pixels, and with one rewrite swapped for its plain form; the variants
run alternated for --rounds rounds after one untimed call each, and the table gives the medians
in ms per step and the plain form's time over ours.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from unittest import mock

from benchmarks.common import add_steps_per_call, parse, report, start_jax

RANDOM_CROP = 2  # configs/mnist_cnn.py's shifts


def plain_forms():
    """rewrite -> the patches that put its plain form in place, for models built afterwards."""
    import flax.linen as nn
    import jax.numpy as jnp

    from dlassign.models import layers

    def flatten_dense(x, features, order="hwc", *, dtype=None, name=None):
        x = layers.nhwc(x)  # a batch-minor map back to NHWC
        if order == "chw":
            x = jnp.transpose(x, (0, 3, 1, 2))
        return nn.Dense(features, dtype=dtype, name=name)(x.reshape(x.shape[0], -1))

    def activation_max_pool(x, name, window, stride, padding=0):
        return layers.max_pool(layers.activation(name)(x), window, stride, padding)

    models = ("dlassign.models.cnn", "dlassign.models.lenet")
    return {
        "dense": [(f"{m}.flatten_dense", flatten_dense) for m in models],
        "pool_first": [(f"{m}.activation_max_pool", activation_max_pool) for m in models],
    }


def main():
    args = parse(__doc__, add_steps_per_call, models="cnn,lenet5",
                 steps=(48, "steps per round"))
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"--rounds and --steps take at least 1, got {args.rounds} and "
                         f"{args.steps}")
    jax = start_jax(args.cpu_devices)
    from benchmarks.throughput import ours

    plain = plain_forms()
    rows = []
    for name in args.models.split(","):
        runs = {}
        for variant in ("ours", *plain):
            with contextlib.ExitStack() as stack:
                for target, fn in plain.get(variant, []):
                    stack.enter_context(mock.patch(target, fn))
                run_steps, _, _ = ours(jax, name, args.batch_size, args.image_size,
                                       args.steps_per_call, RANDOM_CROP)
                run_steps(args.steps_per_call)  # traces and compiles with the patches on
                program = run_steps.compiled_text()
            if variant != "ours" and program == runs["ours"].program:
                raise SystemExit(f"{name}: the plain form of {variant!r} left the step's "
                                 "program unchanged; the patch did not reach the model")
            run_steps.program = program
            runs[variant] = run_steps
        ms = {v: [] for v in runs}
        for _ in range(args.rounds):
            for variant, run_steps in runs.items():
                t = time.perf_counter()
                run_steps(args.steps)
                ms[variant].append((time.perf_counter() - t) / args.steps * 1e3)
        mine = statistics.median(ms["ours"])
        for variant in plain:
            theirs = statistics.median(ms[variant])
            rows.append({"model": name, "rewrite": variant, "ours": mine, "plain": theirs,
                         "ratio": theirs / mine})
    print(f"\nbatch {args.batch_size}, {args.steps_per_call} steps per call, shifts of "
          f"{RANDOM_CROP} pixels; medians of {args.rounds} alternated rounds of {args.steps} "
          f"steps\n")
    report(rows, [("model", "model", "{}"), ("rewrite", "rewrite", "{}"),
                  ("ours ms/step", "ours", "{:.2f}"), ("plain form ms/step", "plain", "{:.2f}"),
                  ("plain / ours", "ratio", "{:.3f}")], args.json)


if __name__ == "__main__":
    main()
