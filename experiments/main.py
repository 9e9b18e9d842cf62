"""The main job: all four questions on embedded data, written up in WORKDIR/report.md.

  python -m experiments.main --workdir=runs/main [--config=configs/main.py]

The studies and the report are `dlassign.main_job`'s. They are independent and run
`config.workers` at a time in worker processes (`dlassign.runtime.workers`): one JAX process of
small programs keeps about one core busy. --config.workers=1 runs them one after another in this
process.
"""

import functools
import os
import time

from absl import flags
from ml_collections import config_flags

from dlassign.runtime.workers import check_workers, run_tasks
from experiments.common import clean_errors, prepare_platform, run, single_process, worker_setup

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/main.py", "Main-job config.",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Where the report, figures and every run go.")
flags.mark_flag_as_required("workdir")


@clean_errors
def main(argv):
    del argv
    single_process("experiments.main", "it is the small-data tour of the four studies; launch "
                   "experiments.train or experiments.tune across processes")
    config, workdir = FLAGS.config, FLAGS.workdir
    workers = check_workers(config.get("workers", 1))
    num_cpu_devices = config.get("num_cpu_devices", 0)
    prepare_platform(num_cpu_devices)
    from dlassign import main_job
    from dlassign.runtime.workdir import WorkdirLock

    main_job.check_blocks(config)
    start = time.time()
    with WorkdirLock(workdir):  # a second main job on it stops here, naming this one
        sections = run_tasks(main_job.studies(config, workdir), workers,
                             setup=functools.partial(worker_setup, num_cpu_devices))
    minutes = (time.time() - start) / 60
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write(main_job.report(sections, minutes, workers))
    print(f"wrote {path} in {minutes:.1f} minutes")


if __name__ == "__main__":
    run(main)
