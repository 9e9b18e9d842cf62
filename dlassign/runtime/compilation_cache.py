"""JAX's persistent compilation cache, on by default for every entry point and the tests.

A second run of a command (a grid-search cell, a resumed run, the test suite) loads the programs
that an earlier one compiled instead of compiling them again. The cache is per user:

* `$DLASSIGN_COMPILATION_CACHE` when it names a directory;
* else JAX's own `$JAX_COMPILATION_CACHE_DIR` when set;
* else `$XDG_CACHE_HOME/dlassign/jax`, or `~/.cache/dlassign/jax`.

`DLASSIGN_COMPILATION_CACHE=0` switches it off, JAX's own directory included.

The directory is kept under `MAX_SIZE_BYTES` by `prune`, at most once a day when a process
starts: the least recently read entries go first. JAX's own size bound
(`jax_compilation_cache_max_size`) is left off on purpose: it lists and reads every entry's
access time under a global file lock on every write, which made a first run of the test suite
(thousands of small programs) quadratic in the number of entries.

Each entry is written whole or not at all (a temporary file, then a rename) and sealed with the
SHA-256 of its key and of its bytes (`CheckedCache`). JAX's own file cache never rewrites an
entry, so one cut short (a full disk) warned and recompiled in every later run, and a valid
entry under another program's name crashed every run with an assertion deep in JAX. An entry
that is cut short, damaged, filed under the wrong name or written by something else is now
removed with a warning naming it, and the program is compiled and written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import time

from absl import logging

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
PRUNE_EVERY_SECS = 24 * 3600
_STAMP = ".dlassign-pruned"


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
    _use_checked_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        prune(path)
    except OSError:  # a cache we cannot tidy is still a cache
        pass
    return path


_MAGIC = b"dlassign-xla-cache-1\n"
_HEADER = len(_MAGIC) + 64  # the magic, SHA-256 of the key, SHA-256 of the value


def seal(key: str, value: bytes) -> bytes:
    """An entry's bytes on disk: `value` behind a header that ties it to `key`."""
    return (_MAGIC + hashlib.sha256(key.encode()).digest() + hashlib.sha256(value).digest()
            + value)


def unseal(key: str, data: bytes) -> tuple[bytes | None, str]:
    """(value, '') for an intact entry of `key`; (None, what is wrong) otherwise."""
    if len(data) < _HEADER or not data.startswith(_MAGIC):
        return None, ("is cut short" if _MAGIC.startswith(data[:len(_MAGIC)])
                      else "was not written by this version of dlassign")
    value = data[_HEADER:]
    if data[len(_MAGIC):len(_MAGIC) + 32] != hashlib.sha256(key.encode()).digest():
        return None, "holds another program (it is filed under the wrong name)"
    if data[len(_MAGIC) + 32:_HEADER] != hashlib.sha256(value).digest():
        return None, "is cut short or damaged"
    return value, ""


def _checked_cache_class():
    from jax._src.compilation_cache_interface import CacheInterface

    class CheckedCache(CacheInterface):
        """JAX's persistent cache as one sealed file per program, `KEY-cache` (the names
        JAX's own file cache uses, which `prune` reads)."""

        def __init__(self, path: str):
            self._path = pathlib.Path(path)
            self._path.mkdir(parents=True, exist_ok=True)

        def get(self, key: str) -> bytes | None:
            entry = self._path / f"{key}-cache"
            try:
                data = entry.read_bytes()
            except FileNotFoundError:
                return None
            value, problem = unseal(key, data)
            if value is None:
                logging.warning("compilation cache entry %s %s; removed, and the program is "
                                "compiled again", entry, problem)
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            return value

        def put(self, key: str, value: bytes) -> None:
            entry = self._path / f"{key}-cache"
            if entry.exists():
                return
            part = self._path / f".{key}.{os.getpid()}.part"
            try:
                part.write_bytes(seal(key, value))
                os.replace(part, entry)
            finally:  # a full disk: no partial entry stays behind (JAX warns with the error)
                with contextlib.suppress(FileNotFoundError):
                    part.unlink()

    return CheckedCache


def _use_checked_cache() -> None:
    """Makes JAX build its persistent cache as a `CheckedCache`. JAX has no public hook for
    this: its module-level `get_file_cache`, which builds the cache on first use, is replaced.
    JAX's own cache falls short in
    `tests/test_compilation_cache.py::test_a_bad_cache_entry_is_named_removed_and_written_again`."""
    from jax._src import compilation_cache as jax_cache

    cls = _checked_cache_class()
    jax_cache.get_file_cache = lambda path: (cls(path), path)


def prune(path: str, max_bytes: int = MAX_SIZE_BYTES, every_secs: float = PRUNE_EVERY_SECS,
          now: float | None = None) -> int:
    """Deletes the least recently read entries of the cache at `path` until it holds at most
    3/4 of `max_bytes`, when it holds more; does nothing when the last look was less than
    `every_secs` ago. Returns the number of entries deleted."""
    now = time.time() if now is None else now
    stamp = os.path.join(path, _STAMP)
    try:
        if now - os.stat(stamp).st_mtime < every_secs:
            return 0
    except FileNotFoundError:
        pass
    os.makedirs(path, exist_ok=True)
    with open(stamp, "w"):
        pass
    os.utime(stamp, (now, now))
    entries, total = [], 0
    with os.scandir(path) as it:
        for e in it:
            if e.name.endswith("-cache") and e.is_file():
                st = e.stat()
                entries.append((max(st.st_atime, st.st_mtime), e.path, st.st_size))
                total += st.st_size
    if total <= max_bytes:
        return 0
    deleted = 0
    for _, name, size in sorted(entries):
        if total <= 0.75 * max_bytes:
            break
        try:
            os.remove(name)
        except FileNotFoundError:
            continue
        with contextlib.suppress(FileNotFoundError):  # JAX's own bound's access-time file
            os.remove(name[:-len("-cache")] + "-atime")
        total -= size
        deleted += 1
    return deleted
