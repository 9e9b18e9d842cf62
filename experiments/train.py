"""Trains a model from a config, resuming from the workdir's checkpoints.

  python -m experiments.train --config=configs/mnist_cnn.py --workdir=runs/cnn \
      --config.data.data_dir=PATH/TO/MNIST --config.optimizer.learning_rate=0.002

Writes checkpoints, `results.json` (test accuracy, macro precision/recall/F1, the config) into
--workdir; rerunning the same command after an interruption continues where it stopped. With
`curvature.every_steps` the run measures the top Hessian eigenvalue as it trains (a hook,
`hessian.tracking.CurvatureHook`).
"""

from absl import flags
from ml_collections import config_flags

from experiments.common import clean_errors, prepare_platform, run, say

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
flags.mark_flags_as_required(["config", "workdir"])


@clean_errors
def main(argv):
    del argv
    prepare_platform(FLAGS.config.get("num_cpu_devices", 0))
    from dlassign.analysis.hessian import tracking
    from dlassign.training.trainer import train_and_evaluate

    results = train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                 hooks=tracking.hooks(FLAGS.config))
    t = results["test"]
    say(f"test accuracy {t['accuracy']:.4f} precision {t['precision_macro']:.4f} "
          f"recall {t['recall_macro']:.4f} f1 {t['f1_macro']:.4f}")


if __name__ == "__main__":
    run(main)
