"""Multi-process data parallelism on one machine: steps per second and collective time.

  python -m benchmarks.scale_out [--processes=1,2,4] [--models=mlp,cnn] [--rounds=3]

Each configuration is a real multi-process run (`experiments.launch`, one CPU device per
process, JAX's distributed runtime with gloo collectives) of the library's jitted train step
at a fixed global batch, so more processes split the same work. Per step it reports the rate
and the time of one all-reduce of a gradient-sized float32 buffer across the processes (what
data parallelism adds to every step). Rounds alternate the process counts; the table gives
medians. A 2-core machine cannot show a speed-up: it shows the overhead.

`--estimate` prints, without running anything, the estimate of data-parallel scaling for
ResNet-50 at 224x224 on 8 GPUs that docs/scale-out.md quotes (gradient bytes per step against
interconnect bandwidth; an estimate, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {"mlp": {"name": "mlp", "hidden_sizes": (1024, 1024)},
          "cnn": {"name": "cnn", "dropout": 0.3}}


def worker(args) -> None:
    """One process of a run: times the train step and an all-reduce; process 0 writes JSON."""
    sys.path.insert(0, ROOT)
    from dlassign.runtime import distributed
    from dlassign.runtime.parallel import configure_cpu_devices

    configure_cpu_devices(1)
    if args.distributed:
        distributed.initialize()
    import jax
    import ml_collections
    import numpy as np

    from configs import base
    from dlassign.data import Dataset, Normalizer, Split
    from dlassign.runtime import parallel
    from dlassign.training.setup import compile_steps, make_state, setup

    config = base.get_config()
    config.model = ml_collections.ConfigDict(MODELS[args.model])
    config.batch_size = args.batch_size
    config.steps_per_call = 1
    config.mesh.num_devices = jax.device_count()
    rng = np.random.default_rng(0)
    n = args.batch_size * 4
    split = Split(rng.integers(0, 255, (n, 28, 28, 1)).astype(np.uint8),
                  (np.arange(n) % 10).astype(np.int32))
    run = setup(config, Dataset("mnist", 10, split, split, Normalizer((0.5,), (0.25,))))
    state = make_state(run)
    train_step, _ = compile_steps(run, state)
    sharding = parallel.batch_sharding(run.mesh)
    batch = parallel.global_batch({"image": split.images[:args.batch_size],
                                   "label": split.labels[:args.batch_size]}, sharding)
    one = np.int32(1)
    for _ in range(3):
        state, metrics = train_step(state, batch, one)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch, one)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)

    # The gradient all-reduce alone: every device holds a gradient-sized buffer, summed.
    size = parallel.tree_size(state.params)
    devices = run.mesh.devices.size
    stacked = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(parallel.DATA))
    local = np.ones((len(jax.local_devices()), size), np.float32)
    grads = jax.make_array_from_process_local_data(stacked, local, (devices, size))
    all_reduce = jax.jit(lambda g: g.sum(0), out_shardings=parallel.replicated(run.mesh))
    jax.block_until_ready(all_reduce(grads))
    reduce_times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(all_reduce(grads))
        reduce_times.append(time.perf_counter() - start)
    if jax.process_index() == 0:
        with open(args.json, "w") as f:
            json.dump({"processes": jax.process_count(), "params": size,
                       "step_s": statistics.median(times),
                       "all_reduce_s": statistics.median(reduce_times)}, f, allow_nan=False)


def launch(model: str, processes: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", "experiments.launch", f"--processes={processes}",
                   "--devices_per_process=1", "--", "benchmarks.scale_out", "--worker",
                   f"--model={model}", f"--batch_size={args.batch_size}",
                   f"--steps={args.steps}", f"--json={out}"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{model} on {processes} processes failed:\n{done.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def estimate() -> str:
    """Data-parallel ResNet-50 at 224x224 on 8 GPUs: ring all-reduce time per step from the
    gradient bytes and interconnect bandwidth, against the step's compute time."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp

    from dlassign.models import get_model

    model = get_model("resnet50", num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 224, 224, 3)), train=False))
    params = sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))
    gpus, grad_bytes = 8, 4 * params
    ring = 2 * (gpus - 1) / gpus * grad_bytes  # bytes each GPU sends (and receives) per step
    # 4.1 GFLOPs forward per 224x224 image, x3 for forward + backward.
    flops = 3 * 4.1e9 * 256
    rows = []
    for setup, bandwidth, tflops in [
            ("H100 SXM, NVLink 4 (~450 GB/s per direction), bf16 at ~400 TFLOP/s", 450e9, 400e12),
            ("A100 SXM, NVLink 3 (~300 GB/s), bf16 at ~150 TFLOP/s", 300e9, 150e12),
            ("A100 PCIe, PCIe 4.0 x16 (~25 GB/s achieved), bf16 at ~150 TFLOP/s", 25e9,
             150e12)]:
        comm, compute = ring / bandwidth, flops / tflops
        # XLA overlaps the all-reduce with the backward pass where it can; the bounds are
        # full overlap (max) and none (sum).
        rows.append(f"| {setup} | {1e3 * comm:.1f} ms | {1e3 * compute:.1f} ms | "
                    f"{compute / max(compute, comm):.2f} to {compute / (compute + comm):.2f} |")
    header = (f"ResNet-50: {params / 1e6:.1f}M parameters, {grad_bytes / 2**20:.0f} MiB of "
              f"float32 gradients; ring all-reduce over {gpus} GPUs sends {ring / 2**20:.0f} "
              "MiB per GPU per step; batch 256 per GPU.\n\n"
              "| 8 GPUs | all-reduce / step | compute / step | scaling efficiency (overlapped "
              "to serial) |\n|---|---|---|---|")
    return "ESTIMATE (arithmetic, not a measurement)\n\n" + header + "\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--batch_size", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds")
    p.add_argument("--estimate", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.estimate:
        print(estimate())
        return
    counts = [int(c) for c in args.processes.split(",")]
    models = args.models.split(",")
    for model in models:
        if model not in MODELS:
            raise SystemExit(f"--models: unknown {model!r}; expected some of {sorted(MODELS)}")
    runs = {(m, n): [] for m in models for n in counts}
    for r in range(args.rounds):
        for m in models:
            for n in (counts if r % 2 == 0 else counts[::-1]):
                runs[m, n].append(launch(m, n, args))
    print(f"global batch {args.batch_size}, one CPU device per process, medians of "
          f"{args.rounds} alternated rounds of {args.steps} steps\n")
    print("| model | processes | steps/s | vs 1 process | all-reduce of the gradients, ms "
          "| share of the step |\n|---|---|---|---|---|---|")
    for m in models:
        base = statistics.median(x["step_s"] for x in runs[m, counts[0]])
        for n in counts:
            step = statistics.median(x["step_s"] for x in runs[m, n])
            reduce = statistics.median(x["all_reduce_s"] for x in runs[m, n])
            print(f"| {m} ({runs[m, n][0]['params'] / 1e6:.2f}M) | {n} | {1 / step:.1f} | "
                  f"{base / step:.2f}x | {1e3 * reduce:.2f} | {reduce / step:.0%} |")


if __name__ == "__main__":
    main()
