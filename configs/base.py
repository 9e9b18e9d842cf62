"""Defaults shared by every training config; the other configs start from `get_config()`.

Not a runnable experiment on its own terms, but it runs:
  python -m experiments.train --config=configs/base.py --workdir=runs/base
trains a one-hidden-layer MLP on the embedded digits.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"
    c.data.data_dir = ""          # local raw files; empty: TFDS (or embedded for digits)
    c.data.tfds_data_dir = ""     # where TFDS keeps prepared data; empty: TFDS's default
    c.data.subset_fraction = 1.0  # stratified fraction of the training split
    c.data.validation_fraction = 0.0  # stratified part of the training split held out (0: none)
    c.data.pad_to = 0             # zero-pad to this square size (0: off)
    c.data.image_size = 0         # bilinear resize to this square size (0: native)
    c.data.channels = 0           # 3 repeats a grayscale channel (0: as stored)
    c.data.normalization = "scale"  # scale | standardize | imagenet
    c.data.random_crop = 0        # random shifts of up to this many pixels while training

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlp"
    c.model.hidden_sizes = (128,)
    c.model.activation = "relu"
    c.model.dropout = 0.0

    c.loss = "cross_entropy"      # cross_entropy | mse (softmax probabilities) | square (logits)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"     # sgd | adam | adamw
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9    # sgd only
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 0.0  # sgd: L2 on the gradient; adamw: decoupled; adam: unused
    c.optimizer.schedule = "constant"  # constant | cosine
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.grad_clip_norm = 0.0
    c.optimizer.backbone_lr_scale = 1.0  # < 1 trains a pretrained backbone slower than the head
    c.optimizer.frozen = ()       # top-level module names not trained, e.g. ('conv1', 'layer1')

    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_epochs = 10
    c.log_every_steps = 50
    c.checkpoint_every_steps = 0  # 0: once per epoch
    c.eval_every_steps = 0        # validation interval (with validation_fraction); 0: each epoch
    c.checkpoint_best = False     # also keep the checkpoint with the best validation accuracy
    c.steps_per_call = 0          # steps per jitted call (a scan); 0: chosen from the timed first
                                  # calls, up to 8 (training/loop.py, Pacer)
    c.max_call_seconds = 5.0      # a call runs no more steps than fit in this (as timed), so a
                                  # stop request or a log line waits for at most about this
    c.keep_checkpoints = 3
    c.init_checkpoint = ""        # start from ported weights (experiments.port_weights output)
    c.torchvision_weights = ""    # e.g. IMAGENET1K_V1: download through torchvision and port
    c.continue_with_changes = False  # resume a workdir whose training config differs (recorded)

    # Curvature during training (dlassign.analysis.hessian.tracking): the top Hessian eigenvalue
    # of the training loss on a fixed stratified training sample, by warm-started power
    # iteration, into TensorBoard (curvature/) and results.json. See docs/performance.md for
    # its cost.
    c.curvature = ml_collections.ConfigDict()
    c.curvature.every_steps = 0   # 0: off; N: at every multiple of N steps
    c.curvature.num_examples = 256  # the sample (stratified, chosen by the seed)
    c.curvature.power_iters = 10  # Hessian-vector products per measurement at most
    c.curvature.cold_iters = 30   # Lanczos steps of a cold start (the first of a process)
    c.curvature.tol = 1e-3        # converged: ||Hv - lambda v|| / |lambda| below this
    c.curvature.trace_samples = 0  # Hutchinson probes for the trace (0: no trace)

    c.dtype = "float32"           # float32 | bfloat16 (compute; parameters stay float32)
    c.impl = "auto"               # auto | cpu | xla | im2col: CPU fast paths (dlassign.kernels)
    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = 0        # 0: all (on CPU host devices: all for small models, else 1)
    c.mesh.cpu_data_parallel_max_params = 1_000_000  # see runtime.parallel.auto_num_devices
    c.mesh.cpu_data_parallel_min_step_flops = 1e9  # smaller steps run on one CPU device
    c.mesh.shard_params = False   # shard parameters and optimizer state over the mesh
    c.num_cpu_devices = 0         # CPU host devices to create (0: one per core)
    return c


def writeup_tune(width_field: str, share_programs: bool = True) -> dict:
    """The write-up's grid (question 3) for `c.tune`: width {32, 64, 128} x activation {relu,
    tanh, sigmoid}, 3-fold stratified CV. `width_field` is 'hidden_sizes' (an MLP with one
    hidden layer of that width) or 'dense_width' (the CNN's dense layer). `share_programs`:
    the cells share compiled programs, narrower widths padded (`tune.SharedPrograms`),
    which saves compiling for cells of seconds and costs step time in cells of minutes."""
    widths = [32, 64, 128]
    if width_field == "hidden_sizes":
        widths = [(w,) for w in widths]
    return dict(num_folds=3, mode="auto", share_programs=share_programs,
                grid={"model": {width_field: widths, "activation": ["relu", "tanh", "sigmoid"]}})
