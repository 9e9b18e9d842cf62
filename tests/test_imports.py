"""Start-up: the heavy libraries are imported only where they are used. TensorFlow and TFDS only
to load a TFDS dataset, PyTorch only to port or compare weights (and by tensorboardX, whose
package imports it where it is installed), matplotlib only to draw a figure, Orbax only to
read or write a checkpoint. Each check runs in a fresh interpreter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEVER_FOR_DIGITS = ("tensorflow", "tensorflow_datasets", "torch", "torchvision")


def _modules_after(code: str, *args: str) -> set[str]:
    """The top-level modules in sys.modules once `code` has run (also when it exits)."""
    return _probe(code, *args)[0]


def _probe(code: str, *args: str) -> tuple[set[str], str]:
    """`_modules_after`'s modules, and what `code` printed."""
    probe = ("import atexit, json, sys\n"
             "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(\n"
             "    {m.split('.')[0] for m in sys.modules}))))\n" + code)
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    return set(json.loads(line[len("MODULES "):])), out.stdout


def test_importing_the_trainer_imports_no_heavy_library():
    loaded = _modules_after("import dlassign.training.trainer")
    assert loaded.isdisjoint({*NEVER_FOR_DIGITS, "matplotlib", "orbax"}), (
        loaded & {*NEVER_FOR_DIGITS, "matplotlib", "orbax"})


# Records the file whose import statement first looks torch up (frames of importlib and of
# this probe are named "<...>").
TORCH_IMPORTER = """
import atexit, sys, traceback
importers = []
class FirstImporter:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not importers:
            importers.extend(f.filename for f in traceback.extract_stack()
                             if not f.filename.startswith("<"))
sys.meta_path.insert(0, FirstImporter())
atexit.register(lambda: print("TORCH_IMPORTER", importers[-1] if importers else None))
"""


@pytest.mark.slow
def test_digits_training_imports_no_tensorflow_and_torch_only_through_tensorboardx(tmp_path):
    """Nothing of ours imports torch for the digits; tensorboardX does where torch is installed
    (its package `__init__` imports its writer, which tries `import torch`)."""
    loaded, printed = _probe(
        TORCH_IMPORTER + "import runpy, sys\n"
        "sys.argv = ['experiments.train', *sys.argv[1:]]\n"
        "runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)\n",
        "--config=configs/base.py", f"--workdir={tmp_path}", "--config.num_epochs=1")
    assert (tmp_path / "results.json").exists()
    never = set(NEVER_FOR_DIGITS) - {"torch"}
    assert loaded.isdisjoint(never), loaded & never
    importer = next(x for x in printed.splitlines() if x.startswith("TORCH_IMPORTER "))
    importer = importer[len("TORCH_IMPORTER "):]
    if "torch" in loaded:
        assert importer.endswith(os.path.join("tensorboardX", "writer.py")), importer
    assert "orbax" in loaded  # it wrote its checkpoints: the probe sees what the run used
