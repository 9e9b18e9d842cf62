"""k-fold cross-validation: the k folds as one vmapped program against one after another.

  python -m benchmarks.kfold [--data_dir=PATH/TO/MNIST] [--folds=3] [--epochs=1]
      [--steps_per_call=8]

Both train the same folds with the same batches (training.tune.cross_validate), `--steps_per_call`
steps per call (default: the config's); without --data_dir, the embedded digits are used.
"""

from __future__ import annotations

import time

from benchmarks.common import add_steps_per_call, parse, report, start_jax


def main():
    args = parse(__doc__, lambda p: (p.add_argument("--data_dir", default=""),
                                     p.add_argument("--folds", type=int, default=3),
                                     p.add_argument("--epochs", type=int, default=1),
                                     p.add_argument("--config", default="tune_mnist_mlp"),
                                     add_steps_per_call(p)))
    start_jax(args.cpu_devices)
    import importlib

    from dlassign.data import prepare, stratified_kfold
    from dlassign.training.tune import apply_overrides, cross_validate, grid_cells

    config = importlib.import_module(f"configs.{args.config}").get_config()
    if args.data_dir:
        config.data.data_dir = args.data_dir
    else:
        config.data.name, config.data.data_dir = "digits", ""
        config.batch_size = 32
    config.num_epochs = args.epochs
    config.steps_per_call = args.steps_per_call
    config = apply_overrides(config, grid_cells(config.tune.grid)[0])
    data = prepare(config.data, config.seed)
    folds = stratified_kfold(data.train.labels, args.folds, config.seed)
    rows = []
    for _ in range(2):  # the first round includes compilation; report the second
        rows = []
        for sequential in (False, True):
            t = time.perf_counter()
            cv = cross_validate(config, data, folds, sequential=sequential)
            rows.append({"mode": "sequential" if sequential else "vmapped",
                         "seconds": time.perf_counter() - t, "train_seconds": cv["train_time_s"],
                         "mean_accuracy": cv["mean"]})
    rows.append({"mode": "sequential / vmapped", "seconds": rows[1]["seconds"] / rows[0]["seconds"],
                 "train_seconds": rows[1]["train_seconds"] / rows[0]["train_seconds"],
                 "mean_accuracy": None})
    print(f"\n{config.model.name} {grid_cells(config.tune.grid)[0]} on {data.name}: "
          f"{args.folds} folds x {args.epochs} epoch(s), batch {config.batch_size}, "
          f"{args.steps_per_call} steps per call\n")
    report(rows, [("", "mode", "{}"), ("seconds (ratio)", "seconds", "{:.2f}"),
                  ("training seconds (ratio)", "train_seconds", "{:.2f}"),
                  ("mean CV accuracy", "mean_accuracy", "{:.4f}")], args.json)


if __name__ == "__main__":
    main()
