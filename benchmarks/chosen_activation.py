"""A grid cell's folds with its activation by name against chosen by a traced index.

  python -m benchmarks.chosen_activation [--configs=tune_digits_mlp,tune_digits_cnn]
      [--rounds=5]

The grid search lets cells that differ only in activation share one program: every candidate
activation is computed and a traced index selects one (`layers.CHOSEN`, `tune._programs`). This
times what that costs in the steps: one cell (the middle width, tanh) of each config, its folds
trained one after another (`cross_validate`), once with the grid's activations and once with a
grid of that one activation (so it is a plain name), alternated, after one untimed round that
compiles both; the medians of --rounds of the training time, and whether the two gave the same
fold accuracies and losses (they should, bitwise).
"""

from __future__ import annotations

import statistics

from benchmarks.common import parse, report, start_jax

WIDTH = {"hidden_sizes": lambda w: (w,), "dense_width": lambda w: w}


def main():
    args = parse(__doc__, lambda p: p.add_argument("--configs",
                                                   default="tune_digits_mlp,tune_digits_cnn"))
    start_jax(args.cpu_devices)
    import importlib

    from dlassign.data import prepare, stratified_kfold
    from dlassign.training.tune import apply_overrides, cross_validate

    rows = []
    for name in args.configs.split(","):
        config = importlib.import_module(f"configs.{name}").get_config()
        field = next(f for f in config.tune.grid.model if f in WIDTH)
        widths = config.tune.grid.model[field]
        width = widths[len(widths) // 2]
        cell = apply_overrides(config, {f"model.{field}": width, "model.activation": "tanh"})
        named = cell.copy_and_resolve_references()
        named.tune.grid = {"model": {"activation": ["tanh"]}}  # one candidate: a plain name
        data = prepare(config.data, config.seed)
        folds = stratified_kfold(data.train.labels, config.tune.num_folds, config.seed)
        times, results = {"named": [], "chosen": []}, {}
        for r in range(args.rounds + 1):
            for mode, cfg in (("named", named), ("chosen", cell)):
                cv = cross_validate(cfg, data, folds, sequential=True)
                if r:  # round 0 compiles
                    times[mode].append(cv["train_time_s"])
                results[mode] = (cv["fold_accuracies"], cv["fold_losses"])
        named_s, chosen_s = (statistics.median(times[m]) for m in ("named", "chosen"))
        rows.append({"cell": f"{name}: {field}={width}, tanh", "named": named_s,
                     "chosen": chosen_s, "ratio": chosen_s / named_s,
                     "same": "yes" if results["named"] == results["chosen"] else "NO"})
    print(f"\n{len(folds)} folds one after another, medians of {args.rounds} alternated rounds\n")
    report(rows, [("cell", "cell", "{}"), ("by name s", "named", "{:.3f}"),
                  ("chosen by index s", "chosen", "{:.3f}"), ("chosen / named", "ratio", "{:.3f}"),
                  ("same fold results", "same", "{}")], args.json)


if __name__ == "__main__":
    main()
