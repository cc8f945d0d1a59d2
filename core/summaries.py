"""TensorBoard writers: `train/` and `eval/` under the model dir.

Summaries are written from the host between compiled loops, never inside
XLA-compiled code (XLA has no kernels for summary ops).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf


class Summaries:
    def __init__(self, model_dir: str):
        self.writers = {
            name: tf.summary.create_file_writer(os.path.join(model_dir, name))
            for name in ("train", "eval")
        }

    def scalars(self, writer: str, step: int, values: dict[str, float]) -> None:
        with self.writers[writer].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def image_rows(self, writer: str, step: int, name: str, rows: list[np.ndarray],
                   description: str = "") -> None:
        """One image: each of `rows` (n, H, W, C) in [0, 1] laid out as a horizontal strip."""
        strips = [np.concatenate(list(row), axis=1) for row in rows]  # (H, n*W, C) each
        grid = np.concatenate(strips, axis=0)[None]  # (1, rows*H, n*W, C)
        with self.writers[writer].as_default(step=step):
            tf.summary.image(name, grid, max_outputs=1, description=description)

    def text(self, writer: str, step: int, name: str, text: str) -> None:
        with self.writers[writer].as_default(step=step):
            tf.summary.text(name, text)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
