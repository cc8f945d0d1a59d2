#!/usr/bin/env python3
"""Which blocks are faster in the images-as-channels layout on this CPU?

    python benchmarks/grouped_layout.py              # ~30 seconds

Where the runner chooses it (`layers.fast_forms.choose`), `Encoder` and `Decoder`
compute their blocks on the images-as-channels layout (`fast_forms.to_image_groups`:
4 images as the channels of one, every convolution a grouped one with the same
weights) when every block has <= `GROUPED_MAX_FILTERS` filters. This script times one
block of each `--blocks` entry in both layouts (each in the other faster forms), a training step's work
(forward, gradient to the weights, and to the input unless it has 1 channel:
nothing needs the images' gradient), on one thread at one core's share of the
batch, layouts interleaved round by round. Converting into and out of the
layout is left out: a stack does it once, not per block (and the decoder's
last layer ungroups as part of its interleave). Writes
results/grouped_layout.{json,md}.
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
KINDS = {
    "pool": "ConvPool: Conv2D -> 2x2 max-pool (an encoder stage)",
    "conv": "ConvPool(pool=False): Conv2D (the decoder's first stage)",
    "up": "UpsampleConv: 2x upsample -> Conv2D, the sub-pixel form (a decoder stage)",
    "upcrop": "UpsampleConv with a 1-pixel crop after the upsample (e.g. 4 -> 8 -> 7)",
}
# kind : input channels : size : filters : kernel. First the seed model's seven
# blocks, then keras_blog's, then wider ones.
flags.DEFINE_list("blocks", [
    "pool:1:28:8:4", "pool:8:14:4:4", "pool:4:7:4:4", "conv:4:4:4:4", "upcrop:4:4:4:4",
    "up:4:7:8:4", "up:8:14:1:4",
    "pool:1:28:16:3", "pool:16:14:8:3", "pool:8:7:8:3", "conv:8:4:8:3", "upcrop:8:4:8:3",
    "up:8:7:16:3", "up:16:14:1:3",
    "pool:1:28:32:3", "pool:32:14:32:3", "up:32:7:32:3"],
    "kind:cin:size:filters:kernel entries to time (kinds: " + ", ".join(KINDS) + ").")
flags.DEFINE_integer("batch_size", 256, "Global batch; each core's share is what is timed.", lower_bound=1)
flags.DEFINE_integer("iterations", 20, "Training passes per timed call.", lower_bound=1)
flags.DEFINE_integer("rounds", 9, "Timed calls per layout, interleaved (the median counts).", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")


def _parse(entry: str) -> tuple[str, int, int, int, int]:
    try:
        kind, *numbers = entry.split(":")
        cin, size, filters, kernel = (int(v) for v in numbers)
    except ValueError:
        raise app.UsageError(f"--blocks entry {entry!r}: expected kind:cin:size:filters:kernel, "
                             "e.g. pool:8:14:4:4") from None
    if kind not in KINDS:
        raise app.UsageError(f"--blocks entry {entry!r}: unknown kind {kind!r}; expected one "
                             f"of {', '.join(KINDS)}")
    return kind, cin, size, filters, kernel


def _block(kind: str, filters: int, kernel: int, size: int):
    from layers import blocks

    if kind == "pool":
        return blocks.ConvPool(filters, kernel)
    if kind == "conv":
        return blocks.ConvPool(filters, kernel, pool=False)
    target = (2 * size - 1,) * 2 if kind == "upcrop" else None
    return blocks.UpsampleConv(filters, kernel, target_size=target)


def _fast(block, groups: int):
    """The block in layers/fast_forms.py's forms, on `groups` images per group."""
    from layers import blocks, fast_forms

    if isinstance(block, blocks.ConvPool):
        return functools.partial(fast_forms.conv_pool, block, groups=groups)
    return functools.partial(fast_forms.upsample_conv, block, groups=groups)


def _training_pass(fn, x, variables, with_input_grad: bool):
    """A tf.function running FLAGS.iterations forward + backward passes of `fn`."""
    import tensorflow as tf

    @tf.function
    def loop():
        total = tf.constant(0.0)
        for _ in tf.range(FLAGS.iterations):
            xs = x + total * 0.0  # a dependency: iterations cannot be merged
            with tf.GradientTape() as tape:
                tape.watch(xs)
                loss = tf.reduce_sum(tf.square(fn(xs)))
            sources = [*variables] + ([xs] if with_input_grad else [])
            total += loss * 0.0 + sum(tf.reduce_sum(g[..., :1]) for g in tape.gradient(loss, sources))
        return total

    return loop


def main(argv):
    del argv
    entries = [_parse(entry) for entry in FLAGS.blocks]
    import tensorflow as tf

    from layers import fast_forms

    cores, batch = common.one_core(FLAGS.batch_size)  # before any op runs
    if not fast_forms.onednn_convolutions():
        raise common.Failed("the grouped layout needs oneDNN's convolutions (TensorFlow's own "
                             "have no grouped convolution gradient), and this process has "
                             "them off (TF_ENABLE_ONEDNN_OPTS=0, or a TensorFlow without "
                             "oneDNN): unset TF_ENABLE_ONEDNN_OPTS or set it to 1", 2)
    groups = fast_forms.IMAGE_GROUP
    if batch % groups:
        raise app.UsageError(f"--batch_size={FLAGS.batch_size}: each core's share ({batch}) must "
                             f"be a multiple of {groups} images per group")
    limit = fast_forms.GROUPED_MAX_FILTERS
    rows = []
    for kind, cin, size, filters, kernel in entries:
        x = tf.random.uniform((batch, size, size, cin), seed=1)
        block = _block(kind, filters, kernel, size)
        block(x)  # builds the weights
        grouped_x = fast_forms.to_image_groups(x, groups)
        loops = {
            "ordinary": _training_pass(_fast(block, 1), x, block.trainable_variables, cin > 1),
            "grouped": _training_pass(_fast(block, groups), grouped_x, block.trainable_variables,
                                      cin > 1),
        }
        ms = common.interleaved_ms(loops, FLAGS.rounds, FLAGS.iterations)
        row = {"kind": kind, "input_channels": cin, "size": size, "filters": filters,
               "kernel": kernel, "ms": ms, "speedup": ms["ordinary"] / ms["grouped"],
               "grouped_by_rule": filters <= limit}
        rows.append(row)
        print(row, flush=True)

    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "config": {"batch_per_core": batch, "cores": cores,
                                              "groups": groups, "max_filters": limit,
                                              "iterations": FLAGS.iterations,
                                              "rounds": FLAGS.rounds}, "results": rows}
    lines = ["# Blocks in the ordinary and the images-as-channels layout\n",
             common.context_markdown(context),
             f"One block's training pass (forward, weight gradients, input gradient unless the "
             f"input has 1 channel), one thread, batch {batch} (one core's share of "
             f"{FLAGS.batch_size}), float32; ms per pass, median of {FLAGS.rounds} interleaved "
             f"rounds. `grouped` is the same block on {groups} images as the channels of one "
             "(`layers.fast_forms.to_image_groups`, converting excluded). A stack computes grouped "
             f"when all its blocks have <= {limit} filters (`rule`).\n",
             "| block | input | filters | kernel | ordinary ms | grouped ms | grouped speedup "
             "| rule |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['size']}x{r['size']}x{r['input_channels']} | "
                     f"{r['filters']} | {r['kernel']} | {r['ms']['ordinary']:.2f} | "
                     f"{r['ms']['grouped']:.2f} | {r['speedup']:.2f}x | "
                     f"{'grouped' if r['grouped_by_rule'] else 'ordinary'} |")
    lines.append("")
    lines.append("Kinds: " + "; ".join(f"`{k}` {v}" for k, v in KINDS.items()) + ".")
    common.write_report(FLAGS.output_dir, "grouped_layout", payload, lines)


if __name__ == "__main__":
    common.run(main)
