"""Test session set-up: eight CPU host devices, so every training test runs the sharded path."""

import os
import sys

import jax

NUM_DEVICES = 8

# Must happen before JAX's backend starts; conftest is imported before any test module.
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlassign.runtime import compilation_cache  # noqa: E402  (needs the path above)

# The persistent compilation cache, as the entry points use it: workers and later runs of the
# suite load the programs an earlier one compiled (DLASSIGN_COMPILATION_CACHE=0: off).
compilation_cache.enable()
