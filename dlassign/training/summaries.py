"""TensorBoard event files for every run, written by tensorboardX (no TensorFlow needed).

`tensorboard --logdir=runs` (the optional `tensorboard` extra) shows them. One `Summaries` per
run directory; only process 0 writes, every other process gets a writer that does nothing.

A resumed run continues the same curves with no step twice and none missing: `open(step)` first
takes out of the directory's event files every event of a step after the checkpoint it resumes
from (the killed run logged them, the resumed run logs them again) and the final events of a
finished run (tags under `test/`, written again at the end), and a run flushes its events at
every sync point, so that everything up to a checkpoint is on disk before the checkpoint is. The
new event file also starts with TensorBoard's restart marker (what tensorboardX's `purge_step`
writes), so a TensorBoard that already read the dropped events hides them too.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import struct
import sys
import time
import types

import jax
import numpy as np
from absl import logging

EVENTS_GLOB = "events.out.tfevents.*"
_TBX_MODULES = ("record_writer", "event_file_writer", "proto.event_pb2", "summary", "utils")


def _tensorboardx() -> None:
    """Imports the parts of tensorboardX used here without its package `__init__`, which imports
    torch when torch is installed (2-3 s of start-up for every run). A later `import
    tensorboardX` still runs the full package and reuses these modules."""
    if "tensorboardX" in sys.modules:
        return
    spec = importlib.util.find_spec("tensorboardX")
    stub = types.ModuleType("tensorboardX")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["tensorboardX"] = stub
    try:
        for name in _TBX_MODULES:
            importlib.import_module(f"tensorboardX.{name}")
    finally:
        del sys.modules["tensorboardX"]
FINAL_PREFIXES = ("test/",)  # tags written once, after the last step


def event_files(logdir: str) -> list[str]:
    """The event files directly in `logdir`, in the order TensorBoard reads them."""
    return sorted(p for p in glob.glob(os.path.join(logdir, EVENTS_GLOB))
                  if not p.endswith(".tmp"))


def _records(path: str) -> tuple[list[bytes], bool]:
    """The intact TFRecord payloads of an event file, and whether a record cut short (a kill
    during a write) or damaged ends it."""
    _tensorboardx()
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            return out, True
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        end = pos + 12 + n + 4
        if (struct.unpack("<I", data[pos + 8:pos + 12])[0] != masked_crc32c(header)
                or end > len(data)):
            return out, True
        body = data[pos + 12:pos + 12 + n]
        if struct.unpack("<I", data[end - 4:end])[0] != masked_crc32c(body):
            return out, True
        out.append(body)
        pos = end
    return out, False


def discard_events_after(logdir: str, step: int) -> int:
    """Rewrites the event files of `logdir` without the events of steps after `step`, the final
    events (`FINAL_PREFIXES`) and any record cut short; returns how many events went."""
    _tensorboardx()
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import RecordWriter

    dropped = 0
    for path in event_files(logdir):
        records, cut = _records(path)
        keep = []
        for record in records:
            event = Event.FromString(record)
            final = any(v.tag.startswith(FINAL_PREFIXES) for v in event.summary.value)
            if event.step > step or final:
                dropped += 1
            else:
                keep.append(record)
        if len(keep) == len(records) and not cut:
            continue
        writer = RecordWriter(path + ".tmp")
        for record in keep:
            writer.write(record)
        writer.close()
        os.replace(path + ".tmp", path)
    return dropped


class Summaries:
    """A run's TensorBoard writer: `open(step)`, then scalars, figures and hyperparameters.

    Events go through tensorboardX's own event-file writer (`EventsWriter`) synchronously, not
    through its `SummaryWriter`, whose background queue `flush()` does not drain: a run flushes
    at every sync point, and what it flushed must be on disk before the checkpoint that follows.
    The summaries themselves are tensorboardX's (`tensorboardX.summary`). Use as a context
    manager, or call `close()`. Every method does nothing before `open`, on processes other
    than 0, and with no `logdir`.
    """

    def __init__(self, logdir: str | None):
        self.logdir = logdir
        self._writer = None

    def open(self, step: int = 0) -> Summaries:
        """Starts writing after `step`, the step the run starts (or resumes) from; events the
        directory holds for later steps are dropped first (`discard_events_after`)."""
        if self.logdir is None or jax.process_index() != 0 or self._writer is not None:
            return self
        _tensorboardx()
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        os.makedirs(self.logdir, exist_ok=True)
        existing = bool(event_files(self.logdir))
        if existing:
            dropped = discard_events_after(self.logdir, step)
            if dropped:
                logging.info("dropped %d TensorBoard events after step %d, logged before the "
                             "restart; they are written again", dropped, step)
        # tensorboardX names the file by the second it opens it; the suffix keeps two writers of
        # one second apart, and in order
        self._writer = EventsWriter(os.path.join(self.logdir, "events"),
                                    f".{time.time_ns()}.{os.getpid()}")
        if existing:  # TensorBoard's restart marker: hide what it read of steps after `step`
            self._writer.write_event(Event(wall_time=time.time(), step=step + 1,
                                           session_log=SessionLog(status=SessionLog.START)))
        return self

    def _write(self, summary, step: int) -> None:
        _tensorboardx()
        from tensorboardX.proto.event_pb2 import Event

        self._writer.write_event(Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One scalar per entry, tagged `prefix + name`; non-numbers are left out."""
        if self._writer is None:
            return
        _tensorboardx()
        from tensorboardX.summary import scalar

        for name, value in values.items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                self._write(scalar(prefix + name, float(value)), step)

    def figure(self, tag: str, make_figure, step: int) -> None:
        """The matplotlib figure `make_figure()` returns, as an image (then closed); nothing is
        drawn where nothing is written."""
        if self._writer is None:
            return
        _tensorboardx()
        from tensorboardX.summary import image
        from tensorboardX.utils import figure_to_image

        self._write(image(tag, figure_to_image(make_figure(), close=True)), step)

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int = 0) -> None:
        """The run's hyperparameters and final metrics for TensorBoard's hparams view: the
        summaries of tensorboardX's `add_hparams`, in this run's own event file (`add_hparams`
        opens a second writer in a subfolder). Values other than bool, int, float and str are
        written as text, e.g. [128] as '(128,)'."""
        if self._writer is None:
            return
        _tensorboardx()
        from tensorboardX.summary import hparams as hparams_summaries

        values = {k: v if isinstance(v, (bool, int, float, str))
                  else str(tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()}
        for summary in hparams_summaries(values, metrics):
            self._write(summary, step)
        self.scalars(step, metrics)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Summaries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
