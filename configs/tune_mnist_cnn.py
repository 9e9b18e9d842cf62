"""The write-up's CNN grid on MNIST: dense width {32, 64, 128} x activation {relu, tanh,
sigmoid}, 3-fold stratified CV, then the best cell on the test split.

  python -m experiments.tune --config=configs/tune_mnist_cnn.py --workdir=runs/tune_mnist_cnn \
      --config.data.data_dir=PATH/TO/MNIST
"""

import ml_collections

from configs import base


def get_config():
    c = base.get_config()
    c.data.name = "mnist"
    c.model = ml_collections.ConfigDict(dict(name="cnn", conv_features=(32, 64), dense_width=128,
                                             activation="relu", dropout=0.0))
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 3
    c.log_every_steps = 0
    c.tune = base.writeup_tune("dense_width", share_programs=False)  # cells of minutes
    return c
