"""Test session set-up: eight CPU host devices, so every training test runs the sharded path."""

import os
import sys

import jax

NUM_DEVICES = 8

# Must happen before JAX's backend starts; conftest is imported before any test module.
jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
