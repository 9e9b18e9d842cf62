"""Saving and restoring a sharded train state costs no copy of the whole state: on 8 CPU
devices with `shard_params`, the resident memory a save adds, and the memory a restore adds
beyond the restored arrays themselves, stay well under the state's size.

Each side runs in a fresh process (`python -m tests.test_checkpoint_memory save|restore DIR`),
so memory freed earlier in the process cannot hide a copy; a thread samples the resident set
every half millisecond while the checkpointer works.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS, WIDTH = 3, (1024, 4096)  # 48 MiB of parameters, 144 MiB with Adam's two moments


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Peak:
    """The largest resident set seen while the block runs, and the one before it."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _abstract_state(mesh):
    """A train state's shapes (step, parameters, Adam's moments) in `shard_params` shardings."""
    import jax
    import jax.numpy as jnp
    import optax

    from dlassign.runtime import parallel

    params = {f"dense_{i}": {"kernel": jax.ShapeDtypeStruct(WIDTH, jnp.float32),
                             "bias": jax.ShapeDtypeStruct(WIDTH[1:], jnp.float32)}
              for i in range(LAYERS)}
    shapes = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                       "opt_state": optax.adam(1e-3).init(p)}, params)
    shardings = parallel.state_shardings(mesh, shapes, shard_params=True)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shardings)


def _small(tree) -> dict:
    """One sharded array of `tree` (its Adam moment of the first kernel): warms up Orbax's and
    TensorStore's threads and buffers on the same path before the measured call."""
    return {"mu": tree["opt_state"][0].mu["dense_0"]["kernel"]}


def _main(side: str, directory: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from dlassign.runtime import parallel
    from dlassign.runtime.checkpoint import Checkpointer

    mesh = parallel.make_mesh(8)
    abstract = _abstract_state(mesh)
    size = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(abstract))
    sharded = [a for a in jax.tree.leaves(abstract) if not a.sharding.is_fully_replicated]
    assert sum(a.size * a.dtype.itemsize for a in sharded) > 0.9 * size
    with Checkpointer(directory) as ckpt:
        if side == "save":
            state = jax.jit(lambda: jax.tree.map(lambda a: jax.numpy.full(a.shape, 0.5, a.dtype),
                                                 abstract),
                            out_shardings=jax.tree.map(lambda a: a.sharding, abstract))()
            ckpt.save(0, _small(state), {"config": {}})  # Orbax's first-use costs
            with _Peak() as peak:
                ckpt.save(1, state, {"config": {}})
            added = peak.peak - peak.base
        else:
            ckpt.restore(0, _small(abstract))
            with _Peak() as peak:
                state, _ = ckpt.restore(1, abstract)
            added = peak.peak - peak.base - size  # beyond the restored arrays themselves
            leaf = state["params"]["dense_0"]["kernel"]
            assert leaf.sharding == abstract["params"]["dense_0"]["kernel"].sharding
            assert float(np.asarray(leaf.addressable_data(0))[0, 0]) == 0.5
    print(json.dumps({"state_bytes": size, "added_bytes": added}))


def _measure(side: str, directory: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "tests.test_checkpoint_memory", side,
                          str(directory)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_save_and_restore_add_well_under_the_state_size(tmp_path):
    save = _measure("save", tmp_path)
    restore = _measure("restore", tmp_path)
    size = save["state_bytes"]
    assert size >= 100e6
    assert save["added_bytes"] < 0.5 * size, save
    assert restore["added_bytes"] < 0.5 * size, restore


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
