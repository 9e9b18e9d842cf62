"""Questions 1 and 2: Hessian evidence that CE (not MSE) makes logistic regression convex, and
that neither loss makes a deep linear network convex.

  python -m experiments.convexity --config=configs/convexity.py --workdir=runs/convexity

Writes results.json, report.md and the figures into --workdir.
"""

import json

from absl import flags
from ml_collections import config_flags

from experiments.common import clean_errors, prepare_platform, run, single_process

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Convexity config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results, report and figures.")
flags.mark_flags_as_required(["config", "workdir"])


@clean_errors
def main(argv):
    del argv
    single_process("experiments.convexity", "its problems are small enough that one "
                   "CPU device computes every Hessian exactly")
    prepare_platform(1)
    from dlassign.analysis.convexity_report import run_and_report

    results = run_and_report(FLAGS.config, FLAGS.workdir)
    print(json.dumps(results["answers"]))


if __name__ == "__main__":
    run(main)
