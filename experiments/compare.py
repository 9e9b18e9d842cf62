"""Compares finished training runs: accuracy, macro precision/recall/F1, size, time.

  python -m experiments.compare runs/svhn_lenet5 runs/svhn_resnet18 runs/svhn_resnet50 \
      --output=runs/svhn_comparison

Writes comparison.md (table and comment), comparison.png (bar chart) and comparison.json.
"""

from absl import flags

from experiments.common import clean_errors, output_dir, run, single_process

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "Directory for the comparison (default: the first run's "
                                    "parent directory).")


@clean_errors
def main(argv):
    single_process("experiments.compare", "it only reads finished workdirs")
    import os

    from dlassign.analysis.compare import compare
    from dlassign.errors import DlassignError

    dirs = argv[1:]
    if not dirs:
        raise DlassignError("give the workdirs to compare: python -m experiments.compare DIR...")
    output = FLAGS.output or os.path.join(os.path.dirname(os.path.abspath(dirs[0])),
                                          "comparison")
    output_dir("output", output)
    print(compare(dirs, output)["markdown"])


if __name__ == "__main__":
    run(main)
