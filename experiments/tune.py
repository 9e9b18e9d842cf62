"""Grid search with stratified k-fold cross-validation, then the best cell on the test split.

  python -m experiments.tune --config=configs/tune_mnist_mlp.py --workdir=runs/tune_mlp \
      --config.data.data_dir=PATH/TO/MNIST

Writes results.json (every cell's fold accuracies, mean, std; the best cell; its test metrics),
results.md and heatmap.png into --workdir. A rerun skips the cells already finished.
"""

from absl import flags
from ml_collections import config_flags

from experiments.common import clean_errors, prepare_platform, run, say

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Tuning config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for results.")
flags.mark_flags_as_required(["config", "workdir"])


@clean_errors
def main(argv):
    del argv
    prepare_platform(FLAGS.config.get("num_cpu_devices", 0))
    from dlassign.report import grid_table
    from dlassign.training.tune import tune

    say(grid_table(tune(FLAGS.config, FLAGS.workdir)))


if __name__ == "__main__":
    run(main)
