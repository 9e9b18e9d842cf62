"""The write-up's dense-network grid on MNIST: width {32, 64, 128} x activation {relu, tanh,
sigmoid}, one hidden layer, 3-fold stratified CV, then the best cell on the test split.

  python -m experiments.tune --config=configs/tune_mnist_mlp.py --workdir=runs/tune_mnist_mlp \
      --config.data.data_dir=PATH/TO/MNIST
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.name = "mnist"
    c.model.hidden_sizes = (128,)
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 10
    c.log_every_steps = 0
    c.tune = base.writeup_tune("hidden_sizes", share_programs=False)  # cells of minutes
    return c
