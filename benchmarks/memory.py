"""Peak memory of one training step, ours against PyTorch, each in a fresh process.

  python -m benchmarks.memory [--models=mlp,cnn,lenet5,resnet18]

Reports the peak resident set size of a process that builds the model and runs
max(`--steps_per_call`, 5) training steps (baseline: the same process before the model is
built; ours `--steps_per_call` per call, as the training loop runs them), and for ours also
XLA's own account of one call's buffers (arguments, outputs, temporaries) and the peak reached
before the first step: with the state built and the step compiled (`compiled`), and what the
process still holds then (`held`; with DLASSIGN_HOST_ALLOCATOR=0 the C library hands freed
memory back, by default it keeps it, see `dlassign/runtime/host.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.common import ROOT, add_steps_per_call, parse, report

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
framework, name, batch, per_call = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from benchmarks.common import start_jax
jax = start_jax(0)
import torch
import numpy as np
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {{}}
def held():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
if framework == "ours":
    from benchmarks.step import ours
    run_steps, devices, split = ours(jax, name, batch, steps_per_call=per_call)
    run_steps.compiled_text()  # compiles the step program without running it
    out = {{"compiled_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "held_mb": held() / 1024}}
    run_steps(max(per_call, 5))
else:
    from benchmarks.step import theirs
    from benchmarks.common import model_spec
    shape = model_spec(name)[0]
    rng = np.random.default_rng(0)
    from dlassign.data import Split
    split = Split(rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
                  rng.integers(0, 10, batch).astype(np.int32))
    theirs(torch, name, split)(max(per_call, 5))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"baseline_mb": base / 1024, "peak_mb": peak / 1024, **out}}))
"""


def measure(framework: str, name: str, batch: int, per_call: int) -> dict:
    code = CHILD.format(root=ROOT)
    out = subprocess.run([sys.executable, "-c", code, framework, name, str(batch),
                          str(per_call)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def xla_buffers(name: str, batch: int, per_call: int) -> float:
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from benchmarks.common import start_jax\njax = start_jax(0)\n"
            "from benchmarks.step import ours\n"
            "import dlassign.training.setup as t\n"
            "orig = t.compile_steps\nbox = {}\n"
            "def spy(run, state):\n"
            "    step, ev = orig(run, state)\n    box['step'] = step\n    box['state'] = state\n"
            "    return step, ev\n"
            "t.compile_steps = spy\n"
            f"import benchmarks.step as b\nb.compile_steps = spy\n"
            f"run_steps, d, split = ours(jax, {name!r}, {batch}, steps_per_call={per_call})\n"
            "import numpy as np\n"
            "batch = {'image': split.images, 'label': split.labels}\n"
            f"k = {per_call}\n"
            "args = (batch,) if k == 1 else ({n: np.stack([v] * k) for n, v in batch.items()},"
            " np.int32(k))\n"
            "m = box['step'].lower(box['state'], *args).compile().memory_analysis()\n"
            "print((m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes"
            " - m.alias_size_in_bytes) / 2**20)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    args = parse(__doc__, extra=add_steps_per_call)
    k = max(args.steps_per_call, 1)
    rows = []
    for name in args.models.split(","):
        ours = measure("ours", name, args.batch_size, k)
        torch = measure("torch", name, args.batch_size, k)
        rows.append({"model": name, "ours_mb": ours["peak_mb"] - ours["baseline_mb"],
                     "compiled_mb": ours["compiled_mb"] - ours["baseline_mb"],
                     "held_mb": ours["held_mb"] - ours["baseline_mb"],
                     "torch_mb": torch["peak_mb"] - torch["baseline_mb"],
                     "xla_mb": xla_buffers(name, args.batch_size, k)})
        print(rows[-1], flush=True)
    print(f"\nbatch {args.batch_size}, ours {k} steps per call: peak RSS above each process's "
          "baseline (MiB)\n")
    report(rows, [("model", "model", "{}"), ("dlassign MiB", "ours_mb", "{:.0f}"),
                  ("peak before step 1 MiB", "compiled_mb", "{:.0f}"),
                  ("held before step 1 MiB", "held_mb", "{:.0f}"),
                  ("XLA step buffers MiB", "xla_mb", "{:.0f}"),
                  ("PyTorch MiB", "torch_mb", "{:.0f}")], args.json)


if __name__ == "__main__":
    main()
