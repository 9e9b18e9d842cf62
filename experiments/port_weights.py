"""Ports PyTorch weights into a Flax checkpoint that experiments.train and evaluate can use.

  python -m experiments.port_weights --arch=resnet50 --torch_checkpoint=resnet50.pth \
      --output=runs/resnet50_ported [--config=configs/svhn.py:resnet50] [--replace_head]
  python -m experiments.port_weights --arch=resnet18 --torchvision_weights=IMAGENET1K_V1 ...

--torch_checkpoint takes .pth/.pt (needs torch) or .safetensors (does not). With --verify,
the torch model and the ported Flax model both classify the config's test split and the
agreement of their predictions is printed and stored. --export=FILE writes the reverse: the
Flax variables of the newest checkpoint in --from_workdir back to a torch state dict.
"""

import json
import os

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from experiments.common import clean_errors, prepare_platform, run

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "Architecture: lenet5, alexnet, vgg16, vgg16_bn, resnet18, "
                                  "resnet34, resnet50, resnet101.")
flags.DEFINE_string("torch_checkpoint", None, "A .pth/.pt or .safetensors state dict.")
flags.DEFINE_string("torchvision_weights", None, "A torchvision weights enum, e.g. "
                                                 "IMAGENET1K_V1 (downloads; needs internet).")
flags.DEFINE_string("output", None, "Directory for the Flax checkpoint.")
config_flags.DEFINE_config_file("config", None, "The training config the weights are for "
                                "(default: configs/svhn.py:<arch>).", lock_config=False)
flags.DEFINE_bool("replace_head", False, "Re-initialise a head whose class count differs.")
flags.DEFINE_bool("verify", False, "Compare torch and Flax predictions on the test split.")
flags.DEFINE_string("from_workdir", None, "Export: a workdir whose newest weights go to torch.")
flags.DEFINE_string("export", None, "Export: .pth or .safetensors file to write.")


def default_config(arch: str):
    from configs import svhn

    return svhn.get_config(arch)


def port(arch, state_dict, config, replace_head, output, source):
    import jax

    from dlassign.checkpoint import Checkpointer
    from dlassign.data import dataset_info
    from dlassign.porting import torch_to_flax

    num_classes = dataset_info(config.data.name).num_classes
    variables = torch_to_flax(state_dict, arch, num_classes, replace_head,
                              rng=jax.random.PRNGKey(config.seed))
    with config.unlocked():
        config.model.name = arch
    meta = {"kind": "variables", "arch": arch, "source": source, "num_classes": num_classes,
            "config": config.to_dict()}
    with Checkpointer(os.path.join(output, "checkpoints")) as ckpt:
        ckpt.save(0, {"params": variables["params"], "batch_stats": variables["batch_stats"]},
                  meta)
    return variables


def verify(arch, state_dict, output) -> dict:
    """Predictions of the torch model and of the ported checkpoint on the whole test split."""
    import torch

    from dlassign.evaluation import restore_run
    from dlassign.porting.torch_models import build
    from dlassign.train import compile_steps, predict

    run, state, _ = restore_run(output)
    _, eval_step = compile_steps(run, state)
    flax_preds, _ = predict(state, run.dataset.test, eval_step, run.mesh,
                            run.config.eval_batch_size)
    model = build(arch, run.dataset.num_classes)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    model.eval()
    norm = run.dataset.normalizer
    torch_preds = []
    with torch.no_grad():
        for i in range(0, len(run.dataset.test), 500):
            x = run.dataset.test.images[i:i + 500].astype(np.float32) / 255.0
            x = (x - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
            logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
            torch_preds.append(logits.argmax(1).numpy())
    torch_preds = np.concatenate(torch_preds)
    labels = run.dataset.test.labels
    return {"num_examples": int(labels.size),
            "agreement": float(np.mean(torch_preds == flax_preds)),
            "torch_accuracy": float(np.mean(torch_preds == labels)),
            "flax_accuracy": float(np.mean(flax_preds == labels))}


def export(workdir: str, arch: str, path: str) -> None:
    from dlassign.evaluation import restore_run
    from dlassign.porting import flax_to_torch, write_state_dict

    run, state, _ = restore_run(workdir)
    write_state_dict(flax_to_torch(state.variables, arch or run.config.model.name), path)
    logging.info("wrote %s", path)


@clean_errors
def main(argv):
    del argv
    prepare_platform()
    from dlassign.errors import PortingError
    from dlassign.porting import read_state_dict, torchvision_state_dict
    from dlassign.train import write_json

    if FLAGS.export:
        if not FLAGS.from_workdir:
            raise PortingError("--export needs --from_workdir (a training or port_weights dir)")
        export(FLAGS.from_workdir, FLAGS.arch, FLAGS.export)
        return
    if not FLAGS.arch or not FLAGS.output:
        raise PortingError("--arch and --output are required")
    if bool(FLAGS.torch_checkpoint) == bool(FLAGS.torchvision_weights):
        raise PortingError("give exactly one of --torch_checkpoint and --torchvision_weights")
    if FLAGS.torch_checkpoint:
        state_dict, source = read_state_dict(FLAGS.torch_checkpoint), FLAGS.torch_checkpoint
    else:
        state_dict = torchvision_state_dict(FLAGS.arch, FLAGS.torchvision_weights)
        source = f"torchvision {FLAGS.arch} {FLAGS.torchvision_weights}"
    config = FLAGS.config if FLAGS.config is not None else default_config(FLAGS.arch)
    port(FLAGS.arch, state_dict, config, FLAGS.replace_head, FLAGS.output, source)
    summary = {"arch": FLAGS.arch, "source": source, "output": FLAGS.output}
    if FLAGS.verify:
        summary["verify"] = verify(FLAGS.arch, state_dict, FLAGS.output)
    write_json(os.path.join(FLAGS.output, "port.json"), summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(main)
