"""Comparing finished runs: a metrics table, a bar chart and a comment drawn from the numbers."""

from __future__ import annotations

import json
import os

import numpy as np

from dlassign.errors import DlassignError
from dlassign.models import architecture, architectures
from dlassign.report import markdown_table, pct, plt
from dlassign.runtime.files import write_json

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def load_runs(dirs: list[str]) -> list[dict]:
    """One row per workdir from its results.json.

    Raises:
      DlassignError: a workdir without results.json, or one that is damaged or not a training
        run's; names the file and what is wrong.
    """
    return [_row(d) for d in dirs]


def _row(d: str) -> dict:
    path = os.path.join(d, "results.json")
    if not os.path.isfile(path):
        raise DlassignError(f"{d!r} has no results.json; expected a finished "
                            "experiments.train workdir")
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DlassignError(f"{path} cannot be read as JSON ({_first_line(e)}); expected the "
                            "results.json of a finished experiments.train run") from e
    try:
        cfg = r.get("config", {})
        start = (cfg.get("torchvision_weights") and f"torchvision {cfg['torchvision_weights']}"
                 or cfg.get("init_checkpoint") and "ported checkpoint" or "scratch")
        row = {
            "workdir": d, "model": str(r["model"]), "dataset": str(r["dataset"]),
            "subset_fraction": float(cfg.get("data", {}).get("subset_fraction", 1.0)),
            "start": start, "num_params": int(r["num_params"]),
            "train_time_s": float(r["train_time_s"]),
            "collapsed": bool(r["prediction_collapse"]["collapsed"]),
            "num_examples": int(r["test"]["num_examples"]),
            **{m: float(r["test"][m]) for m in METRICS}}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        missing = f"no field {e.args[0]!r}" if isinstance(e, KeyError) else _first_line(e)
        raise DlassignError(f"{path} is not the results.json of a finished experiments.train "
                            f"run ({missing}); compare takes training workdirs") from e
    return row


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def table(rows: list[dict]) -> str:
    body = [[r["model"], pct(r["accuracy"]), f"{r['precision_macro']:.4f}",
             f"{r['recall_macro']:.4f}", f"{r['f1_macro']:.4f}", f"{r['num_params'] / 1e6:.2f}M",
             f"{r['train_time_s']:.0f}", r["start"], "**yes**" if r["collapsed"] else "no"]
            for r in rows]
    return markdown_table(["model", "accuracy", "precision", "recall", "F1", "parameters",
                           "train time (s)", "start", "collapsed"], body)


def comment(rows: list[dict]) -> str:
    """What the numbers say, followed by the architectural reasons that explain them."""
    best = max(rows, key=lambda r: (r["f1_macro"], r["accuracy"]))
    lines = [f"On these runs ({rows[0]['dataset']}, {rows[0]['num_examples']} test images), "
             f"**{best['model']}** has the best macro F1 ({best['f1_macro']:.4f}, accuracy "
             f"{pct(best['accuracy'])}) with {best['num_params'] / 1e6:.2f}M parameters."]
    collapsed = [r["model"] for r in rows if r["collapsed"]]
    if collapsed:
        lines.append(f"Predictions collapsed onto one or two classes for {', '.join(collapsed)}: "
                     "its recall sits near 1/10 per class and its scores are not a measure "
                     "of the architecture.")
    if len(rows) > 1:
        eff = max(rows, key=lambda r: r["accuracy"] / max(r["train_time_s"], 1e-9))
        lines.append(f"Per second of training, {eff['model']} gains the most accuracy.")
    if best["model"] in architectures():
        lines.append(architecture(best["model"]).why)
    return " ".join(lines) + "\n"


def bar_chart(rows: list[dict], path: str) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 3.8))
    width = 0.8 / len(METRICS)
    x = np.arange(len(rows))
    for i, m in enumerate(METRICS):
        ax.bar(x + i * width, [r[m] for r in rows], width, label=m.replace("_macro", ""))
    ax.set_xticks(x + 0.4 - width / 2, [r["model"] for r in rows])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test score")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot.close(fig)


def compare(dirs: list[str], output: str) -> dict:
    """Writes comparison.md, comparison.png and comparison.json into `output`."""
    rows = load_runs(dirs)
    os.makedirs(output, exist_ok=True)
    text = table(rows) + "\n" + comment(rows)
    with open(os.path.join(output, "comparison.md"), "w") as f:
        f.write(text)
    bar_chart(rows, os.path.join(output, "comparison.png"))
    write_json(os.path.join(output, "comparison.json"), rows)
    return {"rows": rows, "markdown": text}
