"""The SVHN models on the embedded digits resized to 32x32x3: the offline stand-in for question 4.

  python -m experiments.train --config=configs/digits32.py:resnet18 --workdir=runs/digits_r18

Trained from scratch (no pretrained weights offline), to exercise the same models, pipeline,
collapse check and comparison as configs/svhn.py. The argument after ':' is the architecture.
"""

import ml_collections

from configs import base
from dlassign.models import architecture


def get_config(arch: str = "resnet18") -> ml_collections.ConfigDict:
    c = base.get_config()
    # 32 px as SVHN's crops, or the next multiple of 32 an architecture needs (AlexNet: 64)
    c.data.image_size = max(32, -(-architecture(arch).smallest_input() // 32) * 32)
    c.data.channels = 3
    c.data.normalization = "standardize"
    c.data.random_crop = 2
    c.model = ml_collections.ConfigDict({"name": arch})
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_epochs = 1.0
    c.batch_size = 64
    c.eval_batch_size = 450
    c.num_epochs = 15
    c.log_every_steps = 0
    return c
