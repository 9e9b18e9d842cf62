"""Host memory: keep freed buffers in the process instead of handing them back to the kernel.

XLA:CPU allocates every intermediate of a train step (activations, their gradients, im2col
patches) with the C library's `malloc` and frees it at the end of the step. glibc serves blocks
above its mmap threshold (128 KiB, growing to at most 32 MiB) with fresh `mmap` calls, trims
freed heap memory back to the kernel, and unmaps the 64 MiB heaps of its per-thread arenas once
they empty, so each step faults the same pages in again, and spends much of its time in the
kernel doing so. Raising the mmap and trim thresholds and keeping to one arena lets `malloc`
reuse the pages of the previous step (`DLASSIGN_HOST_ALLOCATOR=0 python -m benchmarks.step`
against the default measures it; figures in docs/performance.md). The price: the process keeps
its peak memory until it exits, and threads share one arena's lock.

Set DLASSIGN_HOST_ALLOCATOR=0 to leave the C library's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from absl import logging

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 1 << 30  # only blocks above 1 GiB get their own mapping
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt accepts: keep freed heap memory

_done = False


def keep_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds (see module docstring) once per process.

    Returns whether the thresholds are now raised: False off Linux/glibc, when
    DLASSIGN_HOST_ALLOCATOR=0, or when mallopt refuses.
    """
    global _done
    if _done:
        return True
    if os.environ.get("DLASSIGN_HOST_ALLOCATOR", "1") == "0" or not sys.platform.startswith(
            "linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    # One arena: the per-thread arenas live in 64 MiB heaps that serve bigger blocks with
    # fresh mappings and shrink on free, whatever the thresholds say.
    ok = mallopt(_M_ARENA_MAX, 1) == 1 and ok
    if not ok:
        logging.warning("mallopt refused the allocator thresholds; continuing with defaults")
    _done = ok
    return ok
