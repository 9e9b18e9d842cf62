"""Evaluates a checkpoint of a training workdir on the test split.

  python -m experiments.evaluate --workdir=runs/mnist_cnn [--which=best] [--step=N] \
      [--data_dir=PATH] [--eval_batch_size=N]

Prints the metrics as JSON and writes eval.json, eval_per_class.md and confusion_matrix.png
(`--which=best`: the best checkpoint by validation accuracy, which a run keeps with
`--config.checkpoint_best=true`; eval_best.json, eval_best_per_class.md and
confusion_matrix_best.png).
"""

import json

from absl import flags

from experiments.common import clean_errors, data_dir_override, prepare_platform, run, say

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "The run's latest checkpoints, or "
                  "its best one by validation accuracy (kept by a run with checkpoint_best).")
flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest intact one.")
flags.DEFINE_string("data_dir", None, "Where the dataset's raw files are now, if they moved.")
flags.DEFINE_integer("eval_batch_size", None, "Evaluation batch; default: the run's config's.",
                     lower_bound=1)
flags.mark_flag_as_required("workdir")


@clean_errors
def main(argv):
    del argv
    prepare_platform()
    from dlassign.training.evaluation import evaluate_checkpoint

    overrides = data_dir_override(FLAGS.data_dir) or {}
    if FLAGS.eval_batch_size:
        overrides["eval_batch_size"] = FLAGS.eval_batch_size
    result = evaluate_checkpoint(FLAGS.workdir, FLAGS.step, overrides, which=FLAGS.which)
    test = {k: result["test"][k] for k in ("accuracy", "precision_macro", "recall_macro",
                                           "f1_macro", "loss", "num_examples")}
    say(json.dumps({"which": result["which"], "step": result["step"], "test": test,
                      "collapse": result["test"]["collapse"]}, indent=2))


if __name__ == "__main__":
    run(main)
