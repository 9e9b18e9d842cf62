"""JAX's persistent compilation cache, on by default for every entry point and the tests.

A second run of a command (a grid-search cell, a resumed run, the test suite) loads the programs
that an earlier one compiled instead of compiling them again. The cache is per user:

* `$DLASSIGN_COMPILATION_CACHE` when it names a directory;
* else JAX's own `$JAX_COMPILATION_CACHE_DIR` when set;
* else `$XDG_CACHE_HOME/dlassign/jax`, or `~/.cache/dlassign/jax`.

`DLASSIGN_COMPILATION_CACHE=0` switches it off, JAX's own directory included. The
cache keeps its most recently used `MAX_SIZE_BYTES` where the `filelock` package is installed
(PyTorch brings it), which also keeps parallel test workers from reading each other's
half-written entries; without it the directory grows unbounded.
"""

from __future__ import annotations

import os

ENV = "DLASSIGN_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")
# Every program is cached, however fast it compiled: on a 2-core CPU even an eager `add` takes
# 30-250 ms to compile and 10-15 ms to load. The convexity study's 146 programs (most of them
# eager float64 ops, 0.05-0.3 s each) took 43 s to compile cold and 2 s to load with no
# threshold; JAX's default of 1 s leaves out the eval steps (0.3-1.2 s) and data resizes, and
# 0.1 s still left 8 s of compilation in the second run (one pair of runs each, on a busy
# machine). Its 137 entries took 2.1 MB.
MIN_COMPILE_TIME_SECS = 0.0
MAX_SIZE_BYTES = 2 * 2**30


def cache_dir(environ=None) -> str | None:
    """The directory `enable()` uses, or None when the cache is switched off."""
    environ = os.environ if environ is None else environ
    value = environ.get(ENV, "").strip()
    if value.lower() in OFF:
        return None
    if value and value.lower() not in ("1", "on", "true", "yes"):
        return os.path.abspath(os.path.expanduser(value))
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dlassign", "jax")


def enable() -> str | None:
    """Points JAX's persistent compilation cache at `cache_dir()`; call once, before the first
    compilation. Returns the directory, or None when switched off."""
    import jax

    path = cache_dir()
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        import filelock  # noqa: F401  (JAX needs it to bound the cache and lock its entries)
    except ImportError:
        pass
    else:
        if jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    return path
