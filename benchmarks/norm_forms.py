#!/usr/bin/env python3
"""The resnet's GroupNorm then SiLU, in two forms.

    python benchmarks/norm_forms.py                  # ~1 minute

- plain: Keras' `GroupNormalization` then `tf.nn.silu`, differentiated by the tape;
- `fast_forms.norm_silu`: the same function with a hand-written gradient, its sums taken
  over H and W first (contiguous rows), then over each group's channels
  (layers/fast_forms.py).

Each shape is one shard's activations at one of the resnet's stages (16 images: a batch
of 32 in the CPU recipe's 2 shards), timed forward and backward (the gradients to the
input, gamma and beta) with one thread, interleaved round by round. The script first
checks that the forms agree (output and every gradient within 1e-5 of their scale);
otherwise the timing would mean nothing.

Writes results/norm_forms.{json,md}: per shape and form, the median ms with its range
and the speed-up over the plain pair.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["16x64x64x32", "16x32x32x64", "16x16x16x64", "16x8x8x64"],
                  "BxHxWxC: one shard's activations at each stage of the default resnet.")
flags.DEFINE_integer("groups", 8, "GroupNorm's groups (the resnet's: gcd(channels, 8)).", lower_bound=1)
flags.DEFINE_integer("rounds", 11, "Timed calls per form, interleaved (median and range).", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one shard's thread
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from layers import fast_forms

    rows = []
    for spec in FLAGS.shapes:
        shape = tuple(int(v) for v in spec.split("x"))
        norm = tf.keras.layers.GroupNormalization(FLAGS.groups)
        norm.build((None, *shape[1:]))
        rng = np.random.default_rng(0)
        norm.gamma.assign(1 + 0.3 * rng.standard_normal(shape[-1]).astype(np.float32))
        norm.beta.assign(0.3 * rng.standard_normal(shape[-1]).astype(np.float32))
        x = tf.constant(0.5 + 2 * rng.standard_normal(shape).astype(np.float32))
        upstream = tf.constant(rng.standard_normal(shape).astype(np.float32))

        def both(fn, x=x, upstream=upstream, norm=norm):
            def run():
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    z = fn(norm, x)
                return (z, *tape.gradient(z, [x, norm.gamma, norm.beta],
                                          output_gradients=upstream))
            return tf.function(run)

        forms = {"plain": both(lambda norm, x: tf.nn.silu(norm(x))),
                 "fast_forms.norm_silu": both(fast_forms.norm_silu)}
        ref, ours = (f() for f in forms.values())
        for a, b in zip(ours, ref):
            scale = float(tf.reduce_max(tf.abs(b)))
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5 * scale)
        rows += common.form_rows(spec, forms, FLAGS.rounds)

    common.write_form_report(FLAGS.output_dir, "norm_forms", "GroupNorm + SiLU in two forms",
                             "norm_forms.py", rows, "activations",
                             f"float32, {FLAGS.groups} groups",
                             {"rounds": FLAGS.rounds, "groups": FLAGS.groups})


if __name__ == "__main__":
    common.run(main)
