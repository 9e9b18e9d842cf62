"""A few hundred training steps of ResNet-18 on MNIST (32x32, three channels), ours against
PyTorch on the same batches, then both on the whole test split.

  python -m benchmarks.finetune --data_dir=PATH/TO/MNIST [--steps=300] [--arch=resnet18]

Same architecture, initial weights (ported from the PyTorch model), batches, SGD with momentum
and float32 in both. Reports wall time of the steps and test accuracy.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common import parse, report, start_jax, torch_device, torch_sync


def main():
    args = parse(__doc__, lambda p: (p.add_argument("--data_dir", required=True),
                                     p.add_argument("--arch", default="resnet18")))
    args.steps = args.steps if args.steps != 10 else 300
    jax = start_jax(args.cpu_devices)
    import torch

    from configs import mnist_ported
    from dlassign.data import prepare, train_batches
    from dlassign.porting import torch_to_flax
    from dlassign.porting.torch_models import build
    from dlassign.runtime import parallel
    from dlassign.training.evaluation import evaluate
    from dlassign.training.loop import prefetch
    from dlassign.training.setup import compile_steps, make_state, setup

    config = mnist_ported.get_config(args.arch)
    config.data.data_dir = args.data_dir
    config.batch_size = args.batch_size
    config.optimizer.schedule = "constant"
    data = prepare(config.data, config.seed)
    torch.manual_seed(0)
    device = torch_device(torch)
    model = build(args.arch, 10)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    model = model.to(device)

    run = setup(config, data)
    state = make_state(run, jax.tree.map(np.asarray, torch_to_flax(sd, args.arch)))
    step, eval_step = compile_steps(run, state)
    batches = list(train_batches(data.train, args.batch_size, config.seed, 0, args.steps))
    state, m = step(state, jax.device_put(batches[0], parallel.batch_sharding(run.mesh)))
    jax.block_until_ready(m)  # compiled; this warm-up step counts as step 1 for both
    t = time.perf_counter()
    limiter = parallel.DispatchLimiter()
    for batch in prefetch(batches[1:], parallel.batch_sharding(run.mesh)):
        state, m = step(state, batch)
        limiter(m["loss"])
    jax.block_until_ready(m)
    ours_s = time.perf_counter() - t
    ours_acc = evaluate(state, data.test, eval_step, run.mesh, config.eval_batch_size,
                        10)["accuracy"]

    opt = torch.optim.SGD(model.parameters(), lr=config.optimizer.learning_rate, momentum=0.9)
    to_t = lambda b: (torch.from_numpy((b["image"].astype(np.float32) / 255.0)
                                       .transpose(0, 3, 1, 2).copy()).to(device),
                      torch.from_numpy(b["label"].astype(np.int64)).to(device))
    model.train()
    for i, batch in enumerate(batches):
        if i == 1:
            torch_sync(torch)
            t = time.perf_counter()
        x, y = to_t(batch)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch_sync(torch)
    torch_s = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        preds = np.concatenate([model(to_t({"image": data.test.images[i:i + 1000],
                                            "label": data.test.labels[i:i + 1000]})[0])
                                .argmax(1).cpu().numpy() for i in range(0, len(data.test), 1000)])
    torch_acc = float(np.mean(preds == data.test.labels))
    rows = [{"who": "dlassign", "seconds": ours_s, "accuracy": ours_acc},
            {"who": "PyTorch", "seconds": torch_s, "accuracy": torch_acc},
            {"who": "PyTorch / dlassign", "seconds": torch_s / ours_s, "accuracy": None}]
    print(f"\n{args.arch}, {args.steps} steps of {args.batch_size} (SGD momentum 0.9, lr "
          f"{config.optimizer.learning_rate}) on {jax.devices()[0].device_kind}\n")
    report(rows, [("", "who", "{}"), ("seconds for steps 2..N (ratio)", "seconds", "{:.2f}"),
                  ("test accuracy", "accuracy", "{:.4f}")], args.json)


if __name__ == "__main__":
    main()
