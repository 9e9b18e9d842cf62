"""Training-step throughput: dlassign against the same model in PyTorch eager, interleaved.

  python -m benchmarks.throughput [--models=mlp,cnn,lenet5,resnet18] [--batch_size=128]

Same architecture, batch, optimizer (Adam, lr 1e-3) and precision (float32) in both; each round
times `--steps` training steps of ours, then of PyTorch's (more where fewer would take under
`--min_round_s`), and the table gives the medians over `--rounds` rounds. Ours is the
library's jitted, donated train step on its default mesh (`runtime.parallel.auto_num_devices`)
fed uint8 batches, `--steps_per_call` steps per call as the training loop runs them (the
config's `steps_per_call`); PyTorch uses its default threads, one call per step.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import (
    MODELS,
    add_steps_per_call,
    input_shape,
    median_rate,
    parse,
    report,
    start_jax,
    timed,
    torch_device,
    torch_model,
    torch_sync,
)


def ours(jax, name: str, batch_size: int, image_size: int = 0, steps_per_call: int = 1,
         random_crop: int = 0):
    """run_steps(n) runs n training steps in calls of steps_per_call (batches stacked), the
    last call taking what is left, with random shifts of up to `random_crop` pixels;
    run_steps.compiled_text() is the compiled program's HLO."""
    from configs import base
    from dlassign.data import Dataset, Normalizer, Split
    from dlassign.runtime import parallel
    from dlassign.training.trainer import compile_steps, make_state, setup

    _, model_cfg = MODELS[name]
    shape = input_shape(name, image_size)
    c = base.get_config()
    c.model = dict(model_cfg)
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    c.data.random_crop = random_crop
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8),
                  rng.integers(0, 10, batch_size).astype(np.int32))
    data = Dataset("digits", 10, split, split, Normalizer((0.0,) * shape[-1], (1.0,) * shape[-1]))
    run = setup(c, data)
    state = make_state(run)
    step, _ = compile_steps(run, state)
    one = {"image": split.images, "label": split.labels}
    k = steps_per_call
    # what one call takes: the batch, or k copies of it stacked
    inputs = (jax.device_put({key: np.stack([v] * k) for key, v in one.items()},
                             parallel.batch_sharding(run.mesh, 1)) if k > 1
              else jax.device_put(one, parallel.batch_sharding(run.mesh)))
    box = {"state": state}

    def run_steps(n: int) -> None:
        limiter = parallel.DispatchLimiter()
        for first in range(0, n, k):
            box["state"], metrics = step(box["state"], inputs, np.int32(min(k, n - first)))
            limiter(metrics["loss"])
        jax.block_until_ready(metrics["loss"])

    run_steps.compiled_text = lambda: step.lower(box["state"], inputs,
                                                 np.int32(k)).compile().as_text()
    return run_steps, int(run.mesh.devices.size), split


def theirs(torch, name: str, split):
    device = torch_device(torch)
    model = torch_model(name).to(device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.from_numpy((split.images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy())
    x, y = x.to(device), torch.from_numpy(split.labels.astype(np.int64)).to(device)

    def run_steps(n: int) -> None:
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        torch_sync(torch)

    return run_steps


def main():
    def flags(p):
        p.add_argument("--min_round_s", type=float, default=0.5,
                       help="least seconds per round and side")
        add_steps_per_call(p)

    args = parse(__doc__, extra=flags)
    jax = start_jax(args.cpu_devices)
    import torch

    k = max(args.steps_per_call, 1)
    rows = []
    for name in args.models.split(","):
        mine, devices, split = ours(jax, name, args.batch_size, args.image_size, k)
        ref = theirs(torch, name, split)
        mine(k), ref(2)  # compile and warm up
        # at least --min_round_s per round and side, so that short steps are not timed in bursts
        per_step = max(timed(mine, k) / k, timed(ref, 2) / 2)
        steps = max(args.steps, int(args.min_round_s / per_step) + 1)
        steps = -(-steps // k) * k  # whole calls
        a, b = [], []
        for _ in range(args.rounds):
            a.append(args.batch_size * steps / timed(mine, steps))
            b.append(args.batch_size * steps / timed(ref, steps))
        ours_rate, torch_rate = median_rate(a), median_rate(b)
        rows.append({"model": name, "size": input_shape(name, args.image_size)[0],
                     "devices": devices, "ours": ours_rate, "torch": torch_rate,
                     "ratio": ours_rate / torch_rate, "torch_threads": torch.get_num_threads()})
        print(f"{name}: ours {ours_rate:.0f} ex/s, torch {torch_rate:.0f} ex/s", flush=True)
    print(f"\nbatch {args.batch_size}, float32, Adam, ours {k} steps per call; jax "
          f"{jax.__version__} on "
          f"{jax.device_count()} {jax.devices()[0].device_kind} devices, torch "
          f"{torch.__version__} on {torch_device(torch)}\n")
    report(rows, [("model", "model", "{}"), ("input", "size", "{}px"),
                  ("mesh devices", "devices", "{}"),
                  ("dlassign ex/s", "ours", "{:.0f}"), ("PyTorch ex/s", "torch", "{:.0f}"),
                  ("ratio", "ratio", "{:.2f}x")], args.json)


if __name__ == "__main__":
    main()
