"""Trains a PyTorch LeNet-5 or ResNet-18 on MNIST (32x32, three channels) and saves a .pth.

  python -m experiments.train_torch_reference --arch=resnet18 --data_dir=PATH/TO/MNIST \
      --epochs=1 --output=runs/torch_resnet18.pth

The reference for porting on real weights and real data (needs the torch extra). Data and
preprocessing come from dlassign.data with configs/mnist_ported.py, so both frameworks see the
same pixels. Prints the torch model's test accuracy and writes it beside the .pth as JSON.
"""

import json
import time

import numpy as np
from absl import flags, logging

from experiments.common import clean_errors, run, single_process

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", "lenet5", ["lenet5", "resnet18"], "Architecture.")
flags.DEFINE_string("data_dir", None, "Directory of the MNIST IDX files.")
flags.DEFINE_integer("epochs", 1, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate (momentum 0.9).")
flags.DEFINE_integer("seed", 0, "Torch seed.")
flags.DEFINE_string("output", None, "Where to write the .pth state dict.")
flags.mark_flags_as_required(["data_dir", "output"])


@clean_errors
def main(argv):
    del argv
    single_process("experiments.train_torch_reference", "it is a plain PyTorch script")
    import torch

    from configs import mnist_ported
    from dlassign.data import prepare
    from dlassign.porting.torch_models import build

    torch.manual_seed(FLAGS.seed)
    config = mnist_ported.get_config(FLAGS.arch)
    config.data.data_dir = FLAGS.data_dir
    data = prepare(config.data, config.seed)
    to_tensor = lambda x: torch.from_numpy(
        (x.astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy())
    model = build(FLAGS.arch, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=FLAGS.learning_rate, momentum=0.9)
    rng = np.random.default_rng(FLAGS.seed)
    start = time.perf_counter()
    for epoch in range(FLAGS.epochs):
        model.train()
        order = rng.permutation(len(data.train))
        for i in range(0, len(order) - FLAGS.batch_size + 1, FLAGS.batch_size):
            idx = order[i:i + FLAGS.batch_size]
            loss = torch.nn.functional.cross_entropy(
                model(to_tensor(data.train.images[idx])),
                torch.from_numpy(data.train.labels[idx]).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (i // FLAGS.batch_size) % 100 == 0:
                logging.info("epoch %d step %d loss %.4f", epoch, i // FLAGS.batch_size,
                             loss.item())
    model.eval()
    with torch.no_grad():
        preds = np.concatenate([model(to_tensor(data.test.images[i:i + 1000])).argmax(1).numpy()
                                for i in range(0, len(data.test), 1000)])
    accuracy = float(np.mean(preds == data.test.labels))
    torch.save(model.state_dict(), FLAGS.output)
    summary = {"arch": FLAGS.arch, "epochs": FLAGS.epochs, "test_accuracy": accuracy,
               "train_seconds": time.perf_counter() - start, "output": FLAGS.output}
    with open(FLAGS.output + ".json", "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(main)
