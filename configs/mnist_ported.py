"""MNIST as the PyTorch reference models see it: padded to 32x32, three channels, in [0, 1].

Used to check ported PyTorch weights on real data and to fine-tune them in Flax:

  python -m experiments.train_torch_reference --arch=lenet5 --data_dir=PATH/TO/MNIST \
      --output=runs/torch_lenet5.pth
  python -m experiments.port_weights --arch=lenet5 --torch_checkpoint=runs/torch_lenet5.pth \
      --config=configs/mnist_ported.py:lenet5 --config.data.data_dir=PATH/TO/MNIST \
      --output=runs/lenet5_ported --verify
  python -m experiments.train --config=configs/mnist_ported.py:lenet5 \
      --config.data.data_dir=PATH/TO/MNIST --config.init_checkpoint=runs/lenet5_ported \
      --workdir=runs/lenet5_finetuned

The argument after ':' is lenet5 or resnet18.
"""

import ml_collections

from configs import base


def get_config(arch: str = "lenet5") -> ml_collections.ConfigDict:
    c = base.get_config()
    c.data.name = "mnist"
    c.data.pad_to = 32
    c.data.channels = 3
    c.data.normalization = "scale"
    c.model = ml_collections.ConfigDict({"name": arch})
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.schedule = "cosine"
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_epochs = 1
    c.log_every_steps = 100
    return c
