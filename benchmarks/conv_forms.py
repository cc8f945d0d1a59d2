#!/usr/bin/env python3
"""Which form of conv + max-pool is fastest on this CPU, for which channel counts?

    python benchmarks/conv_forms.py              # ~20 seconds

`layers.blocks.ConvPool` computes Conv2D -> MaxPooling2D in one of three forms
(the same function and gradients): 'plain', 'images_as_channels' (1 input
channel: groups of 8 images as the channels of a depthwise convolution) and
'space_to_depth' (the convolution on the 2x2-block map with 4x the channels).
On a CPU in float32 it picks one by the input channels, filters and kernel
size. This script times every applicable form of each `--shapes` entry, a
training step's work (forward, gradient to the weights, and to the input after
the first layer), on one thread at one core's share of the batch, forms
interleaved round by round; the rules in `ConvPool._choose_form` are the ones
this table supports. Writes results/conv_forms.{json,md}.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
# input channels : size : filters : kernel. The first two are the seed model's down0
# and down1; the others bracket the rules.
flags.DEFINE_list("shapes", [
    "1:28:8:4", "8:14:4:4", "1:28:8:3", "1:28:12:4", "1:28:16:3", "2:28:4:4", "4:14:4:4",
    "16:14:4:4", "8:14:2:4", "8:14:4:5", "8:14:6:4", "4:14:8:4", "8:14:4:3"],
    "cin:size:filters:kernel entries to time.")
flags.DEFINE_integer("batch_size", 256, "Global batch; each core's share is what is timed.")
flags.DEFINE_integer("iterations", 20, "Training passes per timed call.")
flags.DEFINE_integer("rounds", 5, "Timed calls per form, interleaved (the median counts).")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")

FORMS = ("plain", "images_as_channels", "space_to_depth")


def _forced(block, form: str, x) -> bool:
    """Sets `block` (built on x) to compute in `form`; False if the form cannot apply."""
    from layers import blocks

    h, w, cin = x.shape[1], x.shape[2], x.shape[3]
    if form != "plain" and (h % 2 or w % 2):
        return False
    if form == "images_as_channels" and (cin != 1 or x.shape[0] % blocks._IMAGE_GROUP):
        return False
    if form == "space_to_depth":
        taps = blocks._space_to_depth_taps(block.kernel_size)
        if taps is None:
            return False
        block._taps, block._block_kernel = taps
    block.form = form
    return True


def _training_pass(block, x, with_input_grad: bool):
    """A tf.function running FLAGS.iterations forward + backward passes of `block`."""
    import tensorflow as tf

    @tf.function
    def loop():
        total = tf.constant(0.0)
        for _ in tf.range(FLAGS.iterations):
            xs = x + total * 0.0  # a dependency: iterations cannot be merged
            with tf.GradientTape() as tape:
                tape.watch(xs)
                loss = tf.reduce_sum(tf.square(block(xs)))
            sources = [*block.trainable_variables] + ([xs] if with_input_grad else [])
            total += loss * 0.0 + sum(tf.reduce_sum(g[..., :1]) for g in tape.gradient(loss, sources))
        return total

    return loop


def main(argv):
    del argv
    import tensorflow as tf

    from layers import blocks

    cores, batch = common.one_core(FLAGS.batch_size)  # before any op runs
    rows = []
    for entry in FLAGS.shapes:
        try:
            cin, size, filters, kernel = (int(v) for v in entry.split(":"))
        except ValueError:
            raise app.UsageError(f"--shapes entry {entry!r}: expected cin:size:filters:kernel, "
                                 "e.g. 8:14:4:4") from None
        x = tf.random.uniform((batch, size, size, cin), seed=1)
        chosen = blocks.ConvPool(filters, kernel)
        chosen(x)
        loops = {}
        for form in FORMS:
            block = blocks.ConvPool(filters, kernel)
            block(x)
            if _forced(block, form, x):
                loops[form] = _training_pass(block, x, with_input_grad=cin > 1)
                float(loops[form]())  # trace and warm up
        times = {form: [] for form in loops}
        for _ in range(FLAGS.rounds):
            for form, loop in loops.items():
                start = time.perf_counter()
                float(loop())
                times[form].append((time.perf_counter() - start) / FLAGS.iterations)
        ms = {form: 1e3 * statistics.median(t) for form, t in times.items()}
        row = {"input_channels": cin, "size": size, "filters": filters, "kernel": kernel,
               "ms": ms, "chosen": chosen.form, "fastest": min(ms, key=ms.get),
               "chosen_speedup": ms["plain"] / ms[chosen.form]}
        rows.append(row)
        print(row, flush=True)

    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "config": {"batch_per_core": batch, "cores": cores,
                                              "iterations": FLAGS.iterations,
                                              "rounds": FLAGS.rounds}, "results": rows}
    lines = ["# Conv + max-pool forms\n", common.context_markdown(context),
             f"`layers.blocks.ConvPool` (Conv2D 'same' -> 2x2 max-pool -> relu), one training "
             f"pass (forward, weight gradients, input gradient after a 1-channel input), one "
             f"thread, batch {batch} (one core's share of {FLAGS.batch_size}), float32; ms per "
             f"pass, median of {FLAGS.rounds} interleaved rounds. `chosen` is the form ConvPool "
             "picks on a CPU in float32.\n",
             "| input channels | size | filters | kernel | plain ms | images_as_channels ms "
             "| space_to_depth ms | chosen | chosen vs plain |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        cells = [f"{r['ms'][f]:.2f}" if f in r["ms"] else "-" for f in FORMS]
        lines.append(f"| {r['input_channels']} | {r['size']} | {r['filters']} | {r['kernel']} | "
                     + " | ".join(cells) + f" | {r['chosen']} | {r['chosen_speedup']:.2f}x |")
    common.write_report(FLAGS.output_dir, "conv_forms", payload, lines)


if __name__ == "__main__":
    app.run(main)
