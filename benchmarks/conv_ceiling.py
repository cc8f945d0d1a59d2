#!/usr/bin/env python3
"""How fast can this machine run the model's convolutions at all? A ceiling for the step.

    python benchmarks/conv_ceiling.py            # ~10 seconds

For every convolution of `--model`, as the architecture defines it (a 'same'
conv at the size it runs at, the FLOPs `throughput.py` counts), times the three
ops a training step needs: the forward pass, the gradient to the weights and
the gradient to the input (not for the first conv: its input is data). One
thread, one op at a time, at the batch one core gets in the per-core recipe
(`--batch_size` / cores), in float32 and bfloat16, against a matmul timed the
same way. The sum over the model is the rate a step that did nothing but its
convolutions, one per core at a time, could reach: the step's fraction of
the machine's peak cannot go above this ceiling's, except by computing fewer
FLOPs than counted (as the sub-pixel upsample + conv does).
Writes results/conv_ceiling.{json,md}.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "seed", "Registered model.")
flags.DEFINE_list("image_shape", ["28", "28", "1"], "H,W,C of the images.")
flags.DEFINE_integer("batch_size", 256, "Global batch; each core's share is what is timed.", lower_bound=1)
flags.DEFINE_integer("iterations", 20, "Ops per timed call.", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed calls per op (the median counts).", lower_bound=1)
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Precisions to time.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")


def time_op(fn, *args) -> float:
    """Median seconds of one call of `fn(*args)`, FLAGS.iterations per timed call."""
    import tensorflow as tf

    @tf.function
    def loop(*xs):
        total = tf.constant(0.0)
        for _ in tf.range(FLAGS.iterations):
            # Depend on the running total so the iterations cannot be merged.
            y = fn(*[x + tf.cast(total * 0.0, x.dtype) for x in xs])
            total += tf.cast(tf.reduce_sum(y[..., :1]), tf.float32)
        return total

    return common.interleaved_ms({"op": lambda: loop(*args)}, FLAGS.repeats, FLAGS.iterations)["op"] / 1e3


def main(argv):
    del argv
    import tensorflow as tf

    from layers.autoencoders import build_autoencoder

    cores, batch = common.one_core(FLAGS.batch_size)  # before any op runs
    image_shape = tuple(int(d) for d in FLAGS.image_shape)
    model = build_autoencoder(FLAGS.model, image_shape)
    shapes = [c for c in common.conv_layers(model, image_shape) if not c["transposed"]]
    context = common.machine_context(with_peaks=False)
    results = {}
    for dtype_name in FLAGS.dtypes:
        dtype = tf.as_dtype(dtype_name)
        peak = common.matmul_peak(dtype, n=1024)  # one thread: this is one core's peak
        rows, total_flops, total_seconds = [], 0, 0.0
        for i, s in enumerate(shapes):
            h, w, cin = s["input"]
            x = tf.cast(tf.random.uniform((batch, h, w, cin)), dtype)
            k = tf.cast(tf.random.normal((s["kernel"], s["kernel"], cin, s["filters"])), dtype)
            dy = tf.cast(tf.random.uniform((batch, h, w, s["filters"])), dtype)
            ops = {
                "forward": (lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"), x, k),
                "grad_weights": (lambda x, dy, size=tuple(k.shape): tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=size, out_backprop=dy, strides=[1, 1, 1, 1],
                    padding="SAME"), x, dy),
            }
            if i > 0:  # the first conv's input is data: no gradient for it
                ops["grad_input"] = (lambda k, dy, size=tuple(x.shape): tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=size, filter=k, out_backprop=dy, strides=[1, 1, 1, 1],
                    padding="SAME"), k, dy)
            flops = s["flops"] * batch
            row = {"name": s["name"], "input": s["input"], "filters": s["filters"],
                   "kernel": s["kernel"], "mflop_per_op": flops / 1e6}
            for op_name, (fn, *args) in ops.items():
                seconds = time_op(fn, *args)
                row[op_name] = {"ms": 1e3 * seconds, "gflops": flops / seconds / 1e9,
                                "fraction_of_core_peak": flops / seconds / peak}
                total_flops += flops
                total_seconds += seconds
            rows.append(row)
            print(dtype_name, row, flush=True)
        results[dtype_name] = {
            "core_matmul_peak_flops": peak, "convs": rows,
            "ceiling_fraction_of_peak": total_flops / total_seconds / peak,
            "ceiling_examples_per_sec_per_core": batch / total_seconds,
        }

    payload = {"context": context, "config": {"model": FLAGS.model, "batch_per_core": batch,
                                              "cores": cores}, "results": results}
    lines = ["# Convolution ceiling\n", common.context_markdown(context),
             f"Model `{FLAGS.model}`: each convolution's training ops alone, one thread, batch "
             f"{batch} (one core's share of {FLAGS.batch_size}), as % of a one-thread matmul.\n"]
    for dtype_name, r in results.items():
        lines.append(f"**{dtype_name}: all convolutions together reach "
                     f"{100 * r['ceiling_fraction_of_peak']:.1f}% of the core's matmul peak "
                     f"({r['core_matmul_peak_flops'] / 1e9:,.0f} GFLOP/s); that is "
                     f"{r['ceiling_examples_per_sec_per_core'] * cores:,.0f} examples/s on "
                     f"{cores} cores if a step did nothing else.**\n")
        lines.append("| conv | input | filters | kernel | forward % | grad weights % "
                     "| grad input % |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for row in r["convs"]:
            cells = [f"{100 * row[op]['fraction_of_core_peak']:.1f}" if op in row else "-"
                     for op in ("forward", "grad_weights", "grad_input")]
            lines.append(f"| {row['name']} | {'x'.join(map(str, row['input']))} | "
                         f"{row['filters']} | {row['kernel']} | " + " | ".join(cells) + " |")
        lines.append("")
    common.write_report(FLAGS.output_dir, "conv_ceiling", payload, lines)


if __name__ == "__main__":
    common.run(main)
