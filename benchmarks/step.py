"""The training step of every registered architecture, ours against PyTorch eager: throughput
and roofline.

  python -m benchmarks.step [--models=all] [--batch_size=128] [--steps_per_call=8]

Each model at the input its study gives it: the question-4 architectures at SVHN's 32 px (AlexNet
64 px, configs/svhn.py) with that config's SGD (Nesterov momentum 0.9, weight decay 5e-4,
gradient clipping at norm 5), the MLP and CNN at MNIST's 28 px with Adam. Both frameworks get the
same batch, optimizer and precision (float32). Each round times, alternated: our jitted, donated
train step one step per call and `--steps_per_call` steps per call (a scan), PyTorch's train
step, then our eval step and PyTorch's (`torch.inference_mode`) on `--eval_batch_size` images;
the table gives medians over `--rounds` rounds. Ours runs on its default mesh and is fed uint8
batches, which it scales inside the step; PyTorch uses its default threads and float batches
prepared beforehand. `XLA MiB` is XLA's account of the one-step train program's buffers
(arguments, outputs and temporaries, less what is donated); `benchmarks.memory` measures both
frameworks' peak resident memory in fresh processes.

The roofline table puts each training step against this machine's matrix-multiply peak, measured
in the same run: a float32 `jnp.dot` of two `--peak_size` square matrices on our first device
and `torch.mm` of the same on PyTorch's. A step's FLOPs are XLA's count (`cost_analysis`) of the
one-step train program built from XLA's own convolutions and dots (`impl='xla'`) before it is
partitioned: the model's arithmetic for the whole batch, which PyTorch's step does too, so one
count serves both (no multiplication by zero is counted: neither our CPU rewrites' nor the
kernel taps that fall on a convolution's padding).
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import (
    VARIANTS,
    add_steps_per_call,
    input_shape,
    median_rate,
    model_spec,
    parse,
    question4,
    registered,
    report,
    start_jax,
    timed,
    torch_device,
    torch_model,
    torch_sync,
)

SGD = {"name": "sgd", "learning_rate": 0.01, "momentum": 0.9, "nesterov": True,
       "weight_decay": 5e-4, "grad_clip_norm": 5.0}
ADAM = {"name": "adam", "learning_rate": 1e-3}


def optimizer(name: str) -> dict:
    """The optimizer of `name`'s study: question 4's SGD or MNIST's Adam."""
    return SGD if question4(name) else ADAM


def _run(name: str, batch_size: int, image_size: int = 0, random_crop: int = 0,
         eval_rows: int = 0, impl: str = "auto"):
    """(the trainer's Run, the random uint8 split it trains on) for `name` at its study's
    input and optimizer."""
    from configs import base
    from dlassign.data import Dataset, Normalizer, Split
    from dlassign.training.setup import setup

    _, model_cfg = model_spec(name)
    shape = input_shape(name, image_size)
    eval_rows = eval_rows or batch_size
    c = base.get_config()
    c.model = dict(model_cfg)
    c.optimizer.update(optimizer(name))
    c.batch_size = batch_size
    c.eval_batch_size = eval_rows
    c.data.random_crop = random_crop
    c.impl = impl
    rng = np.random.default_rng(0)
    rows = max(batch_size, eval_rows)
    split = Split(rng.integers(0, 256, (rows, *shape), dtype=np.uint8),
                  rng.integers(0, 10, rows).astype(np.int32))
    data = Dataset("digits", 10, split, split, Normalizer((0.0,) * shape[-1], (1.0,) * shape[-1]))
    return setup(c, data), split


def step_flops(name: str, batch_size: int, image_size: int = 0) -> float:
    """XLA's count of one training step's FLOPs for `name` built from XLA's own operations,
    taken from the program before partitioning (the whole batch), without initialising it."""
    from dlassign.training.setup import compile_steps, make_state

    run, split = _run(name, batch_size, image_size, impl="xla")
    box = {}

    class Shapes(Exception):
        pass

    def keep(abstract):  # the state's shapes and shardings are all the count needs
        box["state"] = abstract
        raise Shapes

    try:
        make_state(run, before_init=keep)
    except Shapes:
        pass
    step, _ = compile_steps(run, box["state"])
    batch = {"image": split.images[:batch_size], "label": split.labels[:batch_size]}
    return float(step.lower(box["state"], batch, np.int32(1)).cost_analysis()["flops"])


def matmul_peak(jax, torch, size: int, min_seconds: float = 0.5, rounds: int = 3
                ) -> tuple[float, float]:
    """GFLOP/s of a float32 size x size product, (JAX on its first device, PyTorch on its
    device): the best of `rounds` timings of at least `min_seconds` each, alternated."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    ja, jb = jax.device_put(a), jax.device_put(b)
    dot = jax.jit(jnp.dot)
    device = torch_device(torch)
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)

    def ours(n):
        for _ in range(n):
            out = dot(ja, jb)
        jax.block_until_ready(out)

    def theirs(n):
        for _ in range(n):
            torch.mm(ta, tb)
        torch_sync(torch)

    best = {}
    for key, fn in (("jax", ours), ("torch", theirs)):
        fn(1)
        best[key] = (max(1, int(min_seconds / timed(fn, 1)) + 1), [])
    for _ in range(rounds):
        for key, fn in (("jax", ours), ("torch", theirs)):
            n, times = best[key]
            times.append(timed(fn, n) / n)
    flops = 2.0 * size ** 3
    return flops / min(best["jax"][1]) / 1e9, flops / min(best["torch"][1]) / 1e9


def ours(jax, name: str, batch_size: int, image_size: int = 0, steps_per_call: int = 1,
         random_crop: int = 0, eval_batch_size: int = 0):
    """run_steps(n) runs n training steps in calls of steps_per_call (batches stacked), the
    last call taking what is left, with random shifts of up to `random_crop` pixels;
    run_steps.compiled_text() is the compiled program's HLO, run_steps.evaluate(n) runs n
    eval steps on `eval_batch_size` images (0: `batch_size`), run_steps.memory_mb XLA's
    account of the train program's buffers."""
    from dlassign.runtime import parallel
    from dlassign.training.setup import compile_steps, make_state

    eval_rows = eval_batch_size or batch_size
    run, split = _run(name, batch_size, image_size, random_crop, eval_rows)
    state = make_state(run)
    step, eval_step = compile_steps(run, state)
    one = {"image": split.images[:batch_size], "label": split.labels[:batch_size]}
    k = steps_per_call
    # what one call takes: the batch, or k copies of it stacked
    inputs = (jax.device_put({key: np.stack([v] * k) for key, v in one.items()},
                             parallel.batch_sharding(run.mesh, 1)) if k > 1
              else jax.device_put(one, parallel.batch_sharding(run.mesh)))
    eval_inputs = jax.device_put({"image": split.images[:eval_rows],
                                  "label": split.labels[:eval_rows],
                                  "mask": np.ones(eval_rows, bool)},
                                 parallel.batch_sharding(run.mesh))
    box = {"state": state}

    def run_steps(n: int) -> None:
        limiter = parallel.DispatchLimiter()
        for first in range(0, n, k):
            box["state"], metrics = step(box["state"], inputs, np.int32(min(k, n - first)))
            limiter(metrics["loss"])
        jax.block_until_ready(metrics["loss"])

    def evaluate(n: int) -> None:
        for _ in range(n):
            out = eval_step(box["state"], eval_inputs)
        jax.block_until_ready(out)

    def compiled():
        return step.lower(box["state"], inputs, np.int32(k)).compile()

    def memory_mb() -> float:
        m = compiled().memory_analysis()
        return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes) / 2**20

    run_steps.compiled_text = lambda: compiled().as_text()
    run_steps.evaluate = evaluate
    run_steps.memory_mb = memory_mb
    return run_steps, int(run.mesh.devices.size), split


def theirs(torch, name: str, split, batch_size: int = 0, eval_batch_size: int = 0):
    """run_steps(n): n PyTorch training steps with `name`'s optimizer on the first
    `batch_size` rows of `split` (0: all); run_steps.evaluate(n): n eval steps on the first
    `eval_batch_size` rows."""
    device = torch_device(torch)
    model = torch_model(name).to(device)
    model.train()
    cfg = optimizer(name)
    if cfg["name"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), cfg["learning_rate"],
                              momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                              weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.Adam(model.parameters(), cfg["learning_rate"])
    clip = cfg.get("grad_clip_norm", 0.0)
    images = torch.from_numpy((split.images.astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
                              .copy()).to(device)
    labels = torch.from_numpy(split.labels.astype(np.int64)).to(device)
    x, y = images[:batch_size or None], labels[:batch_size or None]
    x_eval = images[:eval_batch_size or None]

    def run_steps(n: int) -> None:
        model.train()
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        torch_sync(torch)

    def evaluate(n: int) -> None:
        model.eval()
        with torch.inference_mode():
            for _ in range(n):
                model(x_eval).argmax(-1)
        torch_sync(torch)

    run_steps.evaluate = evaluate
    return run_steps


def rounds_of(fns: dict, steps: dict, rounds: int) -> dict:
    """Medians of examples per second: each round calls every fn once, in order."""
    rates = {key: [] for key in fns}
    for _ in range(rounds):
        for key, (fn, examples) in fns.items():
            rates[key].append(examples * steps[key] / timed(fn, steps[key]))
    return {key: median_rate(r) for key, r in rates.items()}


def main():
    def flags(p):
        p.add_argument("--min_round_s", type=float, default=0.5,
                       help="least seconds per round and side")
        p.add_argument("--eval_batch_size", type=int, default=512)
        p.add_argument("--peak_size", type=int, default=0,
                       help="side of the square matrices of the peak's product (0: 2048 on "
                            "a CPU, 8192 on an accelerator)")
        add_steps_per_call(p)

    args = parse(__doc__, extra=flags, models="all", steps=(2, "least steps per round"))
    jax = start_jax(args.cpu_devices)
    import torch

    k = max(args.steps_per_call, 1)
    names = registered() if args.models == "all" else args.models.split(",")
    known = set(registered()) | set(VARIANTS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(map(repr, unknown))}; expected 'all' or "
                         f"some of {', '.join(sorted(known))}")
    size = args.peak_size or (2048 if jax.devices()[0].platform == "cpu" else 8192)
    peaks = [matmul_peak(jax, torch, size)]  # again at the end: the better of the two
    print(f"matmul peak ({size}x{size} float32): JAX {peaks[0][0]:.0f} GFLOP/s, PyTorch "
          f"{peaks[0][1]:.0f} GFLOP/s", flush=True)
    rows = []
    for name in names:
        one, devices, split = ours(jax, name, args.batch_size, args.image_size, 1,
                                   eval_batch_size=args.eval_batch_size)
        several = ours(jax, name, args.batch_size, args.image_size, k,
                       eval_batch_size=args.eval_batch_size)[0] if k > 1 else one
        ref = theirs(torch, name, split, args.batch_size, args.eval_batch_size)
        # compile and warm up, then steps enough for --min_round_s (whole calls of k)
        fns = {"ours_1": (one, args.batch_size), "ours_k": (several, args.batch_size),
               "torch": (ref, args.batch_size), "ours_eval": (one.evaluate, args.eval_batch_size),
               "torch_eval": (ref.evaluate, args.eval_batch_size)}
        steps = {}
        for key, (fn, _) in fns.items():
            first = k if key == "ours_k" else 1
            fn(first)
            per = timed(fn, first) / first
            steps[key] = max(args.steps, int(args.min_round_s / per) + 1)
            if key == "ours_k":
                steps[key] = -(-steps[key] // k) * k
        rates = rounds_of(fns, steps, args.rounds)
        rows.append({"model": name, "size": input_shape(name, args.image_size)[0],
                     "optimizer": optimizer(name)["name"], "devices": devices,
                     "ours_1": rates["ours_1"], "ours_k": rates["ours_k"],
                     "torch": rates["torch"], "ratio": max(rates["ours_1"], rates["ours_k"])
                     / rates["torch"], "k_gain": rates["ours_k"] / rates["ours_1"],
                     "ours_eval": rates["ours_eval"], "torch_eval": rates["torch_eval"],
                     "eval_ratio": rates["ours_eval"] / rates["torch_eval"],
                     "xla_mb": one.memory_mb(), "torch_threads": torch.get_num_threads(),
                     "gflop": step_flops(name, args.batch_size, args.image_size) / 1e9})
        print({key: (round(v, 2) if isinstance(v, float) else v) for key, v in rows[-1].items()},
              flush=True)
    peaks.append(matmul_peak(jax, torch, size))
    jax_peak, torch_peak = max(p[0] for p in peaks), max(p[1] for p in peaks)
    for r in rows:
        best = max(r["ours_1"], r["ours_k"])
        r.update(jax_peak=jax_peak, torch_peak=torch_peak,
                 ours_gflops=r["gflop"] * best / args.batch_size,
                 torch_gflops=r["gflop"] * r["torch"] / args.batch_size)
        r.update(ours_of_peak=r["ours_gflops"] / jax_peak,
                 torch_of_peak=r["torch_gflops"] / torch_peak)
    print(f"\ntrain batch {args.batch_size}, eval batch {args.eval_batch_size}, float32; ours "
          f"1 and {k} steps per call; jax {jax.__version__} on {jax.device_count()} "
          f"{jax.devices()[0].device_kind} devices, torch {torch.__version__} on "
          f"{torch_device(torch)} ({torch.get_num_threads()} threads)\n")
    report(rows, [("model", "model", "{}"), ("input", "size", "{}px"),
                  ("optimizer", "optimizer", "{}"), ("mesh devices", "devices", "{}"),
                  ("ours 1/call ex/s", "ours_1", "{:.0f}"),
                  (f"ours {k}/call ex/s", "ours_k", "{:.0f}"),
                  ("PyTorch ex/s", "torch", "{:.0f}"),
                  ("train ratio (best of ours)", "ratio", "{:.2f}x"),
                  (f"{k}/call against 1/call", "k_gain", "{:.2f}x"),
                  ("ours eval ex/s", "ours_eval", "{:.0f}"),
                  ("PyTorch eval ex/s", "torch_eval", "{:.0f}"),
                  ("eval ratio", "eval_ratio", "{:.2f}x"),
                  ("XLA MiB", "xla_mb", "{:.0f}")])
    print(f"\nroofline: matmul peak ({size}x{size} float32) JAX {jax_peak:.0f} GFLOP/s, "
          f"PyTorch {torch_peak:.0f} GFLOP/s; a step's GFLOP by XLA's count; ours at the "
          "better of its two train columns\n")
    report(rows, [("model", "model", "{}"), ("GFLOP/step", "gflop", "{:.3f}"),
                  ("ours GFLOP/s", "ours_gflops", "{:.1f}"),
                  ("ours of JAX peak", "ours_of_peak", "{:.1%}"),
                  ("PyTorch GFLOP/s", "torch_gflops", "{:.1f}"),
                  ("PyTorch of its peak", "torch_of_peak", "{:.1%}")], args.json)


if __name__ == "__main__":
    main()
