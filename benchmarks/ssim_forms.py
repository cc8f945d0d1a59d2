#!/usr/bin/env python3
"""SSIM, the eval metric and the `ssim` loss, in two forms.

    python benchmarks/ssim_forms.py                  # ~30 seconds

- `tf.image.ssim`: TensorFlow's, an 11x11 Gaussian as a depthwise convolution over
  each of the four maps SSIM filters;
- `core.metrics.ssim`: the same Gaussian as two 1-D ones, each a matmul with a banded
  matrix (rows, then columns), which is what tapeloop evaluates and trains with.

Each shape is timed for the value alone (evaluation) and for the value and its gradient
to the reconstruction (the `ssim` loss), with the CPU recipe's threads (one per op, two
ops at once), interleaved round by round. The script first checks that the two forms
agree (value within 2e-6, gradient within 1e-6); otherwise the timing would mean nothing.

Writes results/ssim_forms.{json,md}: per shape and form, the median ms with its range
and the speed-up over tf.image.ssim.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["2000x28x28x1", "256x64x64x3"],
                  "BxHxWxC: 2000 MNIST images (the fast recipe's evaluation), a colour batch.")
flags.DEFINE_integer("rounds", 11, "Timed calls per form, interleaved (median and range).", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # the CPU recipe's threads
    tf.config.threading.set_inter_op_parallelism_threads(2)
    from core import metrics

    forms = {"tf.image.ssim": lambda x, y: tf.image.ssim(
                 x, y, max_val=1.0, filter_size=min(11, *x.shape[1:3])),
             "core.metrics.ssim": metrics.ssim}
    rows = []
    for spec in FLAGS.shapes:
        shape = tuple(int(v) for v in spec.split("x"))
        rng = np.random.default_rng(0)
        x = tf.constant(rng.random(shape, dtype=np.float32))
        y = tf.constant(np.clip(x.numpy() + 0.2 * rng.standard_normal(shape), 0, 1), tf.float32)

        def value(fn, x=x, y=y):
            return tf.function(lambda: tf.reduce_sum(fn(x, y)))

        def gradient(fn, x=x, y=y):
            def both():
                with tf.GradientTape() as tape:
                    tape.watch(y)
                    total = tf.reduce_sum(fn(x, y))
                return total, tape.gradient(total, y)
            return tf.function(both)

        ref, ours = (gradient(fn)() for fn in forms.values())
        np.testing.assert_allclose(ours[0].numpy(), ref[0].numpy(), atol=2e-6 * shape[0])
        np.testing.assert_allclose(ours[1].numpy(), ref[1].numpy(), atol=1e-6)
        for task, make in (("value", value), ("value and gradient", gradient)):
            seconds = common.interleaved_times({name: make(fn) for name, fn in forms.items()},
                                               FLAGS.rounds)
            times = {name: [1e3 * t for t in ts] for name, ts in seconds.items()}
            base = statistics.median(times["tf.image.ssim"])
            for name, t in times.items():
                rows.append({"shape": spec, "task": task, "form": name,
                             "ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t),
                             "speedup": base / statistics.median(t)})

    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "config": {"rounds": FLAGS.rounds, "threads": "intra 1, inter 2"},
               "results": rows}
    lines = ["# SSIM in two forms\n", common.context_markdown(context),
             f"Milliseconds per call, median of {FLAGS.rounds} interleaved rounds (range), "
             "float32, one thread per op and two ops at once (the CPU recipe). The module "
             "docstring of `benchmarks/ssim_forms.py` says what each form is.\n",
             "| images | computes | form | ms | range | x tf.image.ssim |",
             "| --- | --- | --- | ---: | --- | ---: |"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['task']} | `{r['form']}` | {r['ms']:.1f} | "
                     f"{r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['speedup']:.2f}x |")
    common.write_report(FLAGS.output_dir, "ssim_forms", payload, lines)


if __name__ == "__main__":
    common.run(main)
