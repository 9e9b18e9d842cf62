"""The persistent compilation cache (dlassign/runtime/compilation_cache.py): a second process of
the same command loads its programs instead of compiling them, `DLASSIGN_COMPILATION_CACHE=0`
writes nothing, and the initialiser's cheaper compilation gives bitwise the same state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dlassign.runtime.compilation_cache import ENV, cache_dir, prune
from dlassign.training.setup import make_state, make_tx, setup, state_tree
from dlassign.training.train_state import create_train_state, init_compiler_options
from tests.helpers import synthetic_dataset, tiny_config

ROOT = Path(__file__).resolve().parents[1]

# Runs an entry point as `python -m` would, counting JAX's compilation-cache events and summing
# its backend compile times (a cache hit's time is the time to read the entry back).
DRIVER = """
import atexit, collections, json, runpy, sys
import jax.monitoring as monitoring
events, seconds = collections.Counter(), collections.Counter()
monitoring.register_event_listener(lambda event, **_: events.update([event]))
monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: seconds.update({event: duration}))
atexit.register(lambda: print("MONITOR " + json.dumps({"events": events, "seconds": seconds})))
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
HITS = "/jax/compilation_cache/cache_hits"
MISSES = "/jax/compilation_cache/cache_misses"
REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
COMPILE = "/jax/core/compile/backend_compile_duration"


def test_cache_dir_is_per_user_configurable_and_switchable_off(tmp_path):
    assert cache_dir({"XDG_CACHE_HOME": "/xdg"}) == "/xdg/dlassign/jax"
    assert cache_dir({}) == os.path.join(os.path.expanduser("~"), ".cache", "dlassign", "jax")
    assert cache_dir({ENV: str(tmp_path), "XDG_CACHE_HOME": "/xdg"}) == str(tmp_path)
    assert cache_dir({ENV: "1", "XDG_CACHE_HOME": "/xdg"}) == "/xdg/dlassign/jax"
    # JAX's own variable is honoured, ours wins over it
    assert cache_dir({"JAX_COMPILATION_CACHE_DIR": "/jax"}) == "/jax"
    assert cache_dir({ENV: str(tmp_path), "JAX_COMPILATION_CACHE_DIR": "/jax"}) == str(tmp_path)
    for off in ("0", "off", "false", "no", " 0 "):
        assert cache_dir({ENV: off, "XDG_CACHE_HOME": "/xdg"}) is None


def _train(workdir: Path, env: dict) -> dict:
    """One whole `experiments.train` process on the embedded digits (one epoch, 21 steps):
    its JAX monitoring counts and its test accuracy."""
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, "experiments.train", "--config=configs/base.py",
         f"--workdir={workdir}", "--config.num_epochs=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("MONITOR "))
    monitor = json.loads(line[len("MONITOR "):])
    accuracy = json.loads((workdir / "results.json").read_text())["test"]["accuracy"]
    return {"events": monitor["events"], "seconds": monitor["seconds"], "accuracy": accuracy}


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*-cache")) if directory.exists() else []


@pytest.mark.slow
def test_second_process_loads_its_programs_from_the_cache_and_zero_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in (ENV, "JAX_COMPILATION_CACHE_DIR", "JAX_LOG_COMPILES")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # the default place, fresh
    cache = tmp_path / "xdg" / "dlassign" / "jax"

    off = _train(tmp_path / "off", {**env, ENV: "0"})
    assert not (tmp_path / "xdg" / "dlassign").exists()
    assert not list(tmp_path.rglob("*-cache")), list(tmp_path.rglob("*-cache"))
    assert off["events"].get(REQUESTS, 0) == 0 and off["events"].get(HITS, 0) == 0

    cold = _train(tmp_path / "cold", env)
    written = _entries(cache)
    # the init, eval and train-step programs at least
    assert len(written) >= 3 and cold["events"].get(HITS, 0) == 0, written
    assert any(name.startswith("jit_step-") for name in written), written

    warm = _train(tmp_path / "warm", env)
    # every program the second process needed, the first one had written
    assert warm["events"].get(MISSES, 0) == 0, warm["events"]
    assert warm["events"][HITS] == warm["events"][REQUESTS] == cold["events"][REQUESTS]
    assert _entries(cache) == written
    # compiling took seconds; loading takes a small fraction of that
    assert warm["seconds"][COMPILE] < 0.25 * cold["seconds"][COMPILE], (warm, cold)
    assert cold["seconds"][COMPILE] > 1.0, cold
    # the loaded programs compute what the compiled ones did
    assert warm["accuracy"] == cold["accuracy"] == off["accuracy"]


@pytest.mark.parametrize("model", [
    {"name": "mlp", "hidden_sizes": (32,)},
    {"name": "cnn", "conv_features": (4, 8), "dense_width": 16, "padding": "same"},
])
def test_initialiser_compiled_cheaply_gives_bitwise_the_default_compilations_state(model):
    assert init_compiler_options(), "the CPU initialiser has its own compiler options"
    config = tiny_config({"seed": 3})
    config.model = model
    run = setup(config, synthetic_dataset(size=12))
    state = make_state(run)
    tx = make_tx(run)
    # XLA's own level (3), named: the suite's other programs compile at -O0 (tests/conftest.py)
    default = jax.jit(lambda key: create_train_state(run.model, tx, key, run.input_shape),
                      compiler_options={"xla_backend_optimization_level": 3})(
        jax.random.PRNGKey(config.seed))
    ours, theirs = jax.tree.leaves(state_tree(state)), jax.tree.leaves(state_tree(default))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prune_drops_the_least_recently_read_entries_at_most_once_a_day(tmp_path):
    now = 1_000_000.0
    for i in range(8):  # entry i last read at now - 100 + i; 1 KiB each
        entry = tmp_path / f"jit_f-{i}-cache"
        entry.write_bytes(b"x" * 1024)
        os.utime(entry, (now - 100 + i, now - 200))
    (tmp_path / "jit_f-0-atime").write_bytes(b"t")
    assert prune(str(tmp_path), max_bytes=16 * 1024, now=now) == 0  # under the bound
    # a day later, over a 6 KiB bound: down to 3/4 of it (4 entries), oldest reads first
    assert prune(str(tmp_path), max_bytes=6 * 1024, now=now + 3600) == 0  # looked an hour ago
    assert prune(str(tmp_path), max_bytes=6 * 1024, now=now + 25 * 3600) == 4
    assert _entries(tmp_path) == [f"jit_f-{i}-cache" for i in range(4, 8)]
    assert not (tmp_path / "jit_f-0-atime").exists()


# Two programs of different output structure: one's executable loaded for the other crashes
# JAX's own cache with an assertion.
TWO_PROGRAMS = """
from dlassign.runtime import compilation_cache
compilation_cache.enable()
import jax
import jax.numpy as jnp
a = jax.jit(lambda x: jnp.sin(x) * 2)(1.0)
b, c = jax.jit(lambda x: (x * 3, x + 1))(2.0)
print("RESULT", float(a), float(b), float(c))
"""


def _two_programs(cache: Path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env[ENV] = str(cache)
    out = subprocess.run([sys.executable, "-c", TWO_PROGRAMS], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    result = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    return result, out.stderr


@pytest.mark.parametrize("damage", ["cut_short", "wrong_names"])
def test_a_bad_cache_entry_is_named_removed_and_written_again(tmp_path, damage):
    """Case 8, entries cut short by a full disk, and case 9, valid entries under each other's
    names: each run warns naming the entry and recompiles; the next run loads them again."""
    cache = tmp_path / "cache"
    expected, _ = _two_programs(cache)
    entries = sorted(cache.glob("jit_*-cache"))
    assert len(entries) >= 2, entries
    intact = {p.name: p.read_bytes() for p in entries}
    if damage == "cut_short":
        for p in entries:
            p.write_bytes(intact[p.name][:len(intact[p.name]) // 2])
    else:
        first, second = entries[:2]
        first.write_bytes(intact[second.name])
        second.write_bytes(intact[first.name])
    again, stderr = _two_programs(cache)
    assert again == expected
    damaged = entries if damage == "cut_short" else entries[:2]
    for p in damaged:
        assert f"compilation cache entry {p}" in stderr, stderr[-3000:]
    # written again: the same bytes as the first run's (JAX's executables are deterministic
    # apart from the compile time in their header), read back without a warning
    assert sorted(p.name for p in cache.glob("jit_*-cache")) == sorted(intact)
    third, stderr = _two_programs(cache)
    assert third == expected and "compilation cache entry" not in stderr, stderr[-3000:]
