"""A whole MNIST epoch through the input pipeline against the train step alone.

  python -m benchmarks.pipeline [--data_dir=PATH/TO/MNIST] [--model=cnn]

'step alone' feeds one batch already on the devices; 'epoch' draws every batch from the
seeded permutation, gathers the uint8 rows on the host, stacks them for the config's
`steps_per_call` steps per call and prefetches them to the devices, as experiments.train does;
both make the same calls; the two alternate for --rounds rounds (medians). A ratio near 1 means
the pipeline is not the bottleneck.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import parse, report, start_jax


def main():
    args = parse(__doc__, lambda p: (p.add_argument("--data_dir", default=""),
                                     p.add_argument("--model", default="cnn")))
    jax = start_jax(args.cpu_devices)
    import importlib

    from dlassign.data import Dataset, Normalizer, Split, train_batches
    from dlassign.runtime import parallel
    from dlassign.training.loop import call_plan, prefetch, stacked_batches
    from dlassign.training.setup import compile_steps, make_state, setup

    config = importlib.import_module(f"configs.mnist_{args.model}").get_config()
    config.batch_size = args.batch_size
    if args.data_dir:
        config.data.data_dir = args.data_dir
        data, source = None, "MNIST"
    else:
        rng = np.random.default_rng(0)
        split = Split(rng.integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8),
                      rng.integers(0, 10, 60000).astype(np.int32))
        data = Dataset("mnist", 10, split, split, Normalizer((0.0,), (1.0,)))
        source = "synthetic MNIST-shaped data"
    run = setup(config, data)
    state = make_state(run)
    step, _ = compile_steps(run, state)
    per_call = config.steps_per_call
    sharding = parallel.batch_sharding(run.mesh, int(per_call > 1))
    n = run.steps_per_epoch
    plan = list(call_plan(0, n, per_call, []))
    first = next(train_batches(run.dataset.train, args.batch_size, 0, 0, 1))
    fixed = jax.device_put(next(stacked_batches(iter([first] * per_call), [(1, per_call)],
                                                per_call)), sharding)
    state, m = step(state, fixed, np.int32(per_call))  # compile
    jax.block_until_ready(m)

    def alone():
        nonlocal state
        limiter = parallel.DispatchLimiter()
        for _, steps in plan:
            state, metrics = step(state, fixed, np.int32(steps))
            limiter(metrics["loss"])
        jax.block_until_ready(metrics["loss"])

    def epoch():
        nonlocal state
        limiter = parallel.DispatchLimiter()
        batches = stacked_batches(train_batches(run.dataset.train, args.batch_size, 0, 0, n),
                                  plan, per_call)
        for (_, steps), batch in zip(plan, prefetch(batches, sharding), strict=True):
            state, metrics = step(state, batch, np.int32(steps))
            limiter(metrics["loss"])
        jax.block_until_ready(metrics["loss"])

    times = {"step alone": [], "epoch with pipeline": []}
    for _ in range(args.rounds):  # alternating, medians: the machine's speed drifts
        for name, fn in (("step alone", alone), ("epoch with pipeline", epoch)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rows = []
    for name, samples in times.items():
        seconds = float(np.median(samples))
        rows.append({"what": name, "seconds": seconds, "rate": n * args.batch_size / seconds})
    rows.append({"what": "pipeline / step", "seconds": rows[1]["seconds"] / rows[0]["seconds"],
                 "rate": rows[1]["rate"] / rows[0]["rate"]})
    print(f"\n{args.model} on {source}: {n} steps of {args.batch_size} in {len(plan)} calls, "
          f"{run.mesh.devices.size} devices\n")
    report(rows, [("", "what", "{}"), ("seconds (ratio)", "seconds", "{:.2f}"),
                  ("examples/s (ratio)", "rate", "{:.2f}")], args.json)


if __name__ == "__main__":
    main()
