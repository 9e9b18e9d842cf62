"""The edge-of-stability study (experiments.sharpness): the 2/eta detection on synthetic traces,
a few steps of full-batch gradient descent on the digits (the sharpness rises; power iteration
agrees with Lanczos), its config and its one-line errors."""

import json

import numpy as np
import pytest

from configs import sharpness as sharpness_config
from dlassign.analysis import sharpness
from dlassign.errors import ConfigError
from tests.test_faults import cli, one_line_error


def test_reach_and_ratios_on_a_synthetic_trace():
    """A trace that rises linearly to 2/eta = 10 by step 100, then swings +-5% around 10.2."""
    steps = np.arange(0, 301, 10)
    trace = np.where(steps <= 100, 2 + 8 * steps / 100, 10.2 + 0.5 * np.cos(steps))
    s = sharpness.edge_of_stability_summary(steps, trace, eta=0.2)
    assert s["threshold"] == pytest.approx(10.0)
    # 0.9 * 10 = 9 is first met at step 90 (2 + 7.2 = 9.2; step 80 gives 8.4)
    assert s["reach_step"] == 90
    after = trace[9:] / 10.0
    assert s["mean_ratio"] == pytest.approx(after.mean())
    assert s["median_ratio"] == pytest.approx(np.median(after))
    assert s["first_within_step"] == 90 and s["final_ratio"] == pytest.approx(after[-1])
    assert s["min_ratio"] == pytest.approx(after.min()) and s["max_ratio"] == pytest.approx(
        after.max())
    assert s["within_fraction"] == 1.0 and s["measurements_after"] == len(after)
    assert s["last_within_step"] == 300

    # exactly at (1 - tolerance) * 2/eta counts as reached; just below does not
    assert sharpness.edge_of_stability_summary([0, 1], [1.0, 9.0], 0.2)["reach_step"] == 1
    never = sharpness.edge_of_stability_summary([0, 1, 2], [1.0, 8.9, 8.99], 0.2)
    assert never["reach_step"] is None and never["mean_ratio"] is None
    # a trace that overshoots to 2x and falls back: within 10% only part of the time
    over = sharpness.edge_of_stability_summary([0, 1, 2, 3], [5.0, 20.0, 10.0, 10.5], 0.2,
                                               tolerance=0.1)
    assert over["reach_step"] == 1 and over["max_ratio"] == 2.0
    assert over["within_fraction"] == pytest.approx(2 / 3) and over["last_within_step"] == 3
    # the window starts at the first measurement within 10%, not at the overshoot
    assert over["first_within_step"] == 2 and over["median_ratio"] == pytest.approx(1.05)
    left = sharpness.edge_of_stability_summary([0, 1, 2, 3], [9.5, 10.0, 6.0, 5.0], 0.2)
    assert left["reach_step"] == 0 and left["last_within_step"] == 1
    assert left["first_within_step"] == 0 and left["final_ratio"] == pytest.approx(0.5)
    # a late decline pulls the median below 1 while the mean of an overshoot hides it
    mixed = sharpness.edge_of_stability_summary(range(5), [10, 16, 6, 6, 6], 0.2)
    assert mixed["mean_ratio"] == pytest.approx(0.88) and mixed["median_ratio"] == 0.6


def _run(loss, eta, trace, converged_at_start=True, diverged_at=None, trained=True):
    steps = list(range(0, 20 * len(trace), 20))
    return {"loss": loss, "eta": eta, "steps": steps, "sharpness": list(trace),
            "residual": [3e-3 if not converged_at_start else 2e-5] + [1e-5] * (len(trace) - 1),
            "converged": [converged_at_start] + [True] * (len(trace) - 1),
            "diverged_at": diverged_at, "trained": trained, "lanczos_checks": [],
            "final_loss": 0.1, "final_accuracy": 0.9,
            "summary": sharpness.edge_of_stability_summary(steps, trace, eta, 0.1)}


def _findings(*runs):
    return sharpness.edge_of_stability_findings({"reach_tolerance": 0.1, "runs": list(runs)})


def test_the_findings_follow_the_measured_traces():
    """Opposite outcomes give opposite sentences, with the measured numbers in them: a trace
    that rises to 2/eta = 10 and stays, one that never gets there, one that overshoots and
    falls away; and an unconverged first measurement says so."""
    rise = np.linspace(5, 10, 11)
    (hovers,) = _findings(_run("square", 0.2, [*rise, *([10.1, 9.9] * 10)]))
    (never,) = _findings(_run("square", 0.2, [5.0] * 31, converged_at_start=False))
    (away,) = _findings(_run("square", 0.2, [*rise, 13.0, 12.0, *([6.0] * 18)]))
    assert hovers.startswith("**The square loss on the outputs** (eta 0.2).")
    assert "rises to it by step 160 (eta 0.2)" in hovers
    assert "Every one of these runs hovers at 2/eta" in hovers
    assert "still at or above 0.9 x 2/eta in every run (final ratio 0.99)" in hovers
    assert "relative residual 2.0e-05" in hovers and "not converged" not in hovers
    assert "never comes within 10% of 2/eta (largest ratio sharpness/(2/eta) 0.50)" in never
    assert "hovers" not in never and "not converged: relative residual 3.0e-03" in never
    assert "None of them hovers at 2/eta: the sharpness spends most of the time below it" in away
    assert "overshoots 2/eta by more than 10% in 1 of 1 runs (up to 1.30 x 2/eta)" in away
    assert "has left 2/eta from below in 1 of 1 runs (final ratio 0.60)" in away
    assert "median ratio sharpness/(2/eta) is 0.60" in away
    # a run that starts at 2/eta is said to, and a diverged one is named
    ce = _findings(_run("cross_entropy", 0.32, [6.07] + [6.2] * 20),
                   _run("cross_entropy", 3.0, [6.07, float("nan")], diverged_at=3,
                        trained=False))[0]
    assert "already within 10% of it at initialisation at eta 0.32 (ratio 0.97)" in ce
    assert "At eta 3 (2/eta 0.6667) gradient descent diverges at step 3." in ce


def tiny(num_steps=40, **overrides):
    c = sharpness_config.get_config()
    c.num_steps, c.eval_every, c.lanczos_checks, c.lanczos_order = num_steps, 10, 1, 30
    with c.unlocked():
        c.step_sizes = {"cross_entropy": (0.3,)}
    c.update_from_flattened_dict(overrides)
    return c


def test_the_sharpness_rises_and_power_iteration_agrees_with_lanczos(tmp_path):
    """40 steps of full-batch GD on the digits' 1,347 training images: the sharpness grows
    from its value at initialisation (progressive sharpening), the warm-started power
    iteration's last value is a cold Lanczos's top Ritz value, and the outputs are written."""
    result = sharpness.run_study(tiny())
    assert result["num_examples"] == 1347 and result["dataset"] == "digits"
    (run,) = result["runs"]
    assert run["steps"] == [0, 10, 20, 30, 40] and len(run["train_loss"]) == 41
    assert max(run["sharpness"][1:]) > 1.5 * run["sharpness"][0]
    assert run["train_loss"][-1] < run["train_loss"][0] and run["trained"]
    (check,) = run["lanczos_checks"]
    assert check["step"] == 40 and check["power"] == run["sharpness"][-1]
    assert abs(check["relative_difference"]) < 1e-2
    # later measurements start from the previous eigenvector: fewer products than the first
    assert min(run["iterations"][1:]) < run["iterations"][0]
    # every measurement says how far it is from an eigenpair, and each met the tolerance
    assert run["converged"] == [True] * 5 and max(run["residual"]) <= tiny().tol
    assert check["converged"] and check["lanczos_residual"] <= tiny().tol

    out = sharpness.write_outputs(result, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"] == out["table"] and "| cross_entropy | 0.3 | 6.667 |" in out["table"]
    assert saved["power_lanczos_max_relative_difference"] == pytest.approx(
        abs(check["relative_difference"]))
    assert (tmp_path / "sharpness.png").stat().st_size > 10_000
    assert out["findings"][0].startswith("**Cross-entropy** (eta 0.3).")

    # saved results merge with others of the same setup (runs made a loss at a time)
    loaded = sharpness.load_results(str(tmp_path))
    assert set(loaded) == set(result) and loaded["runs"][0]["sharpness"] == run["sharpness"]
    merged = sharpness.write_outputs(sharpness.merge_studies([loaded, loaded]),
                                     str(tmp_path / "merged"))
    assert merged["table"].count("| cross_entropy | 0.3 |") == 2
    with pytest.raises(ConfigError, match="results.json does not exist"):
        sharpness.load_results(str(tmp_path / "nowhere"))


def test_a_step_size_beyond_stability_is_reported():
    """eta = 3 on cross-entropy: 2/eta is far below the sharpness at initialisation, gradient
    descent does not train; the table says so instead of a ratio that means nothing."""
    config = tiny(num_steps=20)
    with config.unlocked():
        config.step_sizes = {"cross_entropy": (3.0,)}
    result = sharpness.run_study(config)
    (run,) = result["runs"]
    assert not run["trained"]
    table = sharpness.summary_table(result)
    assert "did not train" in table or "diverged at step" in table


def test_a_diverged_run_is_written_as_strict_json(tmp_path):
    """Divergence is a finding: its NaN and infinite losses are null in results.json."""
    # eta = 1e38: the first step overflows float32 (a step of 1e4 on MSE only saturates the
    # softmax: a finite loss and a Hessian of exactly zero, which is no divergence)
    config = tiny(num_steps=20)
    with config.unlocked():
        config.step_sizes = {"cross_entropy": (1e38,)}
    result = sharpness.run_study(config)
    assert result["runs"][0]["diverged_at"] is not None
    sharpness.write_outputs(result, str(tmp_path))

    def refuse(constant):
        raise AssertionError(f"results.json holds {constant}")

    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    (run,) = saved["runs"]
    assert run["final_loss"] is None and run["diverged_at"] == result["runs"][0]["diverged_at"]


def test_both_config_files_are_valid():
    for dataset in ("digits", "mnist"):
        sharpness.validate_sharpness_config(sharpness_config.get_config(dataset))
    mnist = sharpness_config.get_config("mnist")
    assert mnist.data.num_examples == 5000 and mnist.model.activation == "tanh"
    # the square loss runs longer than the others; `losses` picks a subset to run
    assert sharpness.selected_losses(mnist) == ["cross_entropy", "mse", "square"]
    assert [sharpness.steps_of(mnist, x) for x in ("mse", "square")] == [1000, 2500]
    mnist.losses = " square, mse"
    assert sharpness.selected_losses(mnist) == ["square", "mse"]
    with mnist.unlocked():
        mnist.num_steps_per_loss.hinge = 10
    with pytest.raises(ConfigError, match="unknown num_steps_per_loss key 'hinge'"):
        sharpness.validate_sharpness_config(mnist)
    with pytest.raises(ValueError, match="expected one of"):
        sharpness_config.get_config("cifar")


@pytest.mark.parametrize("field,value,words", [
    ("num_steps", 0, "num_steps=0 is invalid; expected an integer >= 1"),
    ("eval_every", 0, "eval_every=0 is invalid"),
    ("tol", 1.5, "tol=1.5 is invalid; expected a number > 0 and < 1"),
    ("power_iters", 1, "power_iters=1 is invalid; expected an integer >= 2"),
    ("model.activation", "swish", "unknown model.activation 'swish'"),
    ("data.name", "cifar10", "unknown data.name 'cifar10'"),
    ("data.num_examples", -1, "data.num_examples=-1 is invalid"),
    ("reach_tolerance", 0.0, "reach_tolerance=0.0 is invalid"),
    ("losses", "cross_entropy,hinge", "unknown losses entry 'hinge'; expected one of "
                                      "cross_entropy, mse"),
])
def test_bad_values_are_one_line(field, value, words):
    config = sharpness_config.get_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError) as e:
        sharpness.validate_sharpness_config(config)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


@pytest.mark.parametrize("step_sizes,words", [
    ({"cross_entropy": (0.1, -0.2)}, "step_sizes.cross_entropy=-0.2 is invalid"),
    ({"hinge": (0.1,)},
     "unknown step_sizes key 'hinge'; expected one of cross_entropy, mse, square"),
    ({"mse": ()}, "step_sizes.mse=() is invalid; expected a non-empty list"),
    ({}, "step_sizes is empty"),
])
def test_bad_step_sizes_are_one_line(step_sizes, words):
    config = sharpness_config.get_config()
    with config.unlocked():
        config.step_sizes = step_sizes
    with pytest.raises(ConfigError) as e:
        sharpness.validate_sharpness_config(config)
    assert str(e.value).startswith(words) and "\n" not in str(e.value)


@pytest.mark.slow
def test_command_line_runs_refuses_distributed_and_bad_values_in_one_line(tmp_path):
    out = cli("experiments.sharpness", f"--workdir={tmp_path}", "--config.num_steps=20",
              "--config.eval_every=10", "--config.lanczos_checks=1",
              "--config.lanczos_order=20", "--config.step_sizes.cross_entropy=(0.3,)",
              "--config.step_sizes.mse=(0.6,)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| mse | 0.6 | 3.333 |" in out.stdout
    assert (tmp_path / "sharpness.png").exists() and (tmp_path / "results.json").exists()
    one_line_error(cli("experiments.sharpness", f"--workdir={tmp_path}", "--distributed"),
                   "experiments.sharpness runs in one process")
    one_line_error(cli("experiments.sharpness", f"--workdir={tmp_path}",
                       "--config.eval_every=0"), "eval_every=0 is invalid")


def test_studies_of_one_setup_merge_and_of_different_setups_are_refused():
    from dlassign.analysis.sharpness import merge_studies

    ce = {"dataset": "digits", "num_params": 100, "runs": [{"loss": "cross_entropy", "eta": 0.3}]}
    mse = {"dataset": "digits", "num_params": 100, "runs": [{"loss": "mse", "eta": 0.6}]}
    merged = merge_studies([ce, mse])
    assert merged == {"dataset": "digits", "num_params": 100, "runs": ce["runs"] + mse["runs"]}
    with pytest.raises(ValueError, match=r"\['num_params'\] differ"):
        merge_studies([ce, dict(mse, num_params=200)])
