"""Edge of stability (Cohen et al., ICLR 2021): the sharpness of full-batch gradient descent.

  python -m experiments.sharpness --config=configs/sharpness.py --workdir=runs/sharpness

Trains a small MLP by full-batch gradient descent at three step sizes under each configured
loss (cross-entropy, MSE on softmax probabilities, the square loss on the outputs) and measures
the top Hessian eigenvalue along the way (configs/sharpness.py says how; its `:mnist` argument
gives the 5,000-image MNIST study). Writes results.json and sharpness.png into
--workdir and prints the table and the findings computed from it (`--config.losses=square`
runs one loss of the config; `--merge=DIR1,DIR2` merges such runs' results into --workdir).
"""

from absl import flags
from ml_collections import config_flags

from experiments.common import clean_errors, prepare_platform, run, say, single_process

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/sharpness.py", "Sharpness study config.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results.json and sharpness.png.")
flags.DEFINE_list("merge", [], "Directories holding the results.json of runs of one setup "
                  "(e.g. one per loss, --config.losses): merged into --workdir's results, "
                  "table and figure instead of running.")
flags.mark_flags_as_required(["workdir"])


@clean_errors
def main(argv):
    del argv
    single_process("experiments.sharpness", "full-batch gradient descent on a few thousand "
                   "images runs on one device")
    prepare_platform(1)
    from dlassign.analysis.sharpness import load_results, merge_studies, run_study, write_outputs

    if FLAGS.merge:
        study = merge_studies([load_results(d) for d in FLAGS.merge])
    else:
        study = run_study(FLAGS.config)
    result = write_outputs(study, FLAGS.workdir)
    say(result["table"])
    say(f"power iteration vs Lanczos: largest relative difference "
        f"{result['power_lanczos_max_relative_difference']}")
    say("\n\n".join(result["findings"]))


if __name__ == "__main__":
    run(main)
