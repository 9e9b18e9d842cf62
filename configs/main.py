"""The main job: every question's study on embedded data, one report.

  python -m experiments.main --workdir=runs/main

Runs offline (scikit-learn's digits; no download). Each block is a complete config of its own
experiment and can be overridden, e.g. --config.tune_mlp.data.name=mnist
--config.tune_mlp.data.data_dir=PATH/TO/MNIST.
"""

import ml_collections

from configs import convexity, digits32, sharpness, tune_digits_cnn, tune_digits_mlp


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.convexity = convexity.get_config()
    c.tune_mlp = tune_digits_mlp.get_config()
    c.tune_cnn = tune_digits_cnn.get_config()
    c.spectrum = ml_collections.ConfigDict(dict(
        num_examples=1024, batch_size=256, lanczos_order=60, num_draws=2, top_k=3,
        power_iters=50, trace_samples=50, seed=0))
    c.landscape = ml_collections.ConfigDict(dict(  # the best CNN's 1-D slices, kept small
        num_points=11, sample_size=256, batch_size=256, lanczos_order=20, seed=0))
    c.transfer = ml_collections.ConfigDict(dict(lenet5=digits32.get_config("lenet5"),
                                                resnet18=digits32.get_config("resnet18")))
    c.transfer.resnet18.num_epochs = 8
    # The job's runs checkpoint every 500 steps and at the end, not every epoch: their epochs
    # take seconds and a save has a fixed cost, about a second for ResNet-18's state
    # (docs/performance.md).
    for run in (c.tune_mlp, c.tune_cnn, c.transfer.lenet5, c.transfer.resnet18):
        run.checkpoint_every_steps = 500
    c.sharpness = sharpness.get_config("digits")  # edge of stability, kept to a few tens of s
    c.sharpness.num_steps = 300
    c.sharpness.lanczos_checks = 1
    c.num_cpu_devices = 0
    c.workers = 2  # studies at once, each in its own process (1: one after another, in-process)
    return c
