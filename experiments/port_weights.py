"""Ports PyTorch weights into a Flax checkpoint that experiments.train and evaluate can use.

  python -m experiments.port_weights --arch=resnet50 --torch_checkpoint=resnet50.pth \
      --output=runs/resnet50_ported [--config=configs/svhn.py:resnet50] [--replace_head]
  python -m experiments.port_weights --arch=resnet18 --torchvision_weights=IMAGENET1K_V1 ...

--torch_checkpoint takes .pth/.pt (needs torch) or .safetensors (does not). With --verify,
the torch model and the ported Flax model both classify the config's test split and the
agreement of their predictions is printed and stored. --export=FILE writes the reverse: the
Flax variables of the newest checkpoint in --from_workdir back to a torch state dict. A second port
into the same --output is refused unless --overwrite, which replaces the earlier port once the new
one is written.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from experiments.common import (
    clean_errors,
    output_dir,
    output_file,
    prepare_platform,
    run,
    single_process,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("arch", None, "Architecture with a torch name table, e.g. lenet5, alexnet, "
                                  "vgg16, resnet18 (see dlassign.models).")
flags.DEFINE_string("torch_checkpoint", None, "A .pth/.pt or .safetensors state dict.")
flags.DEFINE_string("torchvision_weights", None, "A torchvision weights enum, e.g. "
                                                 "IMAGENET1K_V1 (downloads; needs internet).")
flags.DEFINE_string("output", None, "Directory for the Flax checkpoint (created if missing). A "
                    "directory that already holds a port is refused unless --overwrite.")
flags.DEFINE_bool("overwrite", False, "Replace the port already in --output (the new checkpoint "
                  "is written whole before the old one goes; a training run's checkpoints are "
                  "never replaced).")
config_flags.DEFINE_config_file("config", None, "The training config the weights are for "
                                "(default: configs/svhn.py:<arch>).", lock_config=False)
flags.DEFINE_bool("replace_head", False, "Re-initialise a head whose class count differs.")
flags.DEFINE_bool("verify", False, "Compare torch and Flax predictions on the test split.")
flags.DEFINE_string("from_workdir", None, "Export: a workdir whose newest weights go to torch.")
flags.DEFINE_string("export", None, "Export: .pth or .safetensors file to write.")


def default_config(arch: str):
    from configs import svhn

    return svhn.get_config(arch)


@clean_errors
def main(argv):
    del argv
    single_process("experiments.port_weights", "converting a state dict needs no devices "
                   "beyond one")
    from dlassign.errors import PortingError

    # every flag is checked before a state dict is read or downloaded
    if FLAGS.export:
        if not FLAGS.from_workdir:
            raise PortingError("--export needs --from_workdir (a training or port_weights dir)")
        output_file("export", FLAGS.export, (".pth", ".pt", ".safetensors"))
    else:
        if not FLAGS.arch or not FLAGS.output:
            raise PortingError("--arch and --output are required")
        if bool(FLAGS.torch_checkpoint) == bool(FLAGS.torchvision_weights):
            raise PortingError("give exactly one of --torch_checkpoint and --torchvision_weights")
        output_dir("output", FLAGS.output)
    prepare_platform()
    from dlassign.porting import read_state_dict, torchvision_state_dict
    from dlassign.porting.port import check_output, export, port, verify
    from dlassign.runtime.files import write_json

    if FLAGS.export:
        export(FLAGS.from_workdir, FLAGS.arch, FLAGS.export)
        return
    check_output(FLAGS.output, FLAGS.overwrite)
    if FLAGS.torch_checkpoint:
        state_dict, source = read_state_dict(FLAGS.torch_checkpoint), FLAGS.torch_checkpoint
    else:
        state_dict = torchvision_state_dict(FLAGS.arch, FLAGS.torchvision_weights)
        source = f"torchvision {FLAGS.arch} {FLAGS.torchvision_weights}"
    config = FLAGS.config if FLAGS.config is not None else default_config(FLAGS.arch)
    port(FLAGS.arch, state_dict, config, FLAGS.replace_head, FLAGS.output, source,
         FLAGS.overwrite)
    summary = {"arch": FLAGS.arch, "source": source, "output": FLAGS.output}
    if FLAGS.verify:
        summary["verify"] = verify(FLAGS.arch, state_dict, FLAGS.output)
    write_json(os.path.join(FLAGS.output, "port.json"), summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    run(main)
