#!/usr/bin/env python3
"""The tutorial's recipe as one process: the `seed` model in Keras `fit`, batch 64,
Adam(1e-3), the held-out BCE after every epoch.

    python benchmarks/tutorial_recipe.py --data_dir=../shared/data/mnist \
        --train_split='test[:8000]' --eval_split='test[8000:]' --seed=0

Prints one line per epoch, `epoch N | held-out bce X`, as it goes: time_to_quality.py
runs it as the baseline and times the whole process, from launch to the line that
reaches the target. The model computes in the forms train.py would choose
(`common.build_model`), so the comparison is of recipes, not of computation forms.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "A dataset tapeloop reads.")
flags.DEFINE_string("data_dir", None, "Its files (MNIST: the IDX .gz files or mnist.npz).")
flags.DEFINE_string("train_split", "test[:8000]", "Training split.")
flags.DEFINE_string("eval_split", "test[8000:]", "Held-out split.")
flags.DEFINE_integer("seed", 0, "Weight initialisation and shuffling.")
flags.DEFINE_float("target", 0.14, "Stop once the held-out BCE is at or below this.")
flags.DEFINE_integer("max_epochs", 30, "Stop after this many epochs.", lower_bound=1)


def main(argv):
    del argv
    import tensorflow as tf

    from core import data

    tf.keras.utils.set_random_seed(FLAGS.seed)
    x = data.to_float(data.load_split(FLAGS.train_split, FLAGS.dataset, FLAGS.data_dir).images)
    y = data.to_float(data.load_split(FLAGS.eval_split, FLAGS.dataset, FLAGS.data_dir).images)
    x, y = x.numpy(), y.numpy()
    model = common.build_model("seed", x.shape[1:])
    model.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                  optimizer=tf.keras.optimizers.Adam(1e-3))

    class HeldOut(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            loss = float(model.evaluate(y, y, batch_size=500, verbose=0))
            print(f"epoch {epoch + 1} | held-out bce {loss:.4f}", flush=True)
            if loss <= FLAGS.target:
                model.stop_training = True

    model.fit(x, x, epochs=FLAGS.max_epochs, batch_size=64, shuffle=True, verbose=0,
              callbacks=[HeldOut()])


if __name__ == "__main__":
    common.run(main)
