"""TensorBoard event files for every run, written by TensorBoard's own writer (no TensorFlow).

`tensorboard --logdir=runs` (the optional `tensorboard` extra) shows them. A run directory
holds one TensorBoard run per kind of data, as Keras and the flax examples lay them out:
`train/`, `validation/` and `test/`, each its own event files with the same tags (`loss`,
`accuracy`, ...), so that TensorBoard draws training and validation loss in one chart. Each of
them carries the config as hyperparameters (`hparams_of`). Only process 0 writes; every other
process gets a writer that does nothing.

A resumed run continues the same curves with no step twice and none missing. Each run's new
event file starts with TensorBoard's restart marker (what `SummaryWriter(purge_step=...)` writes):
TensorBoard drops what the directory holds of that step and later (the killed run logged those
steps, the resumed run logs them again; a finished run's test results are written again at the
same step). A run flushes its events at every sync point, so that everything up to a
checkpoint is on disk before the checkpoint is.
"""

from __future__ import annotations

import glob
import os
import time

import jax
import numpy as np

EVENTS_GLOB = "events.out.tfevents.*"


def hparams_of(config) -> dict[str, bool | float | str]:
    """A config (a ConfigDict or dict, nested) as TensorBoard hyperparameters: one per leaf,
    under its dotted path. TensorBoard's hyperparameters are booleans, numbers or strings:
    those stay as they are, a sequence becomes its text (`(32, 32)`), None is left out."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update({f"{key}.{k}": v for k, v in hparams_of(value).items()})
        elif isinstance(value, (bool, str)):
            out[key] = value
        elif isinstance(value, (int, float, np.number)):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)):
            out[key] = str(tuple(value))
        elif value is not None:
            out[key] = str(value)
    return out


def _session_start(hparams: dict):
    """The summary that gives a run its hyperparameters (TensorBoard's hparams plugin)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = value
        else:
            info.hparams[key].string_value = str(value)
    content = plugin_data_pb2.HParamsPluginData(session_start_info=info, version=0)
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name="hparams", content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag="_hparams_/session_start_info", metadata=metadata)])


class Summaries:
    """A run directory's TensorBoard writers: `open(step)`, then scalars and figures, each into
    one of the directory's runs (`train`, `validation`, `test`, a subdirectory each).

    Events go through the `tensorboard` package's event-file writer, whose `flush` waits for
    what it queued; its protos make the summaries. tensorboardX, which wraps the same format,
    imports torch where it is installed (1.5 s against 0.23 s, in every process that trains).
    Use as a context manager, or call `close()`. Every method does nothing before `open`, on
    processes other than 0, and with no `logdir`.
    """

    def __init__(self, logdir: str | None, hparams=None):
        """`hparams`: the config (or any mapping) written as every run's hyperparameters."""
        self.logdir = logdir
        self.hparams = hparams_of(hparams or {})
        self._start = None
        self._writers = {}

    def open(self, step: int = 0) -> Summaries:
        """Starts writing after `step`, the step the run starts (or resumes) from."""
        if self.logdir is not None and jax.process_index() == 0:
            self._start = step
        return self

    def _writer(self, run: str, step: int):
        """`run`'s writer, opened at its first event (of step `step`); None where nothing is
        written."""
        if self._start is None:
            return None
        if run not in self._writers:
            self._writers[run] = self._open(run, min(step, self._start + 1))
        return self._writers[run]

    def _open(self, run: str, purge_step: int):
        """A new event file in `logdir/run`: the restart marker at `purge_step` where the run
        holds events already, else the hyperparameters (on disk at once)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        logdir = os.path.join(self.logdir, run)
        os.makedirs(logdir, exist_ok=True)
        resumed = bool(glob.glob(os.path.join(logdir, EVENTS_GLOB)))
        # files are named by the second they open; the suffix keeps two writers of one second
        # apart, and in order
        writer = EventFileWriter(logdir, filename_suffix=f".{time.time_ns()}")
        if resumed:  # as SummaryWriter(purge_step=purge_step) starts its file
            writer.add_event(Event(wall_time=time.time(), step=purge_step,
                                   session_log=SessionLog(status=SessionLog.START)))
        else:  # TensorBoard reads the first hyperparameters of a run, so they are written once
            writer.add_event(Event(wall_time=time.time(), step=0,
                                   summary=_session_start(self.hparams)))
        writer.flush()
        return writer

    def _write(self, run: str, step: int, summary) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._writer(run, step).add_event(Event(wall_time=time.time(), step=int(step),
                                                summary=summary))

    def scalars(self, step: int, values: dict[str, float], run: str, prefix: str = "") -> None:
        """One scalar per entry into `run`, tagged `prefix + name`; non-numbers are left out."""
        if self._start is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        for name, value in values.items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                self._write(run, step, Summary(value=[Summary.Value(
                    tag=prefix + name, simple_value=float(value))]))

    def figure(self, tag: str, make_figure, step: int, run: str) -> None:
        """The matplotlib figure `make_figure()` returns, as a PNG image into `run` (then
        closed); nothing is drawn where nothing is written."""
        if self._start is None:
            return
        import io

        import matplotlib.pyplot as plt
        from tensorboard.compat.proto.summary_pb2 import Summary

        fig = make_figure()
        fig.canvas.draw()
        width, height = fig.canvas.get_width_height()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        plt.close(fig)
        self._write(run, step, Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
            height=height, width=width, colorspace=4, encoded_image_string=png.getvalue()))]))

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers, self._start = {}, None

    def __enter__(self) -> Summaries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
