#!/usr/bin/env python3
"""The training loss and its gradient with respect to the logits, in three forms.

    python benchmarks/loss_forms.py                  # ~10 seconds

Times one core's share of the batch (`--batch_size` / cores, `--image_size`
square, 1 channel) on one thread, as each shard of the CPU recipe computes it:
the loss's value and its gradient to the logits, scaled by 1 / (pixels x global
batch) as the step's loss is. Forms, interleaved round by round:

- `tensorflow`: `tf.nn.sigmoid_cross_entropy_with_logits`, averaged per example
  and over the batch, differentiated by the tape (what a plain step does);
- `per_example_custom_gradient`: the per-example form the step used before
  (benchmarks/NOTES.md sections 4-5): relu(x) - x z + log1p(exp(-|x|)) with a
  hand-written gradient (sigmoid(x) - z) x scale;
- `sum_and_gradient`: `core.metrics.bce_sum_and_gradient`, which the step uses
  now (NOTES.md section 11): no tape, the log term as logs of blockwise products.

Writes results/loss_forms.{json,md}.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 256, "Global batch; each core's share is what is timed.", lower_bound=1)
flags.DEFINE_integer("image_size", 28, "Logits are image_size x image_size x 1 per example.", lower_bound=1)
flags.DEFINE_integer("iterations", 50, "Loss + gradient evaluations per timed call.", lower_bound=1)
flags.DEFINE_integer("rounds", 15, "Timed calls per form, interleaved (the median counts).", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")


def _forms(global_batch: int) -> dict:
    """name -> fn(targets, logits) returning (loss, d loss / d logits)."""
    import tensorflow as tf

    from core import metrics

    def tensorflow(z, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            per_example = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(z, x), axis=[1, 2, 3])
            loss = tf.reduce_sum(per_example) / global_batch
        return loss, tape.gradient(loss, x)

    @tf.custom_gradient
    def _per_example(z, x):
        pixels = tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.float32)
        loss = tf.reduce_mean(tf.nn.relu(x) - x * z + tf.math.log1p(tf.exp(-tf.abs(x))), axis=[1, 2, 3])

        def grad(upstream):
            return None, (tf.sigmoid(x) - z) * tf.reshape(upstream / pixels, [-1, 1, 1, 1])

        return loss, grad

    def per_example_custom_gradient(z, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(_per_example(z, x)) / global_batch
        return loss, tape.gradient(loss, x)

    def sum_and_gradient(z, x):
        pixels = float(x.shape[1] * x.shape[2] * x.shape[3])
        total, grad = metrics.bce_sum_and_gradient(z, x)
        scale = 1.0 / (pixels * global_batch)
        return total * scale, grad * scale

    return {"tensorflow": tensorflow, "per_example_custom_gradient": per_example_custom_gradient,
            "sum_and_gradient": sum_and_gradient}


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    cores, batch = common.one_core(FLAGS.batch_size)  # before any op runs
    shape = (batch, FLAGS.image_size, FLAGS.image_size, 1)
    rng = np.random.default_rng(0)
    # Logits of a trained model span both signs and saturate; targets are grey levels.
    logits = tf.constant(rng.normal(0.0, 4.0, shape), tf.float32)
    targets = tf.constant(rng.random(shape), tf.float32)
    forms = _forms(FLAGS.batch_size)

    def timed(fn):
        @tf.function
        def loop():
            total = tf.constant(0.0)
            for _ in tf.range(FLAGS.iterations):
                x = logits + total * 0.0  # a dependency: iterations cannot be merged
                loss, grad = fn(targets, x)
                total += loss * 0.0 + grad[0, 0, 0, 0] * 0.0
            return total

        return loop

    loops = {name: timed(fn) for name, fn in forms.items()}
    values = {name: fn(targets, logits) for name, fn in forms.items()}
    ref_loss, ref_grad = values["tensorflow"]
    for name, (loss, grad) in values.items():  # the forms agree, or the timing means nothing
        np.testing.assert_allclose(loss.numpy(), ref_loss.numpy(), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(grad.numpy(), ref_grad.numpy(), rtol=1e-4, atol=1e-10,
                                   err_msg=name)
    ms = common.interleaved_ms(loops, FLAGS.rounds, FLAGS.iterations)
    rows = [{"form": name, "ms": ms[name], "speedup": ms["tensorflow"] / ms[name]} for name in forms]

    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "config": {"batch_per_core": batch, "cores": cores,
                                              "image_size": FLAGS.image_size,
                                              "iterations": FLAGS.iterations,
                                              "rounds": FLAGS.rounds}, "results": rows}
    lines = ["# The training loss and its gradient, three forms\n",
             common.context_markdown(context),
             f"BCE value and gradient to the logits for {batch} examples of "
             f"{FLAGS.image_size}x{FLAGS.image_size}x1 (one core's share of {FLAGS.batch_size}), "
             f"one thread, float32; ms per evaluation, median of {FLAGS.rounds} interleaved "
             "rounds. The module docstring of `benchmarks/loss_forms.py` says what each form is.\n",
             "| form | ms | x tensorflow |", "| --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| `{r['form']}` | {r['ms']:.3f} | {r['speedup']:.2f}x |")
    common.write_report(FLAGS.output_dir, "loss_forms", payload, lines)


if __name__ == "__main__":
    common.run(main)
