#!/usr/bin/env python3
"""What exact resume on TFRecord shards costs, both ways.

    python benchmarks/resume_cost.py --data_dir=/tmp/tapeloop-image-files/tfrecord_prepared-20000

Fast-forward (what tapeloop does): a resumed pipeline rebuilds epoch e's order from
(seed, e) and skips the records of the steps already taken, raw, before decoding.
Cost: the time to the first batch, at the start of an epoch and near its end.

Iterator state (the alternative): `tf.train.Checkpoint(iterator=it)` saves the
pipeline's position, including the shuffle window's records and the prefetch buffers.
Cost: the bytes it adds to every checkpoint, and the time to save and restore it.

Both on the same shards, in one process. Writes results/resume_cost.{json,md}.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "/tmp/tapeloop-image-files/tfrecord_prepared-20000",
                    "TFRecord shards (benchmarks/image_files.py writes these).")
flags.DEFINE_integer("batch_size", 256, "Batch size.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Repeats of each measurement (median reported).", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def main(argv):
    del argv
    import statistics

    import tensorflow as tf

    from core import data

    src = data.open_split("train", "tfrecord", FLAGS.data_dir).source
    batch = FLAGS.batch_size
    steps_per_epoch = src.num_examples // batch

    def first_batch(start_step):
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            it = iter(data.train_dataset(src, batch, 0, start_step))
            float(tf.reduce_sum(next(it)[:, 0, 0, 0]))
            times.append(time.perf_counter() - start)
        return statistics.median(times), min(times), max(times)

    first_batch(0)  # warm-up: tracing the pipeline's functions, the file cache
    fast_forward = {f"step {s}": first_batch(s) for s in
                    (0, steps_per_epoch // 2, steps_per_epoch - 1, steps_per_epoch)}

    sizes, save_times, restore_times = [], [], []
    for _ in range(FLAGS.repeats):
        it = iter(data.train_dataset(src, batch, 0, 0))
        for _ in range(steps_per_epoch // 2):
            next(it)
        with tempfile.TemporaryDirectory() as folder:
            ckpt = tf.train.Checkpoint(iterator=it)
            start = time.perf_counter()
            path = ckpt.write(os.path.join(folder, "it"))
            save_times.append(time.perf_counter() - start)
            sizes.append(sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)))
            fresh = iter(data.train_dataset(src, batch, 0, 0))
            start = time.perf_counter()
            tf.train.Checkpoint(iterator=fresh).read(path).assert_consumed()
            float(tf.reduce_sum(next(fresh)[:, 0, 0, 0]))
            restore_times.append(time.perf_counter() - start)
    model_ckpt = 30_000  # bytes: the seed model's checkpoint with Adam's slots, for scale
    iterator = {"bytes": statistics.median(sizes), "save_s": statistics.median(save_times),
                "restore_and_first_batch_s": statistics.median(restore_times)}
    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "examples": src.num_examples, "batch_size": batch,
               "steps_per_epoch": steps_per_epoch, "fast_forward_first_batch_s": fast_forward,
               "iterator_state": iterator}
    lines = ["# Exact resume on TFRecord shards: fast-forward against iterator state\n",
             common.context_markdown(context),
             f"{src.describe()}, batch {batch} ({steps_per_epoch} steps per epoch), median of "
             f"{FLAGS.repeats} (`python benchmarks/resume_cost.py`).\n",
             "| resume by fast-forward at | time to the first batch (s) | range |",
             "| --- | ---: | --- |"]
    for name, (median, low, high) in fast_forward.items():
        lines.append(f"| {name} | {median:.2f} | {low:.2f}-{high:.2f} |")
    lines += ["", "| iterator state in the checkpoint, mid-epoch | value |", "| --- | ---: |",
              f"| bytes added to every checkpoint | {iterator['bytes'] / 2**20:,.1f} MB "
              f"({iterator['bytes'] / model_ckpt:,.0f}x the seed model's ~30 kB checkpoint) |",
              f"| time to save it | {iterator['save_s']:.2f} s |",
              f"| time to restore it and draw a batch | "
              f"{iterator['restore_and_first_batch_s']:.2f} s |"]
    common.write_report(FLAGS.output_dir, "resume_cost", payload, lines)


if __name__ == "__main__":
    common.run(main)
