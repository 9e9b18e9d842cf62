"""The main job: all four questions on embedded data, written up in WORKDIR/report.md.

  python -m experiments.main --workdir=runs/main [--config=configs/main.py]

Question 1 and 2: the convexity study. Question 3: the dense and convolutional grids with 3-fold
cross-validation, the best models on the test split, the Hessian spectrum of the best CNN and its
loss along the top eigenvector and a random direction.
Question 4: LeNet-5 and ResNet-18 on the digits at 32x32x3, compared; the weight porting checked
by a round trip (and, with PyTorch installed, against torchvision). Then a small edge-of-stability
run (full-batch gradient descent, sharpness against 2/eta; experiments.sharpness). A few minutes
on 2 cores.
"""

import os
import time

from absl import flags, logging
from ml_collections import config_flags

from experiments.common import clean_errors, prepare_platform, run, single_process

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/main.py", "Main-job config.",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Where the report, figures and every run go.")
flags.mark_flag_as_required("workdir")


def question3(config, workdir: str) -> str:
    from dlassign.analysis.hessian.study import checkpoint_spectrum, density_plot
    from dlassign.report import grid_table
    from dlassign.training.tune import tune

    parts = ["## Question 3: dense and convolutional networks, tuned by k-fold CV\n"]
    for key, title in (("tune_mlp", "Dense network"), ("tune_cnn", "Convolutional network")):
        cfg = config[key]
        results = tune(cfg, os.path.join(workdir, key))
        model = cfg.model.to_dict()
        parts.append(f"### {title} on {cfg.data.name}\n")
        parts.append(f"Model {model}; {cfg.optimizer.name} lr {cfg.optimizer.learning_rate}, "
                     f"batch {cfg.batch_size}, {cfg.num_epochs} epochs; preprocessing: pixels "
                     f"scaled to [0, 1] ({cfg.data.normalization}). {results['num_folds']}-fold "
                     "stratified CV per cell, then the best cell retrained on the whole training "
                     "split and scored on the test split.\n")
        parts.append(grid_table(results))
        parts.append(f"\n![{key}]({key}/heatmap.png)\n")
    s = config.spectrum
    spec = checkpoint_spectrum(os.path.join(workdir, "tune_cnn", "best"), s.num_examples,
                               s.batch_size, s.lanczos_order, s.num_draws, s.top_k,
                               s.power_iters, s.trace_samples, s.seed)
    density_plot(spec, os.path.join(workdir, "tune_cnn", "best", "hessian_density.png"))
    parts.append("### Hessian spectrum of the best CNN\n")
    parts.append(
        f"On {spec['num_examples']} training examples ({spec['num_params']} parameters): top "
        f"eigenvalues {', '.join(f'{v:.4g}' for v in spec['top_eigenvalues'])} (power "
        f"iteration with deflation); Lanczos range [{spec['lanczos_min']:.4g}, "
        f"{spec['lanczos_max']:.4g}], so the most negative eigenvalue is "
        f"{abs(spec['most_negative_to_top_ratio']):.2%} of the largest in size; trace "
        f"{spec['trace']:.4g} +- {spec['trace_standard_error']:.2g} (Hutchinson, "
        f"{spec['trace_samples']} probes). A trained network sits where the loss is almost "
        "convex but not quite: a few large positive directions, a bulk near zero, small "
        "negative ones.\n")
    parts.append("![spectrum](tune_cnn/best/hessian_density.png)\n")
    parts.append(landscape_section(config.landscape, os.path.join(workdir, "tune_cnn", "best")))
    return "\n".join(parts)


def landscape_section(cfg, run_dir: str) -> str:
    """The best CNN's loss along its top Hessian eigenvector and along a filter-normalised
    random direction (experiments.landscape), and the curvature check at the minimum."""
    from dlassign.analysis.landscape import checkpoint_landscape

    common = dict(dims=1, num_points=cfg.num_points, sample_size=cfg.sample_size,
                  batch_size=cfg.batch_size, seed=cfg.seed)
    eigen = checkpoint_landscape(run_dir, "eigen", lanczos_order=cfg.lanczos_order, **common)
    checkpoint_landscape(run_dir, "random", **common)
    c = eigen["curvature"][0]
    return (
        "### Loss landscape of the best CNN\n\n"
        f"The training loss on {eigen['num_examples']} examples along the top Hessian "
        f"eigenvector (eigenvalue {c['eigenvalue']:.4g}) and along a filter-normalised random "
        "direction (Li et al., 2018). Along the eigenvector the second difference over the "
        "step squared, divided by the eigenvalue, is "
        + ", ".join(f"{q:.4f} (step {h:.2g})" for q, h in zip(c["ratios"], c["steps"]))
        + ": 1 where the quadratic model holds; longer steps cross ReLU and max-pool kinks.\n\n"
        "![landscape along the top eigenvector](tune_cnn/best/landscape_eigen_1d.png) "
        "![landscape along a random direction](tune_cnn/best/landscape_random_1d.png)\n")


def question4(config, workdir: str) -> str:
    import numpy as np

    from dlassign.analysis.compare import compare
    from dlassign.porting import flax_to_torch, torch_to_flax
    from dlassign.training.evaluation import restore_run
    from dlassign.training.trainer import train_and_evaluate

    dirs = []
    for arch in ("lenet5", "resnet18"):
        d = os.path.join(workdir, f"transfer_{arch}")
        train_and_evaluate(config.transfer[arch], d)
        dirs.append(d)
    cmp = compare(dirs, os.path.join(workdir, "comparison"))
    parts = ["## Question 4: SVHN models, pretrained PyTorch weights in Flax\n",
             "**Not measured here:** SVHN and torchvision's ImageNet weights cannot be "
             "downloaded on this machine, so this report trains LeNet-5 and ResNet-18 from "
             "scratch on the digits resized to 32x32x3, through the same models, pipeline, "
             "collapse check and comparison that `configs/svhn.py` uses. The SVHN runs are one "
             "command each for a user with internet (see the README).\n",
             cmp["markdown"], "\n![comparison](comparison/comparison.png)\n"]
    run, state, _ = restore_run(dirs[1])
    variables = state.variables
    sd = flax_to_torch(variables, "resnet18")
    back = torch_to_flax(sd, "resnet18")
    import jax

    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.tree.map(np.asarray, variables)), jax.tree.leaves(back)))
    parts.append(f"Porting check: the trained ResNet-18 exported to a torch state dict "
                 f"({len(sd)} tensors, torchvision names) and ported back is "
                 f"{'bit-for-bit identical' if same else 'NOT identical'}.")
    try:
        import torch

        from dlassign.porting.torch_models import build

        model = build("resnet18", 10).double().eval()
        model.load_state_dict({k: torch.from_numpy(v if v.dtype == np.int64 else
                                                   v.astype(np.float64)) for k, v in sd.items()})
        x = np.random.default_rng(0).normal(size=(4, 3, 32, 32))
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        with jax.enable_x64(True):
            v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
            out = np.asarray(run.model.apply(v64, x.transpose(0, 2, 3, 1)))
        parts[-1] += (f" Loaded into torchvision's ResNet-18, it gives the same logits as the "
                      f"Flax model to {np.abs(out - ref).max():.1e} in float64.\n")
    except ImportError:
        parts[-1] += (" (PyTorch is not installed, so the torchvision comparison is skipped; "
                      "`pip install -e '.[torch]'` adds it.)\n")
    return "\n".join(parts)


def edge_of_stability(config, workdir: str) -> str:
    from dlassign.analysis import sharpness

    result = sharpness.write_outputs(sharpness.run_study(config),
                                     os.path.join(workdir, "sharpness"))
    model = result["model"]
    agree = result["power_lanczos_max_relative_difference"]
    checked = (f" Power iteration's values agree with a cold-started Lanczos on the same "
               f"parameters to {agree:.1e} (relative) at the points checked."
               if agree is not None else "")
    return "\n".join([
        "## Edge of stability (Cohen et al., ICLR 2021)\n",
        f"Full-batch gradient descent (constant step size eta, no momentum) on the digits' "
        f"{result['num_examples']} training images, MLP {tuple(model['hidden_sizes'])} "
        f"{model['activation']} ({result['num_params']} parameters), {result['num_steps']} "
        f"steps per run; the sharpness (top Hessian eigenvalue of the full-batch loss) every "
        f"{result['eval_every']} steps by warm-started power iteration.{checked} The digits are "
        "fit within a few hundred steps: the sharpness rises to about 2/eta within the first "
        "tens of steps, overshoots, is thrown back below it (the spikes in the loss), and then "
        "falls as the loss shrinks, so the plateau at 2/eta is short here; the MNIST study in "
        "docs/results.md (5,000 images, a wider network) stays at 2/eta for hundreds of "
        "steps.\n",
        result["table"], "\n![edge of stability](sharpness/sharpness.png)\n"])


@clean_errors
def main(argv):
    del argv
    single_process("experiments.main", "it is the small-data tour of the four studies; launch "
                   "experiments.train or experiments.tune across processes")
    prepare_platform(FLAGS.config.get("num_cpu_devices", 0))
    import jax

    from dlassign.analysis.convexity_report import run_and_report

    workdir = FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    sections = []
    logging.info("questions 1 and 2: convexity")
    results = run_and_report(FLAGS.config.convexity, os.path.join(workdir, "convexity"),
                             prefix="convexity/")
    sections.append(results["section"])
    logging.info("question 3: tuning")
    sections.append(question3(FLAGS.config, workdir))
    logging.info("question 4: the SVHN models on the digits")
    sections.append(question4(FLAGS.config, workdir))
    logging.info("edge of stability on the digits")
    sections.append(edge_of_stability(FLAGS.config.sharpness, workdir))
    minutes = (time.time() - start) / 60
    header = (f"# dlassign report\n\nMain job on embedded data, {minutes:.1f} minutes on "
              f"{jax.device_count()} {jax.default_backend()} devices (jax {jax.__version__}).\n\n")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(header + "\n".join(sections))
    print(f"wrote {os.path.join(workdir, 'report.md')} in {minutes:.1f} minutes")


if __name__ == "__main__":
    run(main)
