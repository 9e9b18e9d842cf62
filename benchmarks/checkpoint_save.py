"""What one checkpoint save costs, by model: the train state of a digits32 run (parameters,
optimizer moments, batch statistics) written by the trainer's `Checkpointer`.

  python -m benchmarks.checkpoint_save [--models=resnet18,lenet5] [--saves=5]

Each save goes to a new step of one temporary directory (keeping 3, as runs do); the table
gives every save's seconds and their median. This is the fixed cost a run pays per checkpoint,
which decides how often short runs checkpoint (`configs/main.py`).
"""

from __future__ import annotations

import statistics
import tempfile
import time

from benchmarks.common import report, start_jax


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,lenet5")
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if args.saves < 1:
        raise SystemExit(f"--saves takes at least 1, got {args.saves}")
    jax = start_jax(0)
    from configs import digits32
    from dlassign.data import prepare
    from dlassign.runtime.checkpoint import Checkpointer
    from dlassign.training import setup

    rows = []
    for name in args.models.split(","):
        config = digits32.get_config(name)
        run = setup.setup(config, prepare(config.data, config.seed))
        tree = setup.state_tree(setup.make_state(run))
        megabytes = sum(x.nbytes for x in jax.tree.leaves(tree)) / 2**20
        seconds = []
        with tempfile.TemporaryDirectory() as directory:
            checkpointer = Checkpointer(directory, keep=3)
            for step in range(1, args.saves + 1):
                start = time.perf_counter()
                checkpointer.save(step, tree, {"config": {}})
                seconds.append(time.perf_counter() - start)
        rows.append({"model": name, "mib": megabytes, "median": statistics.median(seconds),
                     "each": ", ".join(f"{s:.2f}" for s in seconds)})
    report(rows, [("model", "model", "{}"), ("state MiB", "mib", "{:.1f}"),
                  ("median s per save", "median", "{:.2f}"), ("each save s", "each", "{}")],
           args.json)


if __name__ == "__main__":
    main()
