#!/usr/bin/env python3
"""The resnet decoder's UpSampling2D + 3x3 Conv2D pairs, in three forms.

    python benchmarks/upsample_forms.py                  # ~1 minute
    python benchmarks/upsample_forms.py --jit_compile     # each form compiled by XLA

- plain: Keras' `UpSampling2D(2)` (a nearest-neighbour repeat) then the 'same' conv on
  the upsampled map, differentiated by the tape;
- folded: the seed model's sub-pixel form (`fast_forms.upsample_conv`): the 3x3 kernel
  folded for the small map into one 3x3 kernel with 4x the output channels (one per
  output phase), then the phases interleaved. The same FLOPs as plain: each phase
  reads only 2x2 of the 3x3 small-map pixels, the folded kernel is zero elsewhere;
- phases (`fast_forms.upsample_then_conv`, what the runner installs): one convolution
  of the small map per output phase, with only the 2x2 taps that phase reads, then the
  phases interleaved: 16 taps where the others compute 36, 2.25x fewer FLOPs.

Each shape is one shard's input at one of the default resnet decoder's three up stages
(16 images: a batch of 32 in the CPU recipe's 2 shards), timed forward and backward (the
gradients to the input, kernel and bias) with one thread, interleaved round by round.
The script first checks that the forms agree (output and every gradient within 1e-4 of
their scale).

Writes results/upsample_forms{,_xla}.{json,md}: per shape and form, the median ms with
its range and the speed-up over the plain pair.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["16x32x32x32x32", "16x16x16x64x64", "16x8x8x64x64"],
                  "BxHxWxC_inxC_out: one shard's small map and the conv's filters at each up "
                  "stage of the default resnet decoder.")
flags.DEFINE_bool("jit_compile", False, "Compile each form with XLA (the GPU default).")
flags.DEFINE_integer("rounds", 11, "Timed calls per form, interleaved (median and range).", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def _forms(x, upstream, up, conv, block) -> dict:
    """Each form's forward and backward pass (output, then the gradients to the input,
    kernel and bias) as a tf.function of no arguments."""
    import tensorflow as tf

    from layers import fast_forms

    def timed(fn, layer):
        def run():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = fn(x)
            return (y, *tape.gradient(y, [x, layer.kernel, layer.bias], output_gradients=upstream))
        return tf.function(run, jit_compile=FLAGS.jit_compile)

    return {"plain": timed(lambda x: conv(up(x)), conv),
            "folded": timed(lambda x: fast_forms.upsample_conv(block, x), block.conv),
            "phases": timed(lambda x: fast_forms.upsample_then_conv(up, conv, x), conv)}


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one shard's thread
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from layers import blocks

    rows = []
    for spec in FLAGS.shapes:
        b, h, w, c_in, c_out = (int(v) for v in spec.split("x"))
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal((b, h, w, c_in)).astype(np.float32))
        upstream = tf.constant(rng.standard_normal((b, 2 * h, 2 * w, c_out)).astype(np.float32))
        up = tf.keras.layers.UpSampling2D(2)
        conv = tf.keras.layers.Conv2D(c_out, 3, padding="same")
        block = blocks.UpsampleConv(c_out, 3, None)  # the same pair as a tapeloop block
        block(x)
        conv(up(x))
        conv.bias.assign(rng.standard_normal(c_out).astype(np.float32))
        block.conv.set_weights(conv.get_weights())

        forms = _forms(x, upstream, up, conv, block)
        ref = forms["plain"]()
        for name in ("folded", "phases"):
            for a, r in zip(forms[name](), ref):
                scale = float(tf.reduce_max(tf.abs(r)))
                np.testing.assert_allclose(a.numpy(), r.numpy(), atol=1e-4 * scale)
        rows += common.form_rows(spec, forms, FLAGS.rounds)

    common.write_form_report(
        FLAGS.output_dir, "upsample_forms_xla" if FLAGS.jit_compile else "upsample_forms",
        "UpSampling2D + 3x3 Conv2D in three forms", "upsample_forms.py", rows,
        "small map x filters",
        "float32" + (", each form compiled by XLA" if FLAGS.jit_compile else ""),
        {"rounds": FLAGS.rounds, "jit_compile": FLAGS.jit_compile})


if __name__ == "__main__":
    common.run(main)
