#!/usr/bin/env python3
"""Examples/sec of the input pipeline alone, as a multiple of the training rate.

    python benchmarks/input_pipeline.py

Measures, in one process and interleaved: the tf.data training pipeline
(`core.data.train_dataset`: gather, scale, prefetch), the same through the
strategy's distributed iterator, the on-device path (`data.DeviceData.batch`
in a compiled loop, no training), and training itself (steps_per_loop 32, tf.data),
so the ratios share the machine's state. Writes results/input_pipeline.{json,md}.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fontdigits", "Dataset.")
flags.DEFINE_string("data_dir", None, "For mnist/fashion_mnist.")
flags.DEFINE_string("train_split", "train", "Training split.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("batches", 400, "Batches per timed round of each pipeline.", lower_bound=1)
flags.DEFINE_integer("train_steps", 64, "Steps per timed round of training.", lower_bound=1)
flags.DEFINE_integer("rounds", 5, "Timed rounds.", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")


def main(argv):
    del argv
    import tensorflow as tf

    from core import data
    from core.trainer import Trainer

    images = data.load_split(FLAGS.train_split, FLAGS.dataset, FLAGS.data_dir).images
    batch = FLAGS.batch_size
    strategy = tf.distribute.get_strategy()
    host_iter = iter(data.train_dataset(images, batch, 0))
    dist_iter = iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(images, batch, 0, 0, ctx)))
    with strategy.scope():
        device_data = data.DeviceData(images, batch, strategy.num_replicas_in_sync, 0)
        trainer = Trainer(common.build_model("seed", images.shape[1:]), strategy, batch, 1e-3)
    step = tf.Variable(0, dtype=tf.int64)
    device_data.reorder(strategy, 0)  # epoch 0's order; the draws below wrap around it

    @tf.function
    def draw_on_device(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            batch_ = strategy.run(lambda: device_data.batch(step.read_value()))
            total += tf.reduce_sum(batch_[:, 0, 0, 0])
            step.assign_add(1)
        return total

    def drain(iterator, n):
        for _ in range(n):
            x = next(iterator)
        float(tf.reduce_sum(x[:, 0, 0, 0]))  # the last batch on the host

    contenders = {
        "tf_data": lambda: drain(host_iter, FLAGS.batches) or FLAGS.batches,
        "tf_data_distributed": lambda: drain(dist_iter, FLAGS.batches) or FLAGS.batches,
        "on_device": lambda: float(draw_on_device(tf.constant(FLAGS.batches))) * 0 + FLAGS.batches,
        "training": lambda: trainer.train_loop(dist_iter, FLAGS.train_steps) * 0 + FLAGS.train_steps,
    }
    for fn in contenders.values():  # warm-up and compile
        fn()
    rates = {name: [] for name in contenders}
    for _ in range(FLAGS.rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            n = fn()
            rates[name].append(n * batch / (time.perf_counter() - start))
    results = {name: common.summarize(r) for name, r in rates.items()}
    train_rate = results["training"]["median"]
    for r in results.values():
        r["multiple_of_training"] = r["median"] / train_rate
    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "config": {"dataset": FLAGS.dataset, "batch_size": batch},
               "results": results}
    lines = ["# Input pipeline\n", common.context_markdown(context),
             f"{FLAGS.dataset} {FLAGS.train_split}, batch {batch}, median of {FLAGS.rounds} "
             "interleaved rounds.\n",
             "| path | examples/s | jitter | x training rate |", "| --- | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median']:,.0f} | {r['jitter']:,.0f} | "
                     f"{r['multiple_of_training']:.1f} |")
    common.write_report(FLAGS.output_dir, "input_pipeline", payload, lines)


if __name__ == "__main__":
    common.run(main)
