#!/usr/bin/env python3
"""Training throughput (examples/sec) of tapeloop's loop variants and Keras `fit`, in one process.

    python benchmarks/throughput.py                     # full run, ~10 minutes on 2 CPU cores
    python benchmarks/throughput.py --rounds=2 --steps=8 --variants=tf_function,keras_fit_spe32

Every variant trains the same model (`--model`, default `seed`) on the same
data at the same global batch. Each round times `--steps` steps of every
variant in turn (interleaved, so the machine's drift hits all alike); each
timed interval ends with the loss read on the host. The first call (trace +
compile + one step) is reported as compile time, then `--warmup_steps` more
steps run untimed. Writes results/throughput.{json,md}.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "seed", "Registered model.")
flags.DEFINE_string("dataset", "fontdigits", "Dataset of the training split (same for every variant).")
flags.DEFINE_string("data_dir", None, "For mnist/fashion_mnist.")
flags.DEFINE_string("train_split", "train", "Training split.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("steps", 64, "Timed steps per variant per round (a multiple of 32 keeps "
                     "every variant's loops whole).")
flags.DEFINE_integer("rounds", 7, "Timed rounds.")
flags.DEFINE_integer("warmup_steps", 96, "Untimed steps after compilation.")
flags.DEFINE_integer("num_cpu_devices", 2, "Logical CPU devices for the mirrored variants.")
flags.DEFINE_integer("num_intra_threads", 0, "Threads per op (0: TensorFlow's choice).")
flags.DEFINE_integer("num_inter_threads", 0, "Ops run at once (0: TensorFlow's choice).")
flags.DEFINE_list("variants", [], "Run only these variants (default: all).")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")
flags.DEFINE_bool("peaks", True, "Measure the matmul peaks (a few seconds).")

# name -> how to build it. Ours: Trainer options; keras: compile() options.
OURS = {
    "eager": dict(eager=True, steps_per_loop=1),
    "tf_function": dict(steps_per_loop=1),
    "tf_function_xla": dict(steps_per_loop=1, jit_compile=True),
    "steps_per_loop_8": dict(steps_per_loop=8),
    "steps_per_loop_32": dict(steps_per_loop=32),
    "steps_per_loop_32_xla": dict(steps_per_loop=32, jit_compile=True),
    # The split that MirroredStrategy needs (update outside XLA), on one replica.
    "steps_per_loop_32_xla_split": dict(steps_per_loop=32, jit_compile=True, xla_update=False),
    "data_on_device_32": dict(steps_per_loop=32, data_on_device=True),
    "sharded_2_32": dict(steps_per_loop=32, batch_shards=2),
    "sharded_2_device_32": dict(steps_per_loop=32, batch_shards=2, data_on_device=True),
    "sharded_4_device_32": dict(steps_per_loop=32, batch_shards=4, data_on_device=True),
    "mixed_bfloat16_sharded_2_device_32": dict(steps_per_loop=32, batch_shards=2, data_on_device=True, precision="mixed_bfloat16"),
    "mixed_bfloat16_32": dict(steps_per_loop=32, precision="mixed_bfloat16"),
    "mixed_bfloat16_device_32": dict(steps_per_loop=32, precision="mixed_bfloat16", data_on_device=True),
    "mixed_float16_32": dict(steps_per_loop=32, precision="mixed_float16"),
    "mirrored_2cpu_32": dict(steps_per_loop=32, replicas=2),
    "mirrored_2cpu_32_xla": dict(steps_per_loop=32, replicas=2, jit_compile=True),
}
KERAS = {
    "keras_fit_spe1": dict(steps_per_execution=1, jit_compile=False),
    "keras_fit_spe32": dict(steps_per_execution=32, jit_compile=False),
    "keras_fit_spe1_xla": dict(steps_per_execution=1, jit_compile=True),
    "keras_fit_spe32_xla": dict(steps_per_execution=32, jit_compile=True),
    "keras_fit_spe32_bfloat16": dict(steps_per_execution=32, jit_compile=False,
                                     precision="mixed_bfloat16"),
}


def precision_of(spec: dict) -> str:
    return spec.get("precision", "float32")


class OurVariant:
    """A tapeloop Trainer; `run(n)` trains n steps and returns when the loss is on the host."""

    def __init__(self, spec, images, batch, model_name):
        import tensorflow as tf

        from core import data, distribute
        from core.trainer import Trainer
        from layers.autoencoders import build_autoencoder

        replicas = spec.get("replicas", 1)
        strategy = (distribute.make_strategy("mirrored", replicas) if replicas > 1
                    else tf.distribute.get_strategy())
        precision = precision_of(spec)
        tf.keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_autoencoder(model_name, images.shape[1:], precision)
            self.trainer = Trainer(model, strategy, batch, 1e-3, precision,
                                   spec.get("jit_compile", False), spec.get("eager", False),
                                   images if spec.get("data_on_device") else None,
                                   xla_update=spec.get("xla_update"),
                                   batch_shards=spec.get("batch_shards", 1))
        self.iterator = None if spec.get("data_on_device") else iter(
            strategy.distribute_datasets_from_function(
                lambda ctx: data.train_dataset(images, batch, 0, 0, ctx)))
        self.loop = spec["steps_per_loop"]

    def run(self, steps: int) -> None:
        while steps > 0:
            n = min(self.loop, steps)
            self.trainer.train_loop(self.iterator, n)  # returns a float: host sync
            steps -= n


class KerasVariant:
    """The same model through compile()/fit(); timed from the first to the last batch end
    of each fit() call, so fit's per-call setup is not charged to it."""

    def __init__(self, spec, images, batch, model_name):
        import tensorflow as tf

        from core import data
        from layers.autoencoders import build_autoencoder

        tf.keras.utils.set_random_seed(0)
        self.model = build_autoencoder(model_name, images.shape[1:], precision_of(spec))
        self.model.compile(optimizer=tf.keras.optimizers.Adam(1e-3),
                           loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                           steps_per_execution=spec["steps_per_execution"],
                           jit_compile=spec["jit_compile"])
        self.dataset = data.train_dataset(images, batch, 0).map(lambda x: (x, x))
        self.spe = spec["steps_per_execution"]
        self.times = []

        class Clock(tf.keras.callbacks.Callback):
            def on_train_batch_end(cb, batch_index, logs=None):  # noqa: N805
                float(logs["loss"])  # host sync
                self.times.append(time.perf_counter())

        self.clock = Clock()

    def run(self, steps: int) -> float | None:
        """Runs one extra execution first; returns the seconds of the `steps` after it."""
        self.times = []
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps + self.spe, verbose=0,
                       callbacks=[self.clock])
        return self.times[-1] - self.times[0]


def main(argv):
    del argv
    from core import data, distribute
    from layers.autoencoders import build_autoencoder

    distribute.set_cpu_threads(FLAGS.num_intra_threads, FLAGS.num_inter_threads)
    distribute.setup_logical_cpus(FLAGS.num_cpu_devices)
    context = common.machine_context(with_peaks=FLAGS.peaks)
    images = data.load_split(FLAGS.train_split, FLAGS.dataset, FLAGS.data_dir).images
    chosen = {**OURS, **KERAS}
    if FLAGS.variants:
        unknown = set(FLAGS.variants) - set(chosen)
        if unknown:
            raise app.UsageError(f"unknown variants {sorted(unknown)}: choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in FLAGS.variants}
    batch = FLAGS.batch_size
    variants, compile_s = {}, {}
    for name, spec in chosen.items():
        print(f"building {name}...", flush=True)
        cls = KerasVariant if name in KERAS else OurVariant
        start = time.perf_counter()
        variant = cls(spec, images, batch, FLAGS.model)
        if cls is OurVariant:
            variant.trainer.train_loop(variant.iterator, 1)  # trace + compile + 1 step
            compile_s[name] = time.perf_counter() - start
            variant.run(FLAGS.warmup_steps)
        else:
            variant.run(FLAGS.warmup_steps)  # includes trace + compile
            compile_s[name] = time.perf_counter() - start
        variants[name] = variant
    rates = {name: [] for name in variants}
    step_times = {name: [] for name in variants}
    for r in range(FLAGS.rounds):
        for name, variant in variants.items():
            start = time.perf_counter()
            measured = variant.run(FLAGS.steps)
            seconds = measured if measured is not None else time.perf_counter() - start
            rates[name].append(FLAGS.steps * batch / seconds)
            step_times[name].append(seconds / FLAGS.steps)
        print(f"round {r + 1}/{FLAGS.rounds}: " + ", ".join(
            f"{n} {rates[n][-1]:,.0f}" for n in variants), flush=True)

    model = build_autoencoder(FLAGS.model, images.shape[1:])
    flops = 3 * common.conv_flops_per_example(model, images.shape[1:])
    results = {}
    for name in variants:
        spec = chosen[name]
        summary = common.summarize(rates[name], step_times[name])
        summary["compile_seconds"] = compile_s[name]
        summary["precision"] = precision_of(spec)
        summary["loop"] = "keras_fit" if name in KERAS else "tapeloop"
        peak = context.get("matmul_peak_flops", {}).get(
            "bfloat16" if "bfloat16" in summary["precision"] else "float32")
        summary["flops_per_sec"] = summary["median"] * flops
        summary["fraction_of_peak"] = summary["flops_per_sec"] / peak if peak else None
        results[name] = summary

    headline = {}
    for precision in ("float32", "mixed_bfloat16"):
        ours = {n: r for n, r in results.items()
                if r["loop"] == "tapeloop" and r["precision"] == precision}
        theirs = {n: r for n, r in results.items()
                  if r["loop"] == "keras_fit" and r["precision"] == precision}
        if ours and theirs:
            best_ours = max(ours, key=lambda n: ours[n]["median"])
            best_theirs = max(theirs, key=lambda n: theirs[n]["median"])
            headline[precision] = {"ours": best_ours, "keras": best_theirs,
                                   "ratio": ours[best_ours]["median"] / theirs[best_theirs]["median"]}
    payload = {"context": context, "config": {
        "model": FLAGS.model, "dataset": FLAGS.dataset, "train_split": FLAGS.train_split,
        "batch_size": batch, "steps": FLAGS.steps, "rounds": FLAGS.rounds,
        "warmup_steps": FLAGS.warmup_steps, "train_flops_per_example": flops},
        "results": results, "headline": headline}
    lines = ["# Training throughput\n", common.context_markdown(payload["context"]),
             f"Model `{FLAGS.model}` ({flops / 1e6:.2f} MFLOP per training example), "
             f"{FLAGS.dataset} {FLAGS.train_split}, global batch {batch}; {FLAGS.rounds} rounds "
             f"of {FLAGS.steps} steps per variant, interleaved.\n"]
    for precision, h in headline.items():
        lines.append(f"**{precision}: best tapeloop `{h['ours']}` / best Keras fit `{h['keras']}` "
                     f"= {h['ratio']:.2f}x**\n")
    lines.append("| variant | precision | examples/s (median) | stderr | jitter | step ms p50 / p90 "
                 "| compile s | % of matmul peak |")
    lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["median"]):
        pct = f"{100 * r['fraction_of_peak']:.1f}" if r["fraction_of_peak"] else "-"
        lines.append(f"| `{name}` | {r['precision']} | {r['median']:,.0f} | {r['stderr']:,.0f} | "
                     f"{r['jitter']:,.0f} | {r['step_ms_p50']:.1f} / {r['step_ms_p90']:.1f} | "
                     f"{r['compile_seconds']:.1f} | {pct} |")
    common.write_report(FLAGS.output_dir, "throughput", payload, lines)


if __name__ == "__main__":
    app.run(main)
