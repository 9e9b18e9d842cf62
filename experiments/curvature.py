"""The Gauss-Newton split and the class outliers of trained networks (configs/curvature.py).

  python -m experiments.curvature --config=configs/curvature.py --workdir=runs/curvature \
      --config.data.data_dir=PATH/TO/MNIST

Trains each network of the config under each loss and measures the Hessian H, the Gauss-Newton
matrix G and R = H - G at the configured steps: top and smallest eigenvalues (each with its
relative residual and a converged flag), SLQ densities, the sums of negative eigenvalues, the
outliers above the bulk and the class-mean Gram matrix of G. Writes results.json,
densities.png and outliers.png into --workdir and prints the tables. The networks can run in
separate processes (--config.only=mlp, --config.only=cnn) and their results be merged:

  python -m experiments.curvature --workdir=runs/curvature \
      --merge=runs/curvature_mlp,runs/curvature_cnn
"""


from absl import flags
from ml_collections import config_flags

from experiments.common import (
    clean_errors,
    output_dir,
    prepare_platform,
    run,
    say,
    single_process,
)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/curvature.py", "Curvature study config.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results.json and the figures.")
flags.DEFINE_list("merge", [], "Workdirs of earlier runs over different networks: write their "
                  "results merged into --workdir instead of running.")
flags.mark_flags_as_required(["workdir"])


@clean_errors
def main(argv):
    del argv
    single_process("experiments.curvature", "each network's training and Lanczos runs are "
                   "small programs on one device")
    output_dir("workdir", FLAGS.workdir)
    prepare_platform(1)
    from dlassign.analysis.gauss_newton import run_study, validate_config, write_outputs

    if FLAGS.merge:
        from dlassign.analysis.gauss_newton import merge_results
        from dlassign.runtime.files import read_results

        result = write_outputs(merge_results([read_results(d, "experiments.curvature")
                                              for d in FLAGS.merge]), FLAGS.workdir)
    else:
        validate_config(FLAGS.config)
        result = write_outputs(run_study(FLAGS.config), FLAGS.workdir)
    say(result["split_table"])
    say(result["outlier_table"])


if __name__ == "__main__":
    run(main)
