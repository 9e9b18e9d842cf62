"""Dense network on MNIST: 784-1024-1024-10, ReLU, dropout 0.2, AdamW with cosine decay.

  python -m experiments.train --config=configs/mnist_mlp.py --workdir=runs/mnist_mlp \
      --config.data.data_dir=PATH/TO/MNIST

Preprocessing: pixels scaled to [0, 1], images flattened by the model, no augmentation.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.data.name = "mnist"
    c.model.name = "mlp"
    c.model.hidden_sizes = (1024, 1024)
    c.model.activation = "relu"
    c.model.dropout = 0.2
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.schedule = "cosine"
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 30
    c.log_every_steps = 200
    return c
