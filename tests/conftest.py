"""Test session set-up: eight CPU host devices, so every training test runs the sharded path."""

import os
import sys

import jax

NUM_DEVICES = 8

# Must happen before JAX's backend starts; conftest is imported before any test module.
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
# The suite compiles thousands of small programs and runs each a few times: LLVM's -O0 halves
# their compile time. Values may differ from -O1..-O3 in the last bits (contracted multiply-adds),
# so a test that compares bitwise against the entry points' programs names their level; the
# processes the tests start inherit the flag. DLASSIGN_TEST_XLA_OPT=default keeps XLA's own.
_OPT = os.environ.get("DLASSIGN_TEST_XLA_OPT", "0")
if _OPT != "default" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_backend_optimization_level={_OPT}").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlassign.runtime import compilation_cache  # noqa: E402  (needs the path above)

# The persistent compilation cache, as the entry points use it: workers and later runs of the
# suite load the programs an earlier one compiled (DLASSIGN_COMPILATION_CACHE=0: off).
compilation_cache.enable()
