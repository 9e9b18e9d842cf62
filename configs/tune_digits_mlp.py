"""Dense-network grid on the embedded digits (the main job's MNIST-question stand-in).

  python -m experiments.tune --config=configs/tune_digits_mlp.py --workdir=runs/tune_digits_mlp

The write-up's grid (width {32, 64, 128} x activation {relu, tanh, sigmoid}, 3-fold CV) on
scikit-learn's 8x8 digits (1,347 train / 450 test). No download needed.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.hidden_sizes = (64,)
    c.num_epochs = 30
    c.batch_size = 32
    c.eval_batch_size = 500
    c.log_every_steps = 0
    c.tune = base.writeup_tune("hidden_sizes")
    return c
