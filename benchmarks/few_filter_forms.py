#!/usr/bin/env python3
"""A 'same' Conv2D with few filters from many channels, in two forms.

    python benchmarks/few_filter_forms.py                       # ~1 minute
    python benchmarks/few_filter_forms.py --precision=bfloat16

- plain: Keras' `Conv2D`, differentiated by the tape;
- transposed (`fast_forms.conv_by_transpose`, what the runner installs on oneDNN's CPU
  kernels): the transposed convolution of the kernel flipped and with its channel axes
  swapped, the same sums. Its gradient to the input is then a forward convolution, and
  to the kernel the weight gradient of a convolution with few *input* channels.

The default shapes are one shard's input at the default resnet's logits (32 -> 3 at
64x64) and code (64 -> 4 at 8x8), plus 32 -> 8 and 8 -> 3, just outside the rule the
runner uses (at most 4 filters from at least 16 channels). 16 images: a batch of 32 in the
CPU recipe's 2 shards. Timed forward and backward (the gradients to the input, kernel and
bias) with one thread, interleaved round by round. The script first checks that the
forms agree (output and every gradient within 1e-4 of their scale in float32, 2e-2 in
bfloat16).

Writes results/few_filter_forms{,_bfloat16}.{json,md}: per shape and form, the median ms
with its range and the speed-up over the plain conv.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["16x64x64x32x3", "16x8x8x64x4", "16x64x64x32x8", "16x64x64x8x3"],
                  "BxHxWxC_inxC_out: one shard's input and the conv's filters (3x3 kernel).")
flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("rounds", 11, "Timed calls per form, interleaved (median and range).", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def _forms(x, upstream, conv) -> dict:
    """Each form's forward and backward pass (output, then the gradients to the input,
    kernel and bias) as a tf.function of no arguments."""
    import tensorflow as tf

    from layers import fast_forms

    def timed(fn):
        def run():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return (y, *tape.gradient(y, [x, conv.kernel, conv.bias], output_gradients=upstream))
        return tf.function(run)

    return {"plain": timed(conv),
            "transposed": timed(lambda x: fast_forms.conv_by_transpose(conv, x))}


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one shard's thread
    tf.config.threading.set_inter_op_parallelism_threads(1)
    dtype = FLAGS.precision
    rows = []
    for spec in FLAGS.shapes:
        b, h, w, c_in, c_out = (int(v) for v in spec.split("x"))
        rng = np.random.default_rng(0)
        x = tf.cast(rng.standard_normal((b, h, w, c_in)).astype(np.float32), dtype)
        upstream = tf.cast(rng.standard_normal((b, h, w, c_out)).astype(np.float32), dtype)
        conv = tf.keras.layers.Conv2D(c_out, 3, padding="same", dtype=dtype)
        conv(x)
        conv.bias.assign(rng.standard_normal(c_out).astype(np.float32))

        forms = _forms(x, upstream, conv)
        tol = 1e-4 if dtype == "float32" else 2e-2
        for a, r in zip(forms["transposed"](), forms["plain"]()):
            a, r = (tf.cast(t, tf.float32).numpy() for t in (a, r))
            np.testing.assert_allclose(a, r, atol=tol * float(np.abs(r).max()))
        rows += common.form_rows(spec, forms, FLAGS.rounds)

    common.write_form_report(
        FLAGS.output_dir, "few_filter_forms" + ("" if dtype == "float32" else f"_{dtype}"),
        "A 3x3 Conv2D with few filters in two forms", "few_filter_forms.py", rows,
        "input x filters", dtype, {"rounds": FLAGS.rounds, "precision": dtype})


if __name__ == "__main__":
    common.run(main)
