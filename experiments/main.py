"""The main job: all four questions on embedded data, written up in WORKDIR/report.md.

  python -m experiments.main --workdir=runs/main [--config=configs/main.py]

Question 1 and 2: the convexity study. Question 3: the dense and convolutional grids with 3-fold
cross-validation, the best models on the test split, the Hessian spectrum of the best CNN and its
loss along the top eigenvector and a random direction.
Question 4: LeNet-5 and ResNet-18 on the digits at 32x32x3, compared; the weight porting checked
by a round trip (and, with PyTorch installed, against torchvision). Then a small edge-of-stability
run (full-batch gradient descent, sharpness against 2/eta; experiments.sharpness).

The studies are independent and run `config.workers` at a time in worker processes
(`dlassign.runtime.workers`): one JAX process of small programs keeps about one core busy.
--config.workers=1 runs them one after another in this process.
"""

import functools
import os
import time

from absl import flags
from ml_collections import config_flags

from dlassign.runtime.workers import Task, check_workers, run_tasks
from experiments.common import clean_errors, prepare_platform, run, single_process, worker_setup

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/main.py", "Main-job config.",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Where the report, figures and every run go.")
flags.mark_flag_as_required("workdir")


def grid_study(config, workdir: str, key: str) -> str:
    """One of question 3's grids (`key`: tune_mlp or tune_cnn) with its best model on the test
    split; for the CNN also the best model's Hessian spectrum and loss landscape."""
    from dlassign.report import grid_table
    from dlassign.training.tune import tune

    cfg = config[key]
    results = tune(cfg, os.path.join(workdir, key))
    title = {"tune_mlp": "Dense network", "tune_cnn": "Convolutional network"}[key]
    parts = [f"### {title} on {cfg.data.name}\n",
             f"Model {cfg.model.to_dict()}; {cfg.optimizer.name} lr "
             f"{cfg.optimizer.learning_rate}, batch {cfg.batch_size}, {cfg.num_epochs} epochs; "
             f"preprocessing: pixels scaled to [0, 1] ({cfg.data.normalization}). "
             f"{results['num_folds']}-fold stratified CV per cell, then the best cell retrained "
             "on the whole training split and scored on the test split.\n",
             grid_table(results), f"\n![{key}]({key}/heatmap.png)\n"]
    if key == "tune_cnn":
        parts += [spectrum_section(config.spectrum, os.path.join(workdir, key, "best")),
                  landscape_section(config.landscape, os.path.join(workdir, key, "best"))]
    return "\n".join(parts)


def spectrum_section(s, run_dir: str) -> str:
    """The best CNN's Hessian spectrum: top eigenvalues, Lanczos density, Hutchinson trace."""
    from dlassign.analysis.hessian.study import checkpoint_spectrum, density_plot

    spec = checkpoint_spectrum(run_dir, s.num_examples, s.batch_size, s.lanczos_order,
                               s.num_draws, s.top_k, s.power_iters, s.trace_samples, s.seed)
    density_plot(spec, os.path.join(run_dir, "hessian_density.png"))
    return "\n".join([
        "### Hessian spectrum of the best CNN\n",
        f"On {spec['num_examples']} training examples ({spec['num_params']} parameters): top "
        f"eigenvalues {', '.join(f'{v:.4g}' for v in spec['top_eigenvalues'])} (power "
        f"iteration with deflation); Lanczos range [{spec['lanczos_min']:.4g}, "
        f"{spec['lanczos_max']:.4g}], so the most negative eigenvalue is "
        f"{abs(spec['most_negative_to_top_ratio']):.2%} of the largest in size; trace "
        f"{spec['trace']:.4g} +- {spec['trace_standard_error']:.2g} (Hutchinson, "
        f"{spec['trace_samples']} probes). A trained network sits where the loss is almost "
        "convex but not quite: a few large positive directions, a bulk near zero, small "
        "negative ones.\n",
        "![spectrum](tune_cnn/best/hessian_density.png)\n"])


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


TRANSFER = {"lenet5": "LeNet-5", "resnet18": "ResNet-18"}  # question 4's models


def transfer_study(config, workdir: str, arch: str) -> str:
    """Trains one of question 4's models on the digits at 32x32x3; for ResNet-18 also checks
    the weight porting on the trained parameters. Returns that check's sentence ('' for
    LeNet-5)."""
    from dlassign.training.trainer import train_and_evaluate

    run_dir = os.path.join(workdir, f"transfer_{arch}")
    train_and_evaluate(config.transfer[arch], run_dir)
    return porting_check(run_dir, arch) if arch == "resnet18" else ""


def porting_check(run_dir: str, arch: str) -> str:
    """The trained model exported to a torch state dict and ported back (bit-for-bit?), and,
    with PyTorch installed, loaded into torchvision's model (same logits in float64?)."""
    import jax
    import ml_collections
    import numpy as np

    from dlassign.porting import flax_to_torch, torch_to_flax
    from dlassign.runtime.checkpoint import load_variables
    from dlassign.training.trainer import build_model

    variables, meta = load_variables(run_dir)  # the newest checkpoint; no data, no train state
    model = build_model(ml_collections.ConfigDict(meta["config"]), 10)
    sd = flax_to_torch(variables, arch)
    back = torch_to_flax(sd, arch)
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(jax.tree.map(np.asarray, variables)), jax.tree.leaves(back)))
    text = (f"Porting check: the trained {TRANSFER[arch]} exported to a torch "
            f"state dict ({len(sd)} tensors, torchvision names) and ported back is "
            f"{'bit-for-bit identical' if same else 'NOT identical'}.")
    try:
        import torch

        from dlassign.porting.torch_models import build
    except ImportError:
        return text + (" (PyTorch is not installed, so the torchvision comparison is skipped; "
                       "`pip install -e '.[torch]'` adds it.)\n")
    reference = build(arch, 10).double().eval()
    reference.load_state_dict({k: torch.from_numpy(v if v.dtype == np.int64 else
                                                   v.astype(np.float64)) for k, v in sd.items()})
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32))
    with torch.no_grad():
        ref = reference(torch.from_numpy(x)).numpy()
    with jax.enable_x64(True):
        v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
        out = np.asarray(jax.jit(model.apply)(v64, x.transpose(0, 2, 3, 1)))
    return text + (f" Loaded into torchvision's {TRANSFER[arch]}, it gives the same logits as "
                   f"the Flax model to {np.abs(out - ref).max():.1e} in float64.\n")


def question4(workdir: str, porting: str, *_) -> str:
    """Question 4's section once both transfer runs are done (called with their results, the
    ResNet-18 porting check's sentence first): their comparison and the porting check."""
    from dlassign.analysis.compare import compare

    table = compare([os.path.join(workdir, f"transfer_{a}") for a in TRANSFER],
                    os.path.join(workdir, "comparison"))["markdown"]
    return "\n".join([
        "## Question 4: SVHN models, pretrained PyTorch weights in Flax\n",
        "**Not measured here:** SVHN and torchvision's ImageNet weights cannot be "
        "downloaded on this machine, so this report trains LeNet-5 and ResNet-18 from "
        "scratch on the digits resized to 32x32x3, through the same models, pipeline, "
        "collapse check and comparison that `configs/svhn.py` uses. The SVHN runs are one "
        "command each for a user with internet (see the README).\n",
        table, "\n![comparison](comparison/comparison.png)\n", porting])


def sharpness_runs(config, loss: str) -> dict:
    """The edge-of-stability runs of one loss (a task each, so the losses run side by side)."""
    import ml_collections

    from dlassign.analysis import sharpness

    cfg = config.sharpness.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.step_sizes = ml_collections.ConfigDict({loss: cfg.step_sizes[loss]})
    return sharpness.run_study(cfg)


def edge_of_stability(workdir: str, *per_loss: dict) -> str:
    """The edge-of-stability section from the runs of every loss (`sharpness_runs`)."""
    from dlassign.analysis import sharpness

    result = sharpness.write_outputs(sharpness.merge_studies(per_loss),
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
        f"{result['eval_every']} steps by warm-started power iteration.{checked} The MNIST "
        "study in docs/results.md uses 5,000 images and a wider network.\n",
        result["table"], "", *(f"* {line}" for line in result["findings"]),
        "\n![edge of stability](sharpness/sharpness.png)\n"])


def convexity_study(config, workdir: str) -> str:
    """Questions 1 and 2."""
    from dlassign.analysis.convexity_report import run_and_report

    return run_and_report(config.convexity, os.path.join(workdir, "convexity"),
                          prefix="convexity/")["section"]


def studies(config, workdir: str) -> list[Task]:
    """The job's studies, the longest (cold) first: a worker that comes free takes the next
    one that is ready. The edge-of-stability runs are a task per loss, so that the job's
    last minutes keep both workers busy; the sections built from several tasks' results wait
    for them and run in a worker, not in this process after the rest."""
    args = (config, workdir)
    losses = tuple(config.sharpness.step_sizes.keys())
    return [Task("tune_cnn", grid_study, (*args, "tune_cnn")),
            Task("transfer_resnet18", transfer_study, (*args, "resnet18")),
            Task("convexity", convexity_study, args),
            Task("tune_mlp", grid_study, (*args, "tune_mlp")),
            Task("transfer_lenet5", transfer_study, (*args, "lenet5")),
            *(Task(f"sharpness_{loss}", sharpness_runs, (config, loss)) for loss in losses),
            Task("sharpness", edge_of_stability, (workdir,),
                 after=tuple(f"sharpness_{loss}" for loss in losses)),
            Task("question4", question4, (workdir,),
                 after=("transfer_resnet18", "transfer_lenet5"))]


def check_blocks(config) -> None:
    """Checks the config blocks of the trainings before any worker starts, so that a bad field
    is one line naming its block, e.g. `tune_cnn.num_epochs=0 is invalid; ...`.

    Raises:
      ConfigError: the first bad field, under its block's name.
    """
    from dlassign.analysis.sharpness import validate_sharpness_config
    from dlassign.errors import ConfigError
    from dlassign.training.config_validation import validate_train_config, validate_tune_config

    blocks = [("tune_mlp", config.tune_mlp, validate_tune_config),
              ("tune_cnn", config.tune_cnn, validate_tune_config),
              *((f"transfer.{a}", config.transfer[a], validate_train_config) for a in TRANSFER),
              ("sharpness", config.sharpness, validate_sharpness_config)]
    for name, block, check in blocks:
        try:
            check(block)
        except ConfigError as e:
            message = str(e)
            field = message.split("=", 1)[0].split(" ", 1)[0]
            joined = "." if field.split(".")[0] in block.keys() else ": "
            raise ConfigError(f"{name}{joined}{message}") from None


@clean_errors
def main(argv):
    del argv
    single_process("experiments.main", "it is the small-data tour of the four studies; launch "
                   "experiments.train or experiments.tune across processes")
    config, workdir = FLAGS.config, FLAGS.workdir
    workers = check_workers(config.get("workers", 1))
    num_cpu_devices = config.get("num_cpu_devices", 0)
    prepare_platform(num_cpu_devices)
    import jax

    from dlassign.runtime.workdir import WorkdirLock

    check_blocks(config)
    start = time.time()
    with WorkdirLock(workdir):  # a second main job on it stops here, naming this one
        out = run_tasks(studies(config, workdir), workers,
                        setup=functools.partial(worker_setup, num_cpu_devices))
    sections = [out["convexity"],
                "## Question 3: dense and convolutional networks, tuned by k-fold CV\n",
                out["tune_mlp"], out["tune_cnn"],
                out["question4"], out["sharpness"]]
    minutes = (time.time() - start) / 60
    alongside = (f" The studies ran {workers} at a time in worker processes, so the training "
                 "times below include sharing the cores." if workers > 1 else "")
    header = (f"# dlassign report\n\nMain job on embedded data, {minutes:.1f} minutes on "
              f"{jax.device_count()} {jax.default_backend()} devices (jax {jax.__version__})."
              f"{alongside}\n\n")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(header + "\n".join(sections))
    print(f"wrote {os.path.join(workdir, 'report.md')} in {minutes:.1f} minutes")


if __name__ == "__main__":
    run(main)
