"""TensorBoard writers: `train/` and `eval/` under the model dir.

Summaries are written from the host between compiled loops, never inside
XLA-compiled code (XLA has no kernels for summary ops).
"""

from __future__ import annotations

import contextlib
import glob
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from core.errors import WriteError, write_reason


def _read(folder: str, tag: str) -> list[tuple[int, np.ndarray]]:
    """(step, value) of the TF2 summary `tag` in the event files of `folder`, by step; a
    step written twice (a resumed run) keeps the last value. A file that ends in a record
    cut short (its disk filled up) is read up to it, as TensorBoard reads it."""
    values = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(glob.escape(folder), "events.out.tfevents.*"))):
        with contextlib.suppress(tf.errors.DataLossError):
            for record in tf.data.TFRecordDataset(path):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for value in event.summary.value:
                    if value.tag == tag:
                        values[event.step] = tf.make_ndarray(value.tensor)
    return sorted(values.items())


def read_scalars(folder: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar summary `tag` in `folder`, by step."""
    return [(step, float(value)) for step, value in _read(folder, tag)]


def read_texts(folder: str, tag: str) -> list[tuple[int, str]]:
    """(step, text) of a text summary `tag` in `folder`, by step."""
    return [(step, value.item().decode()) for step, value in _read(folder, tag)]


def _hparam_value(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


class Summaries:
    """TensorBoard writers: `train/`, `eval/` (and `eval_ckpt-N/` for an evaluation of a
    chosen checkpoint) under the model dir, and one at its root for the HParams dashboard
    (so sibling model dirs compare in one table), which only training writes."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.writers: dict[str, tf.summary.SummaryWriter] = {}

    def writer(self, name: str) -> tf.summary.SummaryWriter:
        """The writer of TensorBoard run `name` (a folder under the model dir; "run" is the
        model dir itself), created on first use: a run that writes nothing makes no file."""
        if name not in self.writers:
            self.writers[name] = tf.summary.create_file_writer(self._folder(name))
        return self.writers[name]

    def _folder(self, name: str) -> str:
        return self.model_dir if name == "run" else os.path.join(self.model_dir, name)

    @contextlib.contextmanager
    def _into(self, name: str, step: int | None = None):
        """Writer `name` as the default (at `step`). Its events reach the file when it
        flushes, at the block's end: a full disk fails there, as a WriteError."""
        try:
            with self.writer(name).as_default(step=step):
                yield
        except (OSError, tf.errors.OpError) as e:
            raise self._failed(name, e) from None

    def _failed(self, name: str, error: Exception) -> WriteError:
        return WriteError(f"TensorBoard summaries to {self._folder(name)}", write_reason(error))

    def run_header(self, config: dict, step: int) -> None:
        """The config as a text summary, and the hyperparameters for the HParams dashboard."""
        from tensorboard.plugins.hparams import api as hp

        rows = "\n".join(f"| {k} | {_hparam_value(v)} |" for k, v in sorted(config.items()))
        self.text("train", step, "config", "| flag | value |\n| --- | --- |\n" + rows)
        # The session only, no `hparams_config`: TensorBoard takes one run's config as the
        # whole experiment's, so a config per model dir would give every hyperparameter
        # one run's domain, or none. Without one, TensorBoard infers each one's type and
        # domain from all the runs, marks those that differ between them, and takes the
        # metrics from the runs' train/ and eval/ scalars.
        with self._into("run", step):
            hp.hparams({k: _hparam_value(v) for k, v in config.items()},
                       trial_id=os.path.basename(os.path.abspath(config["model_dir"])))

    def restart(self, step: int, writers: tuple[str, ...]) -> None:
        """Marks that training goes on from `step` (a start, a resume, a rollback): a
        SessionLog START event at `step + 1` in each of `writers`. A run resumed from an
        earlier checkpoint than it had logged to writes the steps after it again; from a
        folder's second START on, TensorBoard's Python loader (`--load_fast=false`) drops
        the points it holds from that step on, as its data server and the curves figure
        keep the newer ones anyway. TensorFlow exports no call that writes an Event, only
        Summary protos (`write_raw_pb`); its `summary_ops_v2.import_event` writes one into
        the writer's own file, after what it wrote before."""
        from tensorflow.python.ops import summary_ops_v2

        event = tf.compat.v1.Event(
            wall_time=time.time(), step=step + 1,
            session_log=tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START))
        for name in writers:
            with self._into(name):
                summary_ops_v2.import_event(tf.constant(event.SerializeToString()))

    def scalars(self, writer: str, step: int, values: dict[str, float]) -> None:
        with self._into(writer, step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def histograms(self, writer: str, step: int, variables) -> None:
        """A histogram of each of `variables`, tagged by its path (`seed/encoder/down0/conv/
        kernel`): what Keras' TensorBoard callback writes with `histogram_freq`. Under a
        distribution strategy a variable reads as its first replica's copy, which the
        all-reduced updates keep equal to the others."""
        with self._into(writer, step):
            for v in variables:
                tf.summary.histogram(getattr(v, "path", None) or v.name, v)

    def image_rows(self, writer: str, step: int, name: str, rows: list[np.ndarray],
                   description: str = "") -> None:
        """One image: each of `rows` (n, H, W, C) in [0, 1] laid out as a horizontal strip
        (wrapped into bands of 16 columns, as the figure)."""
        from core.plots import wrap_rows

        rows, _ = wrap_rows(rows, [""] * len(rows))
        strips = [np.concatenate(list(row), axis=1) for row in rows]  # (H, n*W, C) each
        grid = np.concatenate(strips, axis=0)[None]  # (1, rows*H, n*W, C)
        with self._into(writer, step):
            tf.summary.image(name, grid, max_outputs=1, description=description)

    def graph(self, writer: str, step: int, graph: tf.Graph) -> None:
        """`graph` for TensorBoard's Graphs tab (what Keras' TensorBoard callback writes of
        its train function)."""
        with self._into(writer, step):
            tf.summary.graph(graph)

    def text(self, writer: str, step: int, name: str, text: str) -> None:
        with self._into(writer, step):
            tf.summary.text(name, text)

    def flush(self) -> None:
        for name, writer in self.writers.items():
            try:
                writer.flush()
            except (OSError, tf.errors.OpError) as e:
                raise self._failed(name, e) from None

    def close(self) -> None:
        """Closes every writer. Called on the way out, after an error too, so a write that
        fails here (the disk filled up) is logged, not raised over that error."""
        for name, writer in self.writers.items():
            try:
                writer.close()
            except (OSError, tf.errors.OpError) as e:
                logging.warning("%s", self._failed(name, e))
