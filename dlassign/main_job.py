"""The main job's studies and its report (`experiments.main` is the entry point).

Question 1 and 2: the convexity study. Question 3: the dense and convolutional grids with k-fold
cross-validation, the best models on the test split, the Hessian spectrum of the best CNN and its
loss along the top eigenvector and a random direction. Question 4: LeNet-5 and ResNet-18 on the
transfer configs' data, compared, and the weight porting checked on the trained ResNet-18. Then a
small edge-of-stability run (full-batch gradient descent, sharpness against 2/eta).

Each study is a `workers.Task` returning its report section; every sentence that states a
result is computed from the measured numbers (`analysis.findings`, `convexity_report`).
"""

from __future__ import annotations

import os

from dlassign.runtime.workers import Task

TRANSFER = {"lenet5": "LeNet-5", "resnet18": "ResNet-18"}  # question 4's models
GRID_TITLES = {"tune_mlp": "Dense network", "tune_cnn": "Convolutional network"}


def grid_study(config, workdir: str, key: str) -> str:
    """One of question 3's grids (`key`: tune_mlp or tune_cnn) with its best model on the test
    split; for the CNN also the best model's Hessian spectrum, its Gauss-Newton split and loss
    landscape."""
    from dlassign.analysis.gauss_newton import checkpoint_section
    from dlassign.report import grid_table
    from dlassign.training.tune import tune

    cfg = config[key]
    results = tune(cfg, os.path.join(workdir, key))
    parts = [f"### {GRID_TITLES[key]} on {cfg.data.name}\n",
             f"Model {cfg.model.to_dict()}; {cfg.optimizer.name} lr "
             f"{cfg.optimizer.learning_rate}, batch {cfg.batch_size}, {cfg.num_epochs} epochs; "
             f"preprocessing: pixels scaled to [0, 1] ({cfg.data.normalization}). "
             f"{results['num_folds']}-fold stratified CV per cell, then the best cell retrained "
             "on the whole training split and scored on the test split.\n",
             grid_table(results), f"\n![{key}]({key}/heatmap.png)\n"]
    if key == "tune_cnn":
        best = os.path.join(workdir, key, "best")
        parts += [spectrum_section(config.spectrum, best), checkpoint_section(best)["section"],
                  landscape_section(config.landscape, best)]
    return "\n".join(parts)


def spectrum_section(s, run_dir: str) -> str:
    """The best CNN's Hessian spectrum: top eigenvalues, Lanczos density, Hutchinson trace."""
    from dlassign.analysis import findings
    from dlassign.analysis.hessian.study import checkpoint_spectrum, density_plot

    spec = checkpoint_spectrum(run_dir, s.num_examples, s.batch_size, s.lanczos_order,
                               s.num_draws, s.top_k, s.power_iters, s.trace_samples, s.seed)
    density_plot(spec, os.path.join(run_dir, "hessian_density.png"))
    return "\n".join([
        "### Hessian spectrum of the best CNN\n",
        f"On {spec['num_examples']} training examples ({spec['num_params']} parameters): top "
        f"eigenvalues {', '.join(f'{v:.4g}' for v in spec['top_eigenvalues'])} (power "
        f"iteration with deflation); Lanczos range [{spec['lanczos_min']:.4g}, "
        f"{spec['lanczos_max']:.4g}]; trace {spec['trace']:.4g} +- "
        f"{spec['trace_standard_error']:.2g} (Hutchinson, {spec['trace_samples']} probes). "
        f"{findings.spectrum(spec)}\n",
        "![spectrum](tune_cnn/best/hessian_density.png)\n"])


def landscape_section(cfg, run_dir: str) -> str:
    """The best CNN's loss along its top Hessian eigenvector and along a filter-normalised
    random direction, and the curvature check at the minimum."""
    from dlassign.analysis import findings
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
        "step squared, divided by the eigenvalue (1 where the quadratic model holds), is "
        + ", ".join(f"{q:.4f} (step {h:.2g})" for q, h in zip(c["ratios"], c["steps"]))
        + f". {findings.quadratic_model(c)}\n\n"
        "![landscape along the top eigenvector](tune_cnn/best/landscape_eigen_1d.png) "
        "![landscape along a random direction](tune_cnn/best/landscape_random_1d.png)\n")


def transfer_study(config, workdir: str, arch: str) -> str:
    """Trains one of question 4's models; for ResNet-18 also checks the weight porting on the
    trained parameters. Returns that check's sentences ('' for LeNet-5)."""
    from dlassign.porting.check import porting_check
    from dlassign.training.trainer import train_and_evaluate

    run_dir = os.path.join(workdir, f"transfer_{arch}")
    train_and_evaluate(config.transfer[arch], run_dir)
    return porting_check(run_dir, arch, TRANSFER[arch])["text"] if arch == "resnet18" else ""


def transfer_setting(config) -> str:
    """What question 4's runs trained on, from their configs: SVHN, or a stand-in."""
    runs = [config.transfer[a] for a in TRANSFER]
    data = sorted({r.data.name for r in runs})
    pretrained = [TRANSFER[a] for a, r in zip(TRANSFER, runs)
                  if r.get("torchvision_weights") or r.get("init_checkpoint")]
    start = (f"{', '.join(pretrained)} from pretrained weights" if pretrained
             else "both from scratch")
    if data == ["svhn"]:
        return f"LeNet-5 and ResNet-18 on SVHN, {start}.\n"
    return (f"**Not measured here:** SVHN. This report trains LeNet-5 and ResNet-18 on "
            f"{', '.join(data)}, {start}, through the same models, pipeline, collapse check and "
            "comparison that `configs/svhn.py` uses; the SVHN runs are one command each (see the "
            "README).\n")


def question4(config, workdir: str, porting: str, *_) -> str:
    """Question 4's section once both transfer runs are done (called with their results, the
    ResNet-18 porting check's sentences first): their comparison and the porting check."""
    from dlassign.analysis.compare import compare

    table = compare([os.path.join(workdir, f"transfer_{a}") for a in TRANSFER],
                    os.path.join(workdir, "comparison"))["markdown"]
    return "\n".join(["## Question 4: SVHN models, pretrained PyTorch weights in Flax\n",
                      transfer_setting(config), table,
                      "\n![comparison](comparison/comparison.png)\n", porting])


def sharpness_runs(config, loss: str) -> dict:
    """The edge-of-stability runs of one loss (a task each, so the losses run side by side)."""
    import ml_collections

    from dlassign.analysis import sharpness

    cfg = config.sharpness.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.step_sizes = ml_collections.ConfigDict({loss: cfg.step_sizes[loss]})
    return sharpness.run_study(cfg)


def edge_of_stability_text(result: dict) -> str:
    """The edge-of-stability section from the merged study (`sharpness.write_outputs`): its
    setup, table and `findings`, the sentences `sharpness.edge_of_stability_findings` computes
    from the measured traces."""
    model = result["model"]
    return "\n".join([
        "## Edge of stability (Cohen et al., ICLR 2021)\n",
        f"Full-batch gradient descent (constant step size eta, no momentum) on "
        f"{result['num_examples']} {result['dataset']} training images, MLP "
        f"{tuple(model['hidden_sizes'])} {model['activation']} ({result['num_params']} "
        f"parameters), {result['num_steps']} steps per run; the sharpness (top Hessian "
        f"eigenvalue of the full-batch loss) every {result['eval_every']} steps by "
        "warm-started power iteration. docs/results.md has the same study on MNIST.\n",
        result["table"], "", *(f"* {line}" for line in result["findings"]),
        "\n![edge of stability](sharpness/sharpness.png)\n"])


def edge_of_stability(workdir: str, *per_loss: dict) -> str:
    """The edge-of-stability section from the runs of every loss (`sharpness_runs`)."""
    from dlassign.analysis import sharpness

    return edge_of_stability_text(sharpness.write_outputs(
        sharpness.merge_studies(per_loss), os.path.join(workdir, "sharpness")))


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
            Task("question4", question4, args, after=("transfer_resnet18", "transfer_lenet5"))]


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


def report(sections: dict[str, str], minutes: float, workers: int) -> str:
    """The report from the studies' sections (`studies`' task names), the job's time and how
    many studies ran at once."""
    import jax

    alongside = (f" The studies ran {workers} at a time in worker processes, so the training "
                 "times below include sharing the cores." if workers > 1 else "")
    header = (f"# dlassign report\n\nMain job on embedded data, {minutes:.1f} minutes on "
              f"{jax.device_count()} {jax.default_backend()} devices (jax {jax.__version__})."
              f"{alongside}\n\n")
    return header + "\n".join([
        sections["convexity"],
        "## Question 3: dense and convolutional networks, tuned by k-fold CV\n",
        sections["tune_mlp"], sections["tune_cnn"], sections["question4"],
        sections["sharpness"]])
