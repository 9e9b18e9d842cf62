"""The write-up's CNN on MNIST: conv 32, pool, conv 64, pool, dense 128, dense 10.

  python -m experiments.train --config=configs/mnist_cnn.py --workdir=runs/mnist_cnn \
      --config.data.data_dir=PATH/TO/MNIST

Preprocessing: pixels scaled to [0, 1]; random shifts of up to 2 pixels while training.
"""

import ml_collections

from configs import base


def get_config():
    c = base.get_config()
    c.data.name = "mnist"
    c.data.random_crop = 2
    c.model = ml_collections.ConfigDict(dict(
        name="cnn", conv_features=(32, 64), dense_width=128, activation="relu", dropout=0.3))
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 2e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 15
    c.log_every_steps = 200
    return c
