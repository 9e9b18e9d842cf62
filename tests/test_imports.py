"""Start-up: the heavy libraries are imported only where they are used. TensorFlow and TFDS only
to load a TFDS dataset, PyTorch only to port or compare weights, matplotlib only to draw a
figure, Orbax only to read or write a checkpoint. Each check runs in a fresh interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEVER_FOR_DIGITS = ("tensorflow", "tensorflow_datasets", "torch", "torchvision")


def _modules_after(code: str, *args: str) -> set[str]:
    """The top-level modules in sys.modules once `code` has run (also when it exits)."""
    probe = ("import atexit, json, sys\n"
             "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(\n"
             "    {m.split('.')[0] for m in sys.modules}))))\n" + code)
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line[len("MODULES "):]))


def test_importing_the_trainer_imports_no_heavy_library():
    loaded = _modules_after("import dlassign.training.trainer")
    assert loaded.isdisjoint({*NEVER_FOR_DIGITS, "matplotlib", "orbax"}), (
        loaded & {*NEVER_FOR_DIGITS, "matplotlib", "orbax"})


@pytest.mark.slow
def test_training_on_the_embedded_digits_never_imports_tensorflow_or_torch(tmp_path):
    loaded = _modules_after(
        "import runpy, sys\n"
        "sys.argv = ['experiments.train', *sys.argv[1:]]\n"
        "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)\n",
        "--config=configs/base.py", f"--workdir={tmp_path}", "--config.num_epochs=1")
    assert (tmp_path / "results.json").exists()
    assert loaded.isdisjoint(NEVER_FOR_DIGITS), loaded & set(NEVER_FOR_DIGITS)
    assert "orbax" in loaded  # it wrote its checkpoints: the probe sees what the run used


def test_training_imports_nothing_from_analysis():
    """Training sits below analysis: analysis builds on training (curvature tracking is a hook
    its caller passes to the trainer), never the other way round. No module of
    dlassign/training names dlassign.analysis, and importing them all loads none of it."""
    import ast

    for path in sorted((ROOT / "dlassign" / "training").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("dlassign.analysis") for n in names), (path.name, names)
    modules = [f"dlassign.training.{p.stem}" for p in (ROOT / "dlassign" / "training").glob("*.py")]
    out = subprocess.run([sys.executable, "-c", "import importlib, sys\n"
                          f"for m in {modules!r}: importlib.import_module(m)\n"
                          "print(sorted(m for m in sys.modules if m.startswith('dlassign.')))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dlassign.analysis" not in out.stdout, out.stdout
