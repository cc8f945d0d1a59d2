#!/usr/bin/env python3
"""Wall-clock seconds until a held-out BCE target: tapeloop's best recipe vs the tutorial's.

    python benchmarks/time_to_quality.py --data_dir=../shared/data/mnist   # real MNIST split
    python benchmarks/time_to_quality.py                                   # fontdigits

The clock starts before the model is built (compilation included) and is paused
while the held-out loss is computed, for both contenders alike. The tutorial's
recipe is Keras `fit` with batch 64 and Adam(1e-3) on the same `seed` model,
evaluated after every epoch; ours is tapeloop's Trainer with its own batch,
learning rate and data on the device, evaluated every `--ours_eval_every` steps.
Writes results/time_to_quality.{json,md} and the curve as a PNG.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Real MNIST files: trains on test[:8000], evaluates on "
                    "test[8000:]. Without it: fontdigits train/test.")
flags.DEFINE_float("target", 0.14, "Held-out BCE to reach.")
flags.DEFINE_float("max_seconds", 120.0, "Give up after this much training time.")
flags.DEFINE_integer("ours_batch_size", 32, "Our recipe's batch.")
flags.DEFINE_float("ours_learning_rate", 5e-3, "Our recipe's Adam learning rate.")
flags.DEFINE_integer("ours_eval_every", 62, "Our recipe's steps between held-out evaluations.")
flags.DEFINE_integer("repeats", 1, "Runs of each recipe (interleaved); the median is reported.")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")


class Clock:
    """Training time: runs from construction, paused inside `paused()`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.paused_total = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused_total

    def pause(self):
        clock = self

        class _Pause:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.paused_total += time.perf_counter() - self.t

        return _Pause()


def run_ours(train, held_out, target, max_seconds):
    import tensorflow as tf

    from core import data
    from core.trainer import Trainer
    from layers.autoencoders import build_autoencoder

    clock = Clock()
    strategy = tf.distribute.get_strategy()
    tf.keras.utils.set_random_seed(0)
    model = build_autoencoder("seed", train.shape[1:])
    trainer = Trainer(model, strategy, FLAGS.ours_batch_size, FLAGS.ours_learning_rate,
                      device_data=data.DeviceData(train, FLAGS.ours_batch_size,
                                                  strategy.num_replicas_in_sync, 0))
    eval_ds = strategy.distribute_datasets_from_function(
        lambda ctx: data.eval_dataset(held_out, 500, ctx))
    curve = []
    while clock.seconds() < max_seconds:
        trainer.train_loop(None, FLAGS.ours_eval_every)
        seconds = clock.seconds()
        with clock.pause():
            loss = trainer.evaluate(eval_ds)["bce"]
        curve.append((seconds, loss))
        if loss <= target:
            break
    return curve


def run_tutorial(train, held_out, target, max_seconds):
    import tensorflow as tf

    from core import data
    from layers.autoencoders import build_autoencoder

    clock = Clock()
    tf.keras.utils.set_random_seed(0)
    model = build_autoencoder("seed", train.shape[1:])
    model.compile(loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                  optimizer=tf.keras.optimizers.Adam(1e-3))
    x = data.to_float(train).numpy()
    y = data.to_float(held_out).numpy()
    curve = []

    class Evaluate(tf.keras.callbacks.Callback):
        def on_epoch_end(cb, epoch, logs=None):  # noqa: N805
            seconds = clock.seconds()
            with clock.pause():
                loss = float(model.evaluate(y, y, batch_size=500, verbose=0))
            curve.append((seconds, loss))
            if loss <= target or clock.seconds() > max_seconds:
                model.stop_training = True

    model.fit(x, x, epochs=1000, batch_size=64, shuffle=True, verbose=0, callbacks=[Evaluate()])
    return curve


def first_crossing(curve, target):
    for seconds, loss in curve:
        if loss <= target:
            return seconds
    return None


def main(argv):
    del argv
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core import data

    if FLAGS.data_dir:
        dataset, train_split, eval_split = "mnist", "test[:8000]", "test[8000:]"
    else:
        dataset, train_split, eval_split = "fontdigits", "train", "test"
    train = data.load_split(train_split, dataset, FLAGS.data_dir).images
    held_out = data.load_split(eval_split, dataset, FLAGS.data_dir).images
    context = common.machine_context(with_peaks=False)
    runs = {"tapeloop": [], "tutorial_keras_fit": []}
    for _ in range(FLAGS.repeats):
        runs["tapeloop"].append(run_ours(train, held_out, FLAGS.target, FLAGS.max_seconds))
        runs["tutorial_keras_fit"].append(run_tutorial(train, held_out, FLAGS.target, FLAGS.max_seconds))
    results = {}
    for name, curves in runs.items():
        times = [first_crossing(c, FLAGS.target) for c in curves]
        reached = [t for t in times if t is not None]
        results[name] = {"seconds_to_target": statistics.median(reached) if reached else None,
                         "all_seconds": times, "curves": curves}
    ours, theirs = (results["tapeloop"]["seconds_to_target"],
                    results["tutorial_keras_fit"]["seconds_to_target"])
    ratio = theirs / ours if ours and theirs else None
    recipe = (f"batch {FLAGS.ours_batch_size}, Adam {FLAGS.ours_learning_rate:g}, data on device, "
              f"held-out loss every {FLAGS.ours_eval_every} steps")
    payload = {"context": context, "config": {
        "dataset": dataset, "train_split": train_split, "eval_split": eval_split,
        "target_bce": FLAGS.target, "ours": recipe,
        "tutorial": "Keras fit, batch 64, Adam 1e-3, held-out loss every epoch"},
        "results": results, "speedup": ratio}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, label in (("tutorial_keras_fit", "tutorial recipe (Keras fit, batch 64, Adam 1e-3)"),
                        ("tapeloop", f"tapeloop ({recipe})")):
        seconds, losses = zip(*results[name]["curves"][0])
        ax.plot(seconds, losses, marker="o", markersize=3, label=label)
    ax.axhline(FLAGS.target, color="gray", linestyle="--", label=f"target {FLAGS.target}")
    ax.set_xlabel("training seconds (compilation included, evaluation excluded)")
    ax.set_ylabel("held-out BCE")
    ax.set_ylim(FLAGS.target * 0.9, 0.3)
    ax.set_title(f"Time to quality: seed model, {dataset} {train_split} -> {eval_split}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    png = os.path.join(FLAGS.output_dir, "time_to_quality.png")
    fig.savefig(png, dpi=110)

    def fmt(s):
        return f"{s:.1f}" if s is not None else "not reached"

    lines = ["# Time to quality\n", common.context_markdown(context),
             f"Seed model, {dataset} `{train_split}` -> held-out `{eval_split}`, target BCE "
             f"{FLAGS.target}. Median of {FLAGS.repeats} run(s).\n",
             "| recipe | seconds to target | final held-out BCE |", "| --- | ---: | ---: |",
             f"| tutorial: Keras fit, batch 64, Adam 1e-3 | {fmt(theirs)} | "
             f"{results['tutorial_keras_fit']['curves'][0][-1][1]:.4f} |",
             f"| tapeloop: {recipe} | {fmt(ours)} | {results['tapeloop']['curves'][0][-1][1]:.4f} |",
             "", f"Speed-up: {ratio:.2f}x" if ratio else "Speed-up: n/a",
             f"\n![curve]({os.path.basename(png)})"]
    common.write_report(FLAGS.output_dir, "time_to_quality", payload, lines)
    print(f"wrote {png}")


if __name__ == "__main__":
    app.run(main)
