"""The loss landscape of a checkpoint saved by experiments.train.

  python -m experiments.landscape --workdir=runs/mnist_cnn --directions=eigen --dims=1

Evaluates the training loss on a fixed stratified sample of the training split over a 1-D line or
a 2-D grid through the checkpoint, along the top Hessian eigenvector(s) (Lanczos on the same
sample) or along filter-normalised random directions (Li et al., NeurIPS 2018). Writes
landscape_{directions}_{dims}d.json and .png into --workdir (or --out); along eigenvectors it
prints the second difference at the centre over the eigenvalue, which is 1 for a quadratic loss.
"""

import json
import math
import os

from absl import flags

from experiments.common import (
    clean_errors,
    data_dir_override,
    output_dir,
    prepare_platform,
    run,
    say,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "The run's latest checkpoints, or "
                  "its best one by validation accuracy (kept by a run with checkpoint_best).")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest intact one.",
                     lower_bound=0)
flags.DEFINE_enum("directions", "eigen", ["eigen", "random"],
                  "eigen: the top Hessian eigenvector(s); random: filter-normalised Gaussian "
                  "directions.")
flags.DEFINE_integer("dims", 1, "1: a line; 2: a contour plot over a plane.", lower_bound=1,
                     upper_bound=2)
flags.DEFINE_integer("num_points", 31, "Grid points per axis (odd, at least 3: the centre and "
                     "its neighbours are on the grid).", lower_bound=3)
flags.DEFINE_float("span", None, "The slice covers [-span, span] per axis (positive, finite); "
                   "default: 1 for random directions (filter norms), sqrt(2 / lambda_1) for "
                   "eigenvectors (unit norm).")
flags.DEFINE_integer("sample_size", 1024, "Training examples the loss is averaged over.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Examples per batch.", lower_bound=1)
flags.DEFINE_integer("lanczos_order", 40, "Lanczos steps for the eigenvectors; at least 10 "
                     "(fewer miss the top eigenvalue: dlassign.analysis.landscape."
                     "MIN_LANCZOS_ORDER).", lower_bound=10)
flags.DEFINE_float("tol", 1e-4, "Relative residual ||Hv - lambda v|| / |lambda| at which an "
                   "eigenvector counts as converged (results: residual, converged); Lanczos "
                   "stops there, at most --lanczos_order steps.")
flags.DEFINE_integer("points_per_call", 8, "Grid points evaluated per jitted call.",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Fixes the example sample and the random vectors.")
flags.DEFINE_string("out", None, "Directory for the JSON and the figure (created if missing); "
                    "default: --workdir.")
flags.DEFINE_string("data_dir", None, "Where the dataset's raw files are now, if they moved.")
flags.register_validator("num_points", lambda n: n % 2 == 1,
                         "must be odd, so the centre of the slice is on the grid")
flags.register_validator("span", lambda v: v is None or (math.isfinite(v) and v > 0),
                         "must be a positive finite number")
flags.register_validator("tol", lambda t: 0 < t < 1,
                         "must be a relative residual in (0, 1), e.g. 1e-4")
flags.mark_flag_as_required("workdir")


@clean_errors
def main(argv):
    del argv
    # before the minutes of work whose results go there (a missing workdir is named later)
    if FLAGS.out or os.path.exists(FLAGS.workdir):
        output_dir("out" if FLAGS.out else "workdir", FLAGS.out or FLAGS.workdir)
    prepare_platform()
    from dlassign.analysis.landscape import checkpoint_landscape

    r = checkpoint_landscape(FLAGS.workdir, FLAGS.directions, FLAGS.dims, FLAGS.num_points,
                             FLAGS.span, FLAGS.sample_size, FLAGS.batch_size,
                             FLAGS.lanczos_order, FLAGS.points_per_call, FLAGS.seed, FLAGS.step,
                             FLAGS.out, data_dir_override(FLAGS.data_dir), FLAGS.which,
                             FLAGS.tol)
    say(json.dumps({k: v for k, v in r.items() if k not in ("axis", "losses")}, indent=2))
    for k, c in enumerate(r.get("curvature", [])):
        ratios = ", ".join(f"{q:.4f} at step {h:.4g}" for q, h in zip(c["ratios"], c["steps"]))
        say(f"eigenvector {k + 1}, eigenvalue {c['eigenvalue']:.6g}: second difference / "
              f"step^2 over the eigenvalue: {ratios}")


if __name__ == "__main__":
    run(main)
