"""Edge of stability (Cohen et al., ICLR 2021): the sharpness of full-batch gradient descent.

  python -m experiments.sharpness --config=configs/sharpness.py --workdir=runs/sharpness

Trains a small MLP by full-batch gradient descent at three step sizes under cross-entropy and
MSE and measures the top Hessian eigenvalue along the way (configs/sharpness.py says how; its
`:mnist` argument gives the 5,000-image MNIST study). Writes results.json and sharpness.png into
--workdir and prints the table.
"""

from absl import flags
from ml_collections import config_flags

from experiments.common import clean_errors, prepare_platform, run, say, single_process

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sharpness.py", "Sharpness study config.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results.json and sharpness.png.")
flags.mark_flags_as_required(["workdir"])


@clean_errors
def main(argv):
    del argv
    single_process("experiments.sharpness", "full-batch gradient descent on a few thousand "
                   "images runs on one device")
    prepare_platform(1)
    from dlassign.analysis.sharpness import run_study, write_outputs

    result = write_outputs(run_study(FLAGS.config), FLAGS.workdir)
    say(result["table"])
    say(f"power iteration vs Lanczos: largest relative difference "
        f"{result['power_lanczos_max_relative_difference']}")


if __name__ == "__main__":
    run(main)
