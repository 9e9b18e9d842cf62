"""Steps per call: chosen from the timed first calls, bounded by a call's duration, replayed on
resume, and a stop that never waits for more than about one bounded call."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlassign.training import loop
from dlassign.training.loop import AUTO_MOST_STEPS, Pacer, call_plan
from tests.helpers import checkpoint_steps, synthetic_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]

BOUNDARIES = list(range(10, 60, 10))


class _Compiled:
    """A background compile that has finished."""

    def is_alive(self):
        return False


def _drive(pacer: Pacer, seconds_per_step) -> list[tuple]:
    """Runs the plan, feeding every timed call `seconds_per_step(slots)` per step."""
    calls = []
    for first, n, k, tag in pacer.plan():
        calls.append((first, n, k))
        if tag is not None:
            pacer.timed(tag, n, k, seconds_per_step(k) * n)
    return calls


def _steps(calls) -> list[int]:
    return [s for first, n, _ in calls for s in range(first, first + n)]


@pytest.mark.parametrize("several_slower", [False, True])
def test_auto_keeps_several_steps_only_where_a_step_is_not_slower_and_replays(several_slower):
    asked = []
    pacer = Pacer(0, 60, BOUNDARIES, 0, 5.0,
                  compile_several=lambda k: asked.append(k) or _Compiled())
    # one step alone 10 ms; in the several-step program 10 ms, or 50 ms (a layout that XLA
    # compiles worse inside a loop)
    calls = _drive(pacer, lambda k: 0.05 if several_slower and k > 1 else 0.01)
    assert _steps(calls) == list(range(1, 61))  # every step once, in order
    assert asked == [AUTO_MOST_STEPS]
    assert all(k == 1 for _, _, k in calls[:3])  # the timed single steps
    tail = {k for _, _, k in calls[8:]}
    assert tail == ({1} if several_slower else {AUTO_MOST_STEPS})
    assert all(first + n - 1 in BOUNDARIES or first + n - 1 == 60 or n <= k
               for first, n, k in calls)
    for b in BOUNDARIES:  # no call crosses a boundary
        assert not any(first <= b < first + n - 1 for first, n, _ in calls)
    record = json.loads(json.dumps(pacer.record()))  # as a checkpoint keeps it
    assert record["chosen"] and record["one_step_s"] == pytest.approx(0.01)
    # resumed at any boundary, the calls are the uninterrupted run's, nothing timed
    for resume in BOUNDARIES:
        again = Pacer(resume, 60, BOUNDARIES, 0, 5.0, record=record,
                      compile_several=lambda k: pytest.fail("compiled again"))
        assert [(f, n, k, tag) for f, n, k, tag in again.plan()] == [
            (f, n, k, None) for f, n, k in calls if f > resume]


def test_auto_tries_several_steps_only_where_the_steps_left_repay_a_compile():
    pacer = Pacer(0, 100, (), 0, 5.0, compile_seconds=1.0,
                  compile_several=lambda k: pytest.fail("compiled a several-step call"))
    calls = _drive(pacer, lambda k: 0.01)  # 1 s of steps left: too few to repay the compile
    assert {k for _, _, k in calls} == {1} and pacer.record()["chosen"]
    asked = []
    pacer = Pacer(0, 2000, (), 0, 5.0, compile_seconds=1.0,
                  compile_several=lambda k: asked.append(k) or _Compiled())
    _drive(pacer, lambda k: 0.01)  # 20 s left
    assert asked == [AUTO_MOST_STEPS]


def test_auto_takes_one_step_per_call_where_two_would_not_fit_the_call_bound():
    pacer = Pacer(0, 30, (), 0, max_call_seconds=5.0,
                  compile_several=lambda k: pytest.fail("compiled a several-step call"))
    calls = _drive(pacer, lambda k: 3.0)  # a VGG-sized step
    assert {k for _, _, k in calls} == {1} and pacer.record()["chosen"]


def test_auto_several_steps_fit_the_call_bound():
    asked = []
    pacer = Pacer(0, 40, (), 0, max_call_seconds=0.1,
                  compile_several=lambda k: asked.append(k) or _Compiled())
    calls = _drive(pacer, lambda k: 0.03)
    assert asked == [3] and {k for _, _, k in calls[5:]} == {3}


def test_auto_runs_steps_longer_than_the_calls_overhead_one_per_call():
    pacer = Pacer(0, 400, (), 0, 5.0,
                  compile_several=lambda k: pytest.fail("compiled a several-step call"))
    calls = _drive(pacer, lambda k: 2 * loop.SEVERAL_BELOW_S)  # a ResNet-sized step
    assert {k for _, _, k in calls} == {1} and pacer.record()["chosen"]


def test_a_fixed_steps_per_call_shrinks_when_its_first_call_outlasts_the_bound():
    pacer = Pacer(0, 40, (), 8, max_call_seconds=1.0)
    calls = _drive(pacer, lambda k: 0.3)  # 8 steps: 2.4 s
    assert calls[0] == (1, 8, 8) and {k for _, _, k in calls[1:]} == {3}
    quick = Pacer(0, 23, [10, 20], 4, max_call_seconds=1.0)
    assert [c[:2] for c in _drive(quick, lambda k: 0.01)] == list(call_plan(0, 23, 4, [10, 20]))


def test_a_fixed_steps_per_call_never_stacks_more_batches_than_steps_remain():
    assert [c[:3] for c in Pacer(0, 5, (), 1_000_000).plan()] == [(1, 5, 5)]


def test_a_run_records_its_choice_in_results_and_checkpoints(tmp_path, monkeypatch):
    from dlassign.runtime.checkpoint import Checkpointer
    from dlassign.training.trainer import train_and_evaluate

    # steps of 20 ms, so that the several-step call compiles before the run ends, tried
    # however short the run is against the compile time
    monkeypatch.setenv("DLASSIGN_FAILPOINT", "slow_call:0.02")
    monkeypatch.setattr(loop, "PAYBACK", 0.0)
    data = synthetic_dataset()
    config = tiny_config({"steps_per_call": 0, "num_epochs": 10, "checkpoint_every_steps": 8,
                          "log_every_steps": 8})
    result = train_and_evaluate(config, str(tmp_path), data)
    pacing = result["pacing"]
    assert pacing["chosen"] and pacing["segments"][0] == [0, 1], pacing
    assert pacing["one_step_s"] >= 0.02 and pacing["trial_step_s"] >= 0.02
    assert json.loads((tmp_path / "results.json").read_text())["pacing"] == pacing
    with Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
        assert ckpt.read_meta(ckpt.steps()[-1])["pacing"] == pacing


def _stream_until(proc, needle: str, timeout: float) -> list[str]:
    lines, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"no {needle!r} in:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("steps_per_call", [0, 8])
def test_sigterm_during_slow_calls_stops_within_the_call_bound(tmp_path, steps_per_call):
    """Steps of 0.4 s (a failpoint) and calls bounded to 1.5 s: a SIGTERM that arrives during
    a call stops the run within a few seconds, with the finished steps saved, whether the
    steps per call are chosen (one: such steps gain nothing from more) or fixed at 8 (whose
    first call, 3.2 s, shrinks the rest)."""
    env = dict(os.environ, DLASSIGN_FAILPOINT="slow_call:0.4")
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config=configs/base.py",
         f"--workdir={tmp_path}", "--config.num_epochs=20", "--config.log_every_steps=0",
         f"--config.steps_per_call={steps_per_call}", "--config.max_call_seconds=1.5",
         "--config.num_cpu_devices=1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = _stream_until(proc, "per call: " if steps_per_call == 0 else "per call to "
                              "keep calls under", timeout=120)
        time.sleep(2.0)  # inside a bounded call
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    log = "".join(lines) + rest
    assert proc.returncode == 143, log[-3000:]
    assert "Traceback" not in log
    assert rest.strip().splitlines()[-1].startswith("stopped by SIGTERM"), log[-3000:]
    assert waited < 8.0, (waited, log[-3000:])  # at most one 1.5 s call, the save, the exit
    assert checkpoint_steps(tmp_path / "checkpoints")[-1] >= 4


def test_a_fixed_steps_per_call_that_would_not_fit_in_memory_is_refused(monkeypatch):
    from dlassign.errors import ConfigError
    from dlassign.training import preflight, setup

    run = setup.setup(tiny_config({"steps_per_call": 16}), synthetic_dataset())
    # 64 KiB: half of it is less than 16 batches of 2 KiB for each of three calls
    monkeypatch.setattr(preflight, "available_memory", lambda: 2**16)
    with pytest.raises(ConfigError, match=r"steps_per_call=16 stacks batches of .* lower "
                                          r"steps_per_call, or 0"):
        preflight.check_memory(run, None)
    monkeypatch.setattr(preflight, "available_memory", lambda: 2**30)
    preflight.check_memory(run, None)



def test_a_cache_hit_counts_the_compile_time_the_cache_recorded(monkeypatch):
    """The several-step call pays off against what compiling a call costs; a run after a cold
    one, finding the one-step call cached, must not take that cost as a cache read's and
    compile the several-step call the cold run skipped."""
    import threading

    import jax

    from dlassign.training import compile_ahead
    from dlassign.training.setup import make_state, setup

    run = setup(tiny_config(), synthetic_dataset())
    events, ahead = [], []

    def listen(event, seconds, **_):
        if threading.current_thread().name == "compile-train":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:  # JAX reports a hit's recorded compile time under the name compile_ahead listens to
        for _ in range(2):  # the second finds the first's programs in the persistent cache
            make_state(run, before_init=lambda a: ahead.append(compile_ahead.CompileAhead(run, a)))
            ahead[-1].join()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert "/jax/compilation_cache/compile_time_saved_sec" in events, events

    real = compile_ahead.compile_steps

    class Lowered:
        def compile(self):  # a hit that saved 7 s
            jax.monitoring.record_event_duration_secs(
                "/jax/compilation_cache/compile_time_saved_sec", 7.0)

    def steps(run, state):
        train_step, eval_step = real(run, state)
        return type("Step", (), {"lower": lambda self, *a: Lowered()})(), eval_step

    monkeypatch.setattr(compile_ahead, "compile_steps", steps)
    make_state(run, before_init=lambda a: ahead.append(compile_ahead.CompileAhead(run, a)))
    ahead[-1].join()
    assert 7.0 <= ahead[-1].train_seconds < 20
