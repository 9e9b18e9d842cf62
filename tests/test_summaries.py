"""What a researcher watches: TensorBoard event files (read back with TensorBoard's own reader)
in the train/, validation/ and test/ runs with the config as hyperparameters, the validation
split and its curves, the best checkpoint, curves.png; across a kill and resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlassign.data import Split, hold_out_validation, prepare
from dlassign.errors import ConfigError
from dlassign.training import summaries
from dlassign.training.config_validation import validate_train_config
from dlassign.training.trainer import train_and_evaluate
from tests.helpers import checkpoint_steps, synthetic_dataset, tiny_config
from tests.test_faults import cli, one_line_error

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCALARS = ("loss", "accuracy", "grad_norm", "learning_rate", "examples_per_second")
TEST_SCALARS = ("loss", "accuracy", "precision_macro", "recall_macro", "f1_macro")


def accumulate(logdir):
    """TensorBoard's own reader (EventAccumulator, restart purges included) over one run."""
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0,
                                                                      "images": 0})
    events.Reload()
    return events


def read_events(logdir) -> dict:
    """{tag: [(step, value), ...]} of every scalar, and {tag: [step, ...]} of every image, of
    the TensorBoard run in `logdir` (e.g. a workdir's `train/`) as TensorBoard reads it."""
    events = accumulate(logdir)
    tags = events.Tags()
    scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
    images = {t: [e.step for e in events.Images(t)] for t in tags["images"]}
    return scalars, images


def read_hparams(logdir) -> dict:
    """{name: value} of the run's hyperparameters, as TensorBoard's hparams view reads them
    (bool, float or str by the value's kind)."""
    plugin = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")
    content = accumulate(logdir).PluginTagToContent("hparams")
    start = plugin.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {name: getattr(value, value.WhichOneof("kind"))
            for name, value in start.session_start_info.hparams.items()}


def runs_of(workdir) -> list[str]:
    """The TensorBoard runs (subdirectories holding event files) of a workdir."""
    return sorted({p.parent.name for p in Path(workdir).glob("*/events.out.tfevents.*")})


def steps_of(scalars: dict, tag: str) -> list[int]:
    return [s for s, _ in scalars[tag]]


def sync_steps(total: int, *every: int) -> list[int]:
    """The steps a run logs at: multiples of each interval, and the last step."""
    return sorted({s for e in every for s in range(e, total + 1, e)} | {total})


def test_every_scalar_validation_best_checkpoint_and_curves(tmp_path):
    data = synthetic_dataset()
    config = tiny_config({"data.validation_fraction": 0.25, "eval_every_steps": 3,
                          "checkpoint_best": True})
    results = train_and_evaluate(config, str(tmp_path), data)
    total = results["steps"]
    assert total == 3 * (192 // 32)  # a quarter of the 256 examples held out

    # One TensorBoard run each for training, validation and test, with the same tags.
    assert runs_of(tmp_path) == ["test", "train", "validation"]
    train, images = read_events(tmp_path / "train")
    assert set(train) == set(TRAIN_SCALARS) and images == {}
    logged = sync_steps(total, 4, 3)  # log_every_steps=checkpoint_every_steps=4; validation 3
    for name in TRAIN_SCALARS:
        assert steps_of(train, name) == logged, name
    assert [s for s, _ in train["loss"]] == [h["step"] for h in results["history"]]
    np.testing.assert_allclose([v for _, v in train["loss"]],
                               [h["loss"] for h in results["history"]], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in train["learning_rate"]], 3e-3, rtol=1e-6)
    assert all(v > 0 for _, v in train["examples_per_second"])
    validation, images = read_events(tmp_path / "validation")
    assert images == {}
    validated = sync_steps(total, 3)
    assert [v["step"] for v in results["validation"]] == validated
    for name in ("loss", "accuracy", "f1_macro"):
        assert steps_of(validation, name) == validated
        np.testing.assert_allclose([v for _, v in validation[name]],
                                   [v[name] for v in results["validation"]], rtol=1e-6)
    test, images = read_events(tmp_path / "test")
    assert set(test) == set(TEST_SCALARS)
    for name in TEST_SCALARS:
        assert test[name] == [(total, pytest.approx(results["test"][name]))]
    assert images == {"confusion_matrix": [total]}
    # Every run carries the config: dotted keys, numbers as numbers, sequences as text.
    for run in ("train", "validation", "test"):
        hparams = read_hparams(tmp_path / run)
        assert hparams["optimizer.learning_rate"] == pytest.approx(3e-3)
        assert hparams["batch_size"] == 32.0 and hparams["eval_every_steps"] == 3.0
        assert hparams["data.validation_fraction"] == 0.25
        assert hparams["checkpoint_best"] is True
        assert hparams["model.name"] == config.model.name
        assert hparams["model.hidden_sizes"] == "(32,)"

    # The best checkpoint: the first step with the highest validation accuracy, kept beside
    # the newest three (a checkpoint after every validation and every 4 steps).
    accuracies = [v["accuracy"] for v in results["validation"]]
    best_step = results["validation"][int(np.argmax(accuracies))]["step"]
    assert results["best_checkpoint"] == {"step": best_step,
                                          "validation_accuracy": max(accuracies)}
    assert checkpoint_steps(tmp_path / "checkpoints") == sorted(
        set(sync_steps(total, 4, 3)[-3:]) | {best_step})
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["validation"] == results["validation"]


def test_a_run_without_validation_still_writes_events_and_curves(tmp_path):
    results = train_and_evaluate(tiny_config({"num_epochs": 1}), str(tmp_path),
                                 synthetic_dataset())
    assert runs_of(tmp_path) == ["test", "train"]
    scalars, _ = read_events(tmp_path / "train")
    assert steps_of(scalars, "loss") == [4, 8] and results["validation"] == []
    assert "best_checkpoint" not in results
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_reopening_drops_the_steps_after_the_resume_point(tmp_path):
    """A resumed run writes from its checkpoint's step on: TensorBoard shows none of what the
    killed run logged after it, nor a finished run's earlier test results, and reads past a
    record the kill cut short; the hyperparameters are the first run's, written once."""
    with summaries.Summaries(str(tmp_path), {"model": {"width": 8}}).open(0) as board:
        for step in range(1, 11):
            board.scalars(step, {"loss": step}, "train")
        board.scalars(10, {"accuracy": 0.5}, "test")
        board.flush()
        path = next((tmp_path / "train").glob("events.out.tfevents.*"))
        with open(path, "ab") as f:
            f.write(b"\x30\x00\x00\x00\x00\x00\x00\x00\x01\x02")  # a record cut short
    for start in (6, 10):  # resumed after step 6, then the finished run run again
        with summaries.Summaries(str(tmp_path), {"model": {"width": 16}}).open(start) as board:
            for step in range(start + 1, 11):
                board.scalars(step, {"loss": 100 * start + step}, "train")
            board.scalars(10, {"accuracy": start / 10}, "test")
    train, _ = read_events(tmp_path / "train")
    assert train["loss"] == [(s, s) for s in range(1, 7)] + [(s, 600 + s) for s in range(7, 11)]
    test, _ = read_events(tmp_path / "test")
    assert test["accuracy"] == [(10, 1.0)]
    for run in ("train", "test"):
        assert read_hparams(tmp_path / run) == {"model.width": 8.0}
        assert len(list((tmp_path / run).glob("events.out.tfevents.*"))) == 3 - (run == "train")


def test_flush_puts_every_event_on_disk(tmp_path):
    """What a run flushed is in its files before it closes, so a kill right after the
    checkpoint that follows loses none of it."""
    board = summaries.Summaries(str(tmp_path)).open(0)
    for step in range(1, 201):
        board.scalars(step, {"loss": step / 2}, "train")
        board.scalars(step, {"loss": step / 4}, "validation")
    board.flush()
    for run, scale in (("train", 2), ("validation", 4)):
        scalars, _ = read_events(tmp_path / run)
        assert scalars["loss"] == [(s, s / scale) for s in range(1, 201)], run
    board.close()


def test_hyperparameters_are_the_flattened_config():
    """Dotted keys; booleans, numbers and strings as they are; sequences as text; None out."""
    config = tiny_config({"model.name": "mlp"})
    hparams = summaries.hparams_of(config)
    assert hparams["model.hidden_sizes"] == "(32,)" and hparams["model.name"] == "mlp"
    assert hparams["batch_size"] == 32.0 and isinstance(hparams["batch_size"], float)
    assert hparams["optimizer.learning_rate"] == 3e-3
    assert all(isinstance(v, (bool, float, str)) for v in hparams.values())
    assert summaries.hparams_of({"a": {"b": [1, 2], "c": None, "d": False}, "e": np.int32(3)}) == {
        "a.b": "(1, 2)", "a.d": False, "e": 3.0}


def test_validation_split_is_stratified_and_disjoint():
    n = 300
    labels = np.repeat(np.arange(3), [60, 90, 150]).astype(np.int32)
    images = np.zeros((n, 2, 2, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256  # an id
    data = synthetic_dataset()
    data = type(data)("digits", 3, Split(images, labels), data.test, data.normalizer)
    held = hold_out_validation(data, 0.2, seed=0)
    ids = lambda s: set((s.images[:, 0, 0, 0].astype(int)
                         + 256 * s.images[:, 0, 1, 0].astype(int)).tolist())
    assert ids(held.train).isdisjoint(ids(held.validation))
    assert ids(held.train) | ids(held.validation) == set(range(n))
    assert np.bincount(held.validation.labels).tolist() == [12, 18, 30]
    assert hold_out_validation(data, 0.0, seed=0) is data
    other = hold_out_validation(data, 0.2, seed=1)
    assert ids(other.validation) != ids(held.validation)

    # prepare() holds out of the (subsetted) training split; the test split stays whole.
    config = tiny_config({"data.validation_fraction": 0.1})
    whole, part = prepare(tiny_config().data, 0), prepare(config.data, 0)
    assert len(part.train) + len(part.validation) == len(whole.train)
    assert len(part.test) == len(whole.test) and whole.validation is None
    share = np.bincount(part.validation.labels, minlength=10) / np.bincount(
        whole.train.labels, minlength=10)
    assert np.all(np.abs(share - 0.1) < 0.05)


@pytest.mark.parametrize("value", [1.0, 1.5, -0.01, float("nan")])
def test_bad_validation_fraction_is_named(value):
    config = tiny_config({"data.validation_fraction": value})
    with pytest.raises(ConfigError) as e:
        validate_train_config(config)
    assert str(e.value).startswith(f"data.validation_fraction={value!r} is invalid")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_bad_validation_fraction_on_the_command_line_is_one_line():
    out = cli("experiments.train", "--config=configs/base.py",
              "--config.data.validation_fraction=1.0", "--workdir=/nonexistent/never")
    one_line_error(out, "data.validation_fraction=1.0", "< 1")


TRAIN = [sys.executable, "-m", "experiments.train", "--config=configs/base.py",
         "--config.num_epochs=3", "--config.checkpoint_every_steps=10",
         "--config.log_every_steps=4", "--config.data.validation_fraction=0.1",
         "--config.eval_every_steps=6", "--config.checkpoint_best=true",
         "--config.num_cpu_devices=2"]


def train_cli(workdir, failpoint=None):
    env = {k: v for k, v in os.environ.items() if k != "DLASSIGN_FAILPOINT"}
    if failpoint:
        env["DLASSIGN_FAILPOINT"] = failpoint
    return subprocess.run([*TRAIN, f"--workdir={workdir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_and_resumed_run_logs_every_step_once(tmp_path):
    """SIGKILL at step 29 (checkpoints every 10 steps and after every validation, the last at
    24; logs up to 28 already on disk), then resume: every scalar at every step once, the
    values of an uninterrupted run; then experiments.evaluate --which=best scores the best
    checkpoint."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    out = train_cli(reference)
    assert out.returncode == 0, out.stderr[-2000:]
    killed = train_cli(resumed, "after_step:29")
    assert killed.returncode == -signal.SIGKILL
    before, _ = read_events(resumed / "train")
    assert steps_of(before, "loss")[-1] == 28  # logged after the last checkpoint (24)
    out = train_cli(resumed)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step 24" in out.stderr

    total = json.loads((reference / "results.json").read_text())["steps"]  # 3 x 1212 // 64
    assert total == 54 and runs_of(resumed) == runs_of(reference) == ["test", "train",
                                                                      "validation"]
    for run in runs_of(reference):
        want, want_images = read_events(reference / run)
        got, got_images = read_events(resumed / run)
        assert set(got) == set(want) and got_images == want_images, run
        for tag in got:
            assert steps_of(got, tag) == steps_of(want, tag), (run, tag)  # once, none missing
            if tag != "examples_per_second":
                np.testing.assert_allclose([v for _, v in got[tag]], [v for _, v in want[tag]],
                                           rtol=1e-6, err_msg=f"{run}/{tag}")
        assert read_hparams(resumed / run) == read_hparams(reference / run)
    got, _ = read_events(resumed / "train")
    assert steps_of(got, "loss") == sync_steps(total, 4, 10, 6)
    got, _ = read_events(resumed / "validation")
    assert steps_of(got, "accuracy") == sync_steps(total, 6)
    a = json.loads((resumed / "results.json").read_text())
    b = json.loads((reference / "results.json").read_text())
    assert a["validation"] == b["validation"] and a["best_checkpoint"] == b["best_checkpoint"]
    assert (resumed / "curves.png").stat().st_size > 10_000

    out = cli("experiments.evaluate", f"--workdir={resumed}", "--which=best")
    assert out.returncode == 0, out.stderr[-2000:]
    scored = json.loads(out.stdout[out.stdout.index("{"):])
    assert scored["which"] == "best" and scored["step"] == a["best_checkpoint"]["step"]
    assert (resumed / "eval_best.json").exists()
    assert (resumed / "confusion_matrix_best.png").exists()


@pytest.mark.slow
def test_evaluate_scores_the_best_checkpoint(tmp_path):
    from dlassign.training.evaluation import evaluate_checkpoint

    config = tiny_config({"num_epochs": 2, "data.validation_fraction": 0.2,
                          "eval_every_steps": 8, "checkpoint_best": True})
    results = train_and_evaluate(config, str(tmp_path))  # embedded digits, loaded for real
    best = evaluate_checkpoint(str(tmp_path), which="best")
    assert best["step"] == results["best_checkpoint"]["step"]
    assert best["validation_accuracy"] == max(v["accuracy"] for v in results["validation"])
    assert best["test"]["num_examples"] == 450
    latest = evaluate_checkpoint(str(tmp_path))
    assert latest["step"] == results["steps"]
    assert latest["test"]["accuracy"] == results["test"]["accuracy"]
    for name in ("eval_best.json", "eval_best_per_class.md", "confusion_matrix_best.png",
                 "eval.json"):
        assert os.path.getsize(tmp_path / name) > 0
    with pytest.raises(ConfigError):
        evaluate_checkpoint(str(tmp_path), which="worst")


def test_a_checkpoint_from_before_validation_fraction_existed_resumes(tmp_path):
    """Checkpoints written before `data.validation_fraction` existed ran without one: resuming
    them with today's configs is not a change of training config."""
    data = synthetic_dataset()
    old = tiny_config({"num_epochs": 1})
    with old.unlocked():
        del old.data["validation_fraction"]
    train_and_evaluate(old, str(tmp_path), data)
    results = train_and_evaluate(tiny_config({"num_epochs": 1}), str(tmp_path), data)
    assert results["config_changes"] == [] and results["steps"] == 8


@pytest.mark.parametrize("sequential", [False, True])
def test_each_fold_of_a_grid_cell_is_a_run_with_its_hyperparameters(tmp_path, sequential):
    from dlassign.data import stratified_kfold
    from dlassign.training.tune import apply_overrides, cell_hparams, cell_name, cross_validate

    data = synthetic_dataset(n_train=240)
    folds = stratified_kfold(data.train.labels, 2, seed=0)
    grid = {"model": {"activation": ["relu", "tanh"], "hidden_sizes": [(16,), (32,)]}}
    params = {"model.activation": "tanh", "model.hidden_sizes": (16,)}
    config = apply_overrides(tiny_config({"num_epochs": 2, "log_every_steps": 3}), params)
    logdir = tmp_path / cell_name(0, params)
    assert logdir.name == "00_activation=tanh,hidden_sizes=16"
    cv = cross_validate(config, data, folds, sequential=sequential, logdir=str(logdir),
                        hparams=cell_hparams(grid, params))
    for k in range(2):
        assert runs_of(logdir / f"fold{k}") == ["train", "validation"]
        train, _ = read_events(logdir / f"fold{k}" / "train")
        assert set(train) == {"loss", "accuracy", "grad_norm", "learning_rate"}
        assert all(steps_of(train, m) == [3, 6] for m in train)  # 120 examples: 3 steps an epoch
        validation, _ = read_events(logdir / f"fold{k}" / "validation")
        assert validation == {"accuracy": [(6, pytest.approx(cv["fold_accuracies"][k]))],
                              "loss": [(6, pytest.approx(cv["fold_losses"][k]))]}
        for run in ("train", "validation"):
            hparams = read_hparams(logdir / f"fold{k}" / run)
            # the grid's one-number widths as numbers; the rest of the config as well
            assert hparams["model.activation"] == "tanh" and hparams["model.hidden_sizes"] == 16
            assert hparams["num_epochs"] == 2 and hparams["batch_size"] == 32


def test_grid_hyperparameters_are_numbers_where_the_grid_is():
    from dlassign.training.tune import cell_hparams

    grid = {"model": {"hidden_sizes": [(32,), (64,)], "depths": [(32,), (32, 32)],
                      "dense_width": [32, 64], "activation": ["relu"]}}
    cell = {"model.hidden_sizes": (64,), "model.depths": (32,), "model.dense_width": 64,
            "model.activation": "relu"}
    assert summaries.hparams_of(cell_hparams(grid, cell)) == {
        "model.hidden_sizes": 64.0, "model.depths": "(32,)", "model.dense_width": 64.0,
        "model.activation": "relu"}
