"""The CNN grid (dense width x activation, 3-fold CV) on the embedded 8x8 digits.

  python -m experiments.tune --config=configs/tune_digits_cnn.py --workdir=runs/tune_digits_cnn

'same' padding, since two valid 3x3 convolutions and pools do not fit in 8x8 pixels.
"""

import ml_collections

from configs import base


def get_config():
    c = base.get_config()
    c.model = ml_collections.ConfigDict(dict(name="cnn", conv_features=(16, 32), dense_width=64,
                                             activation="relu", padding="same", dropout=0.0))
    c.optimizer.learning_rate = 2e-3
    c.batch_size = 32
    c.eval_batch_size = 450
    c.num_epochs = 20
    c.log_every_steps = 0
    c.tune = base.writeup_tune("dense_width")
    return c
