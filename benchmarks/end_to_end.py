"""Whole processes: `python -m experiments.train` against a plain PyTorch script of the same
training, as a user times them (start-up, data, compilation, steps, evaluation, checkpoints).

  python -m benchmarks.end_to_end --data_dir=PATH/TO/MNIST [--models=mlp,cnn,lenet5] \
      [--num_epochs=2] [--repeats=3] [--modes=cold,warm]

Models: the MNIST MLP (configs/mnist_mlp.py), the MNIST CNN (configs/mnist_cnn.py) and LeNet-5
on MNIST padded to 32x32x3 (configs/mnist_ported.py:lenet5). The PyTorch side is
`benchmarks/end_to_end_torch.py` (PyTorch and NumPy only) with every setting taken from the same
config: network, optimizer and schedule, batch sizes, random shifts, seed, logging interval;
both write a checkpoint each epoch and evaluate the test split at the end. `cold` runs ours with
an empty compilation cache (a first run), `warm` with the cache one untimed run of the same
command filled (every later run). Each mode alternates ours and PyTorch (who goes first swaps
every repeat) after one untimed run of each, which loads both libraries into the page cache;
the table gives the medians over `--repeats`, and `speed-up` is PyTorch's median over ours.
`--data_dir` holds MNIST's four IDX files, gzipped or not (what dlassign.data.formats reads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT, report

# model: (config argument, description)
CONFIGS = {
    "mlp": ("configs/mnist_mlp.py", "MLP 784-1024-1024-10 (mnist_mlp.py)"),
    "cnn": ("configs/mnist_cnn.py", "MNIST CNN (mnist_cnn.py)"),
    "lenet5": ("configs/mnist_ported.py:lenet5", "LeNet-5, 32x32x3 (mnist_ported.py:lenet5)"),
}


def load_config(spec: str):
    import runpy

    path, _, arg = spec.partition(":")
    return runpy.run_path(os.path.join(ROOT, path))["get_config"](*([arg] if arg else []))


def commands(name: str, args, workdir: str) -> tuple[list[str], list[str]]:
    """(ours, PyTorch's) command lines for one run of `name` writing into `workdir`."""
    spec = CONFIGS[name][0]
    c = load_config(spec)
    ours = [sys.executable, "-m", "experiments.train", f"--config={spec}",
            f"--workdir={os.path.join(workdir, 'ours')}", f"--config.data.data_dir={args.data_dir}",
            f"--config.num_epochs={args.num_epochs}"]
    if args.subset_fraction < 1.0:
        ours.append(f"--config.data.subset_fraction={args.subset_fraction}")
    o = c.optimizer
    unsupported = [f for f, bad in (("warmup_epochs", o.warmup_epochs), ("nesterov", o.nesterov),
                                    ("grad_clip_norm", o.grad_clip_norm),
                                    ("normalization", c.data.normalization != "scale"),
                                    ("image_size", c.data.image_size)) if bad]
    if unsupported:
        raise SystemExit(f"{spec}: the PyTorch script has no {', '.join(unsupported)}")
    theirs = [sys.executable, os.path.join(ROOT, "benchmarks", "end_to_end_torch.py"),
              f"--model={c.model.name}", f"--data_dir={args.data_dir}",
              f"--workdir={os.path.join(workdir, 'torch')}", f"--num_epochs={args.num_epochs}",
              f"--subset_fraction={args.subset_fraction}", f"--batch_size={c.batch_size}",
              f"--eval_batch_size={c.eval_batch_size}", f"--optimizer={o.name}",
              f"--learning_rate={o.learning_rate}", f"--momentum={o.momentum}",
              f"--weight_decay={o.weight_decay}", f"--schedule={o.schedule}",
              f"--dropout={c.model.get('dropout', 0.0)}",
              f"--random_crop={c.data.random_crop}", f"--pad_to={c.data.pad_to}",
              f"--channels={c.data.channels or 1}", f"--log_every_steps={c.log_every_steps}",
              f"--seed={c.seed}"]
    return ours, theirs


def timed_run(cmd: list[str], workdir: str, env: dict) -> dict:
    """Runs one whole process; its wall time and the test accuracy it wrote."""
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        accuracy = json.load(f)["test"]["accuracy"]
    return {"seconds": seconds, "accuracy": accuracy}


def measure(name: str, mode: str, args, scratch: str) -> dict:
    ours, theirs = commands(name, args, scratch)
    base = {k: v for k, v in os.environ.items()
            if k not in ("DLASSIGN_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR",
                         "JAX_LOG_COMPILES")}
    warm_cache = os.path.join(scratch, "cache-warm")
    shutil.rmtree(warm_cache, ignore_errors=True)

    def run(side: str, repeat: int) -> dict:
        env = dict(base)
        if side == "ours":
            cache = warm_cache
            if mode == "cold":  # a fresh, empty cache for every run
                cache = os.path.join(scratch, f"cache-{repeat}")
                shutil.rmtree(cache, ignore_errors=True)
            env["DLASSIGN_COMPILATION_CACHE"] = cache
        cmd = ours if side == "ours" else theirs
        return timed_run(cmd, os.path.join(scratch, "ours" if side == "ours" else "torch"), env)

    run("ours", -1)  # untimed: libraries into the page cache, and the warm mode's cache
    run("torch", -1)
    times = {"ours": [], "torch": []}
    accuracy = {}
    for r in range(args.repeats):
        for side in (("ours", "torch") if r % 2 == 0 else ("torch", "ours")):
            result = run(side, r)
            times[side].append(result["seconds"])
            accuracy[side] = result["accuracy"]
            print(f"  {name} {mode} {side}: {result['seconds']:.1f} s, "
                  f"test accuracy {result['accuracy']:.4f}", file=sys.stderr, flush=True)
    ours_s, torch_s = statistics.median(times["ours"]), statistics.median(times["torch"])
    return {"model": CONFIGS[name][1], "mode": mode, "ours_s": ours_s, "torch_s": torch_s,
            "speedup": torch_s / ours_s, "ours_acc": accuracy["ours"],
            "torch_acc": accuracy["torch"], "ours_runs": times["ours"],
            "torch_runs": times["torch"], "epochs": args.num_epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="MNIST's IDX files")
    p.add_argument("--models", default="mlp,cnn,lenet5")
    p.add_argument("--modes", default="cold,warm")
    p.add_argument("--num_epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side per cell")
    p.add_argument("--subset_fraction", type=float, default=1.0,
                   help="train on this stratified share of the training split (smoke tests)")
    p.add_argument("--scratch", default="", help="where the runs and caches go (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    args.data_dir = os.path.abspath(args.data_dir)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    for bad in [m for m in models if m not in CONFIGS] + [m for m in modes
                                                           if m not in ("cold", "warm")]:
        raise SystemExit(f"unknown model or mode {bad!r}; models: {', '.join(CONFIGS)}; "
                         "modes: cold, warm")
    scratch = args.scratch or tempfile.mkdtemp(prefix="end_to_end-")
    rows = []
    try:
        for name in models:
            for mode in modes:
                rows.append(measure(name, mode, args, os.path.join(scratch, name)))
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.num_epochs} epochs, whole processes, medians of {args.repeats} alternated "
          "runs; speed-up = PyTorch / ours\n")
    report(rows, [("model", "model", "{}"), ("compilation cache", "mode", "{}"),
                  ("ours s", "ours_s", "{:.1f}"), ("PyTorch s", "torch_s", "{:.1f}"),
                  ("speed-up", "speedup", "{:.2f}x"), ("ours test acc", "ours_acc", "{:.4f}"),
                  ("PyTorch test acc", "torch_acc", "{:.4f}")], args.json)


if __name__ == "__main__":
    main()
