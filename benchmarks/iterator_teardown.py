#!/usr/bin/env python3
"""How long deleting a tf.data iterator takes, by strategy and tf.data autotuning.

    python benchmarks/iterator_teardown.py                 # ~4 minutes
    python benchmarks/iterator_teardown.py --rounds=1 --train_life=0 --eval_split='test[:256]'  # a smoke run

Every evaluation makes an iterator over the eval split and drops it at the end; a
training run drops its training iterator when it ends. Dropping one runs TensorFlow's
destructor, which on this machine sometimes waited seconds, in steps that grow with how
long the iterator lived (a doubling wait, as tf.data's autotuning loop has). This script
measures that, in one process with 2 logical CPU devices, round by round and interleaved:

- eval: an iterator over `data.eval_dataset` (--eval_split of the embedded data, batches
  of --eval_batch_size), read to its end through a compiled per-batch call, then deleted;
- train: an iterator over `data.train_dataset`, --train_steps batches read, kept alive
  for --train_life seconds (a run's length), then deleted;

each under the default strategy and MirroredStrategy over the 2 devices, with tf.data's
autotuning on (TensorFlow's default, tapeloop's) and off (`Options.autotune.enabled`).
Writes results/iterator_teardown.{json,md}: per case the median, largest and total
seconds of the deletions, how many took over 0.1 s, and the reading time beside them.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 6, "Rounds; each deletes one iterator of every case.", lower_bound=1)
flags.DEFINE_string("eval_split", "test", "Split of the embedded fontdigits data to evaluate.")
flags.DEFINE_integer("eval_batch_size", 32, "Eval batch size.", lower_bound=2)
flags.DEFINE_integer("train_steps", 10, "Training batches read before the wait.", lower_bound=1)
flags.DEFINE_float("train_life", 8.0, "Seconds a training iterator lives after its batches.",
                   lower_bound=0.0)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")

STALL_S = 0.1


def main(argv):
    del argv
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from core import data

    test = data.open_split(FLAGS.eval_split, "fontdigits").source
    train = data.open_split("train[:4096]", "fontdigits").source
    strategies = {"default": tf.distribute.get_strategy(),
                  "mirrored, 2 devices": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}

    def tuned(ds, autotune):
        options = tf.data.Options()
        options.autotune.enabled = autotune
        return ds.with_options(options)

    cases, steps = {}, {}
    for sname, strategy in strategies.items():
        @tf.function
        def step(batch, strategy=strategy):
            return strategy.run(lambda inputs, targets, weights: tf.reduce_sum(targets * weights),
                                args=batch)

        steps[sname] = step
        for autotune in (True, False):
            tag = f"autotune {'on' if autotune else 'off'}"
            cases[("eval", sname, tag)] = strategy.distribute_datasets_from_function(
                lambda ctx, a=autotune: tuned(data.eval_dataset(test, FLAGS.eval_batch_size, ctx), a))
            cases[("train", sname, tag)] = strategy.distribute_datasets_from_function(
                lambda ctx, a=autotune: tuned(data.train_dataset(train, 32, 0, 0, ctx), a))

    def once(key):
        kind, sname, _ = key
        start = time.perf_counter()
        iterator = iter(cases[key])
        if kind == "eval":
            for batch in iterator:
                steps[sname](batch)
        else:
            for _ in range(FLAGS.train_steps):
                next(iterator)
            time.sleep(FLAGS.train_life)
        read = time.perf_counter() - start
        start = time.perf_counter()
        del iterator
        return read, time.perf_counter() - start

    for key in cases:  # the eval steps' traces and a warm-up, untimed
        if key[0] == "eval":
            once(key)
    times = {key: {"read_s": [], "delete_s": []} for key in cases}
    for r in range(FLAGS.rounds):
        for key in (list(cases) if r % 2 == 0 else list(reversed(cases))):
            read, delete = once(key)
            times[key]["read_s"].append(read)
            times[key]["delete_s"].append(delete)

    rows = []
    for (kind, sname, tag), t in times.items():
        deletes = t["delete_s"]
        rows.append({"pipeline": kind, "strategy": sname, "autotune": tag,
                     "delete_median_s": statistics.median(deletes), "delete_max_s": max(deletes),
                     "delete_total_s": sum(deletes),
                     "stalls": sum(d > STALL_S for d in deletes), "rounds": len(deletes),
                     "read_median_s": statistics.median(t["read_s"]), **t})
    context = common.machine_context(with_peaks=False)
    config = {"rounds": FLAGS.rounds, "eval_batch_size": FLAGS.eval_batch_size,
              "train_steps": FLAGS.train_steps, "train_life_s": FLAGS.train_life,
              "stall_s": STALL_S}
    lines = ["# Deleting a tf.data iterator: how long it waits\n",
             common.context_markdown(context),
             f"One process, 2 logical CPU devices, {FLAGS.rounds} interleaved rounds. eval: the "
             f"embedded {FLAGS.eval_split} split in batches of {FLAGS.eval_batch_size}, read to "
             f"its end, then the iterator deleted; train: {FLAGS.train_steps} batches of 32, "
             f"the iterator kept {FLAGS.train_life:g} s more (a run's length), then deleted. "
             f"A stall: a deletion over {STALL_S} s.\n",
             "| pipeline | strategy | tf.data autotuning | deletion, median s | largest | total "
             "| stalls | reading, median s |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['pipeline']} | {r['strategy']} | {r['autotune']} | "
              f"{r['delete_median_s']:.2f} | {r['delete_max_s']:.2f} | {r['delete_total_s']:.2f} | "
              f"{r['stalls']} of {r['rounds']} | {r['read_median_s']:.2f} |" for r in rows]
    common.write_report(FLAGS.output_dir, "iterator_teardown",
                        {"context": context, "config": config, "results": rows}, lines)


if __name__ == "__main__":
    common.run(main)
