"""Markdown tables and figures for results; matplotlib with the file-only Agg backend."""

from __future__ import annotations

import numpy as np

from dlassign.runtime.files import save_figure


def plt():
    """pyplot on the Agg backend, chosen on first use rather than at import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _short(path: str) -> str:
    return path.split(".")[-1]


def grid_table(results: dict) -> str:
    """One row per grid cell: its parameters, each fold's accuracy, their mean and std, and the
    mean validation loss over the folds (blank for cells recorded without it)."""
    cells = results["cells"]
    names = list(cells[0]["params"])
    k = len(cells[0]["fold_accuracies"])
    header = ([_short(n) for n in names] + [f"fold {i + 1}" for i in range(k)]
              + ["mean", "std", "val loss"])
    best = results.get("best", {}).get("params")
    rows = []
    for c in sorted(cells, key=lambda c: -c["mean"]):
        mark = " **(best)**" if c["params"] == best else ""
        loss = f"{np.mean(c['fold_losses']):.4f}" if c.get("fold_losses") else ""
        rows.append([c["params"][n] for n in names] + [pct(a) for a in c["fold_accuracies"]]
                    + [pct(c["mean"]) + mark, pct(c["std"]), loss])
    out = markdown_table(header, rows)
    if "test" in results:
        t = results["test"]
        out += (f"\nBest cell retrained on the whole training split: test accuracy "
                f"{pct(t['accuracy'])}, macro precision {t['precision_macro']:.4f}, recall "
                f"{t['recall_macro']:.4f}, F1 {t['f1_macro']:.4f} ({t['num_examples']} test "
                "images).\n")
    return out


def grid_heatmap(results: dict, path: str) -> None:
    """Mean CV accuracy over the first two grid axes (a bar chart for a one-axis grid)."""
    pyplot = plt()
    cells = results["cells"]
    names = list(cells[0]["params"])
    fig, ax = pyplot.subplots(figsize=(5.5, 4))
    if len(names) >= 2:
        rows = list(dict.fromkeys(str(c["params"][names[0]]) for c in cells))
        cols = list(dict.fromkeys(str(c["params"][names[1]]) for c in cells))
        grid = np.full((len(rows), len(cols)), -np.inf)
        for c in cells:  # with more than two axes, the best cell over the others
            i, j = rows.index(str(c["params"][names[0]])), cols.index(str(c["params"][names[1]]))
            grid[i, j] = max(grid[i, j], c["mean"])
        im = ax.imshow(100 * grid, cmap="viridis")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{100 * grid[i, j]:.2f}", ha="center", va="center", color="w")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_ylabel(_short(names[0]))
        ax.set_xlabel(_short(names[1]))
        fig.colorbar(im, label="mean CV accuracy (%)")
    else:
        labels = [str(c["params"][names[0]]) for c in cells]
        ax.bar(labels, [100 * c["mean"] for c in cells],
               yerr=[100 * c["std"] for c in cells])
        ax.set_xlabel(_short(names[0]))
        ax.set_ylabel("mean CV accuracy (%)")
    ax.set_title(f"{results.get('num_folds', '')}-fold CV accuracy")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    pyplot.close(fig)


def per_class_table(metrics: dict) -> str:
    pc = metrics["per_class"]
    rows = [[k, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", s] for k, (p, r, f, s) in
            enumerate(zip(pc["precision"], pc["recall"], pc["f1"], pc["support"]))]
    rows.append(["macro", f"{metrics['precision_macro']:.4f}", f"{metrics['recall_macro']:.4f}",
                 f"{metrics['f1_macro']:.4f}", metrics["num_examples"]])
    return markdown_table(["class", "precision", "recall", "F1", "support"], rows)


def confusion_matrix_png(cm: np.ndarray, path: str, title: str = "confusion matrix") -> None:
    fig = confusion_matrix_figure(cm, title)
    save_figure(fig, path, dpi=120)
    plt().close(fig)


def confusion_matrix_figure(cm: np.ndarray, title: str = "confusion matrix"):
    """The confusion matrix (rows true, columns predicted) with its counts, as a figure."""
    pyplot = plt()
    cm = np.asarray(cm)
    fig, ax = pyplot.subplots(figsize=(5, 4.5))
    im = ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="w" if cm[i, j] > cm.max() / 2 else "k")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im)
    fig.tight_layout()
    return fig


def training_curves_png(history: list[dict], validation: list[dict], path: str,
                        title: str = "") -> None:
    """Loss and accuracy against steps: the training history (mean over each logging interval)
    and, when there is one, the validation history."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for name, rows, style in (("training", history, "-"), ("validation", validation, "o-")):
            rows = [r for r in rows if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=name,
                        markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if all(r.get("loss", 1.0) > 0 for r in history + validation):
        axes[0].set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    pyplot.close(fig)
