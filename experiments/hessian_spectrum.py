"""The Hessian spectrum of a checkpoint saved by experiments.train.

  python -m experiments.hessian_spectrum --workdir=runs/mnist_cnn --num_examples=4096

Power iteration with deflation (started from Lanczos) for the top eigenvalues, each with its
relative residual and a converged flag, Lanczos (stochastic Lanczos quadrature)
for the density and the most negative eigenvalue, Hutchinson for the trace. Writes
hessian_spectrum.json and hessian_density.png into --workdir.
"""

import json
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
flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest intact one.",
                     lower_bound=0)
flags.DEFINE_integer("num_examples", 4096, "Training examples the Hessian is averaged over.",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 512, "Examples per HVP batch.", lower_bound=1)
flags.DEFINE_integer("lanczos_order", 90, "Lanczos steps per SLQ draw.", lower_bound=1)
flags.DEFINE_integer("num_draws", 3, "SLQ random starts.", lower_bound=1)
flags.DEFINE_integer("top_k", 5, "Eigenvalues from power iteration with deflation.",
                     lower_bound=1)
flags.DEFINE_integer("power_iters", 50, "Iterations per eigenvalue at most.", lower_bound=1)
flags.DEFINE_float("tol", 1e-4, "Relative residual ||Hv - lambda v|| / |lambda| at which an "
                   "eigenvalue counts as converged (results: residual, converged).")
flags.DEFINE_integer("trace_samples", 100, "Hutchinson probes; at least 2 (the trace's standard "
                     "error divides by the number of probes less one).", lower_bound=2)
flags.DEFINE_integer("seed", 0, "Fixes the example sample and the random vectors.")
flags.DEFINE_string("data_dir", None, "Where the dataset's raw files are now, if they moved.")
flags.register_validator("tol", lambda t: 0 < t < 1,
                         "must be a relative residual in (0, 1), e.g. 1e-4")
flags.mark_flag_as_required("workdir")


@clean_errors
def main(argv):
    del argv
    if os.path.exists(FLAGS.workdir):  # the results go there; a missing one is named later
        output_dir("workdir", FLAGS.workdir)
    prepare_platform()
    from dlassign.analysis.hessian.study import checkpoint_spectrum

    overrides = data_dir_override(FLAGS.data_dir)
    r = checkpoint_spectrum(FLAGS.workdir, FLAGS.num_examples, FLAGS.batch_size,
                            FLAGS.lanczos_order, FLAGS.num_draws, FLAGS.top_k, FLAGS.power_iters,
                            FLAGS.trace_samples, FLAGS.seed, FLAGS.step, overrides, FLAGS.tol)
    say(json.dumps({k: v for k, v in r.items() if k != "density"}, indent=2))


if __name__ == "__main__":
    run(main)
