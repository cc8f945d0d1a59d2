#!/usr/bin/env python3
"""Training throughput (examples/sec) of tapeloop's loop variants and Keras `fit`, side by side.

    python benchmarks/throughput.py                     # full run, ~10 minutes on 2 CPU cores
    python benchmarks/throughput.py --rounds=2 --steps=8 --variants=tf_function,keras_fit_spe32

Every variant trains the same model (`--model`, default `seed`) on the same
data at the same global batch. Each round times `--steps` steps of every
variant in turn (interleaved, so the machine's drift hits all alike); each
timed interval ends with the loss read on the host. The first call (trace +
compile + one step) is reported as compile time, then `--warmup_steps` more
steps run untimed. In every round each variant first runs one untimed
execution (32 steps for `steps_per_execution`/`steps_per_loop` 32): for Keras
that skips fit's per-call setup, for both loops the caches the other variants
just used. Writes results/throughput.{json,md} for the `seed` model and
results/throughput_MODEL.{json,md} for any other (`--report_name` overrides).

Thread settings are fixed when TensorFlow starts, once per process, so the
variants run in one worker process per setting ('default': TensorFlow's
choice, every op over all cores; 'per_core': one thread per op, as many ops
at once as cores; 'deterministic': default threads with op determinism on, as
--deterministic runs). The workers take turns, round by round: only one runs at a
time, and each round of every variant still falls in the same stretch of
time. Keras `fit` is measured under both settings and its best counts.
"""

from __future__ import annotations

import json
import os
import subprocess
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
flags.DEFINE_integer("batch_size", 256, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("steps", 64, "Timed steps per variant per round (a multiple of 32 keeps "
                     "every variant's loops whole).", lower_bound=1)
flags.DEFINE_integer("rounds", 7, "Timed rounds.", lower_bound=1)
flags.DEFINE_integer("warmup_steps", 96, "Untimed steps after compilation.", lower_bound=0)
flags.DEFINE_integer("num_cpu_devices", 2, "Logical CPU devices for the mirrored variants.", lower_bound=1)
flags.DEFINE_list("variants", [], "Run only these variants (default: all).")
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"), "Reports go here.")
flags.DEFINE_string("report_name", None, "Report file name without extension (default: "
                    "'throughput' for the seed model, 'throughput_MODEL' for another).")
flags.DEFINE_bool("peaks", True, "Measure the matmul peaks (a few seconds).")
flags.DEFINE_string("worker", None, "Internal: run as the worker of this thread setting.")

CORES = common.usable_cores()
# name -> (num_intra_threads, num_inter_threads); 0 is TensorFlow's choice (all cores).
THREADS = {"default": (0, 0), "per_core": (1, CORES),
           "deterministic": (0, 0)}  # default threads, op determinism on (--deterministic)
BF16 = "mixed_bfloat16"

# name -> how to build it. Ours: Trainer options; keras: compile() options. `threads`
# (default 'default') picks the worker; `steps` overrides --steps for very slow variants.
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
    "mixed_bfloat16_32": dict(steps_per_loop=32, precision=BF16),
    "mixed_bfloat16_device_32": dict(steps_per_loop=32, precision=BF16, data_on_device=True),
    "mixed_float16_32": dict(steps_per_loop=32, precision="mixed_float16", steps=8),
    "mirrored_2cpu_32": dict(steps_per_loop=32, replicas=2),
    "mirrored_2cpu_32_xla": dict(steps_per_loop=32, replicas=2, jit_compile=True),
    # One thread per op; the batch in CORES shards side by side (the CPU recipe).
    "sharded_device_32": dict(steps_per_loop=32, batch_shards=CORES, data_on_device=True,
                              threads="per_core"),
    "sharded_32": dict(steps_per_loop=32, batch_shards=CORES, threads="per_core"),
    # The recipe with the model in the ordinary layout, no images as channels: what the
    # grouped layout (benchmarks/NOTES.md section 10) gives.
    "sharded_device_32_ungrouped": dict(steps_per_loop=32, batch_shards=CORES,
                                        data_on_device=True, threads="per_core", ungrouped=True),
    "mixed_bfloat16_sharded_device_32": dict(steps_per_loop=32, batch_shards=CORES,
                                             data_on_device=True, precision=BF16,
                                             threads="per_core"),
    "mixed_bfloat16_sharded_device_32_ungrouped": dict(
        steps_per_loop=32, batch_shards=CORES, data_on_device=True, precision=BF16,
        threads="per_core", ungrouped=True),
    # The recipe with the model's layers as they read, no faster forms at all.
    "sharded_device_32_as_written": dict(steps_per_loop=32, batch_shards=CORES,
                                         data_on_device=True, threads="per_core",
                                         as_written=True),
    # The recipe without the sub-pixel upsample+conv: what that form gives the step.
    "sharded_device_32_no_subpixel": dict(steps_per_loop=32, batch_shards=CORES,
                                          data_on_device=True, threads="per_core",
                                          without=("subpixel",)),
    # The recipe without the few-filter convs transposed: what that form gives the step.
    "sharded_device_32_no_transposed": dict(steps_per_loop=32, batch_shards=CORES,
                                            data_on_device=True, threads="per_core",
                                            without=("few_filters_transposed",)),
    # What each half of the recipe gives alone.
    "sharded_device_32_default_threads": dict(steps_per_loop=32, batch_shards=CORES,
                                              data_on_device=True),
    "data_on_device_32_per_core": dict(steps_per_loop=32, data_on_device=True, threads="per_core"),
    # --deterministic: without XLA (what the runner did before the max-pool had a
    # deterministic form), and with XLA and that form (layers/fast_forms.max_pool).
    "deterministic_32": dict(steps_per_loop=32, threads="deterministic"),
    "deterministic_32_xla": dict(steps_per_loop=32, jit_compile=True, threads="deterministic"),
    # The same forms without op determinism: the max-pool by reshape against XLA's own.
    "steps_per_loop_32_xla_pool_by_reshape": dict(steps_per_loop=32, jit_compile=True,
                                                   pool_by_reshape=True),
    # What --augment costs in the recipe (drawn and applied inside the step).
    "sharded_device_32_flip": dict(steps_per_loop=32, batch_shards=CORES, data_on_device=True,
                                   threads="per_core", augment=("flip",)),
    "sharded_device_32_flip_crop": dict(steps_per_loop=32, batch_shards=CORES,
                                        data_on_device=True, threads="per_core",
                                        augment=("flip", "crop")),
}
KERAS = {
    "keras_fit_spe1": dict(steps_per_execution=1, jit_compile=False),
    "keras_fit_spe32": dict(steps_per_execution=32, jit_compile=False),
    "keras_fit_spe1_xla": dict(steps_per_execution=1, jit_compile=True),
    "keras_fit_spe32_xla": dict(steps_per_execution=32, jit_compile=True),
    "keras_fit_spe32_bfloat16": dict(steps_per_execution=32, jit_compile=False, precision=BF16),
    # Keras under the per-core thread setting, and its own way to put batch halves on
    # different cores: MirroredStrategy over logical CPU devices.
    "keras_fit_spe32_per_core": dict(steps_per_execution=32, jit_compile=False,
                                     threads="per_core"),
    "keras_fit_spe32_bfloat16_per_core": dict(steps_per_execution=32, jit_compile=False,
                                              precision=BF16, threads="per_core"),
    "keras_fit_spe32_mirrored_per_core": dict(steps_per_execution=32, jit_compile=False,
                                              replicas=CORES, threads="per_core"),
    "keras_fit_spe32_bfloat16_mirrored_per_core": dict(
        steps_per_execution=32, jit_compile=False, precision=BF16, replicas=CORES,
        threads="per_core"),
    # What the images-as-channels layout gives Keras fit (it trains the same model).
    "keras_fit_spe32_mirrored_per_core_ungrouped": dict(
        steps_per_execution=32, jit_compile=False, replicas=CORES, threads="per_core",
        ungrouped=True),
    # Keras' best configuration on the model's layers as they read: what a Keras user of
    # the same layers, without tapeloop's runner, trains.
    "keras_fit_spe32_mirrored_per_core_as_written": dict(
        steps_per_execution=32, jit_compile=False, replicas=CORES, threads="per_core",
        as_written=True),
}


def _gpu_variants() -> tuple[dict, dict]:
    """On a GPU machine, what train.py runs there by default: XLA and the GPU's mixed
    precision (bfloat16 from Ampere, float16 with loss scaling on Volta/Turing), the tf.data
    path or the data on the device, one GPU or all of them; and Keras fit the same way."""
    from core import distribute

    gpus = distribute.gpus()
    if not gpus:
        return {}, {}
    precision = distribute.default_precision(distribute.gpu_compute_capability())
    ours = dict(steps_per_loop=32, jit_compile=True, precision=precision)
    keras = dict(steps_per_execution=32, jit_compile=True, precision=precision)
    our_variants = {"gpu_defaults_32": ours, "gpu_defaults_device_32": {**ours,
                                                                        "data_on_device": True}}
    keras_variants = {"keras_fit_gpu_defaults_spe32": keras}
    if len(gpus) > 1:
        our_variants["gpu_defaults_mirrored_32"] = {**ours, "replicas": len(gpus)}
        keras_variants["keras_fit_gpu_defaults_mirrored_spe32"] = {**keras, "replicas": len(gpus)}
    return our_variants, keras_variants


_GPU_OURS, _GPU_KERAS = _gpu_variants()
OURS.update(_GPU_OURS)
KERAS.update(_GPU_KERAS)
VARIANTS = {**OURS, **KERAS}


def precision_of(spec: dict) -> str:
    return spec.get("precision", "float32")


def replicas_of(spec: dict, num_gpus: int) -> int:
    """Replicas of a variant: its mirrored variants run over every GPU where there are any."""
    replicas = spec.get("replicas", 1)
    return num_gpus if num_gpus and replicas > 1 else replicas


def cannot_run(spec: dict, batch: int, num_gpus: int) -> str | None:
    """Why a variant cannot run with this batch on this machine, or None."""
    replicas, shards = replicas_of(spec, num_gpus), spec.get("batch_shards", 1)
    if batch % (replicas * shards):
        over = f"{replicas} replica(s)" + (f" x {shards} shards" if shards > 1 else "")
        return (f"--batch_size={batch} does not divide evenly over {over}: use a multiple of "
                f"{replicas * shards}")
    return None


def _strategy(spec):
    import tensorflow as tf

    from core import distribute

    replicas = spec.get("replicas", 1)
    return (distribute.make_strategy("mirrored", replicas) if replicas > 1
            else tf.distribute.get_strategy())


class OurVariant:
    """A tapeloop Trainer; `run(n)` trains n steps and returns when the loss is on the host."""

    def __init__(self, spec, images, batch, model_name):
        import tensorflow as tf

        from core import data
        from core.trainer import Trainer

        strategy = _strategy(spec)
        precision = precision_of(spec)
        tf.keras.utils.set_random_seed(0)
        with strategy.scope():
            model = common.build_model(model_name, images.shape[1:], precision,
                                       spec.get("jit_compile", False),
                                       grouped=not spec.get("ungrouped"),
                                       as_written=spec.get("as_written", False),
                                       without=spec.get("without", ()),
                                       deterministic=spec.get("threads") == "deterministic"
                                       or spec.get("pool_by_reshape", False))
            self.trainer = Trainer(model, strategy, batch, 1e-3, precision,
                                   spec.get("jit_compile", False), spec.get("eager", False),
                                   data.DeviceData(images, batch, strategy.num_replicas_in_sync, 0)
                                   if spec.get("data_on_device") else None,
                                   xla_update=spec.get("xla_update"),
                                   batch_shards=spec.get("batch_shards", 1),
                                   augment=spec.get("augment", ()))
        self.iterator = None if spec.get("data_on_device") else iter(
            strategy.distribute_datasets_from_function(
                lambda ctx: data.train_dataset(images, batch, 0, 0, ctx)))
        self.loop = spec["steps_per_loop"]

    def compile(self) -> None:
        self.trainer.train_loop(self.iterator, 1)  # trace + compile + 1 step

    def run(self, steps: int) -> float:
        """As KerasVariant.run: one untimed call of the loop first (what fit's extra
        execution is to Keras), then `steps`; returns their seconds."""
        self.trainer.train_loop(self.iterator, min(self.loop, steps))
        start = time.perf_counter()
        while steps > 0:
            n = min(self.loop, steps)
            self.trainer.train_loop(self.iterator, n)  # returns a float: host sync
            steps -= n
        return time.perf_counter() - start


class KerasVariant:
    """The same model through compile()/fit(); timed from the first to the last batch end
    of each fit() call, so fit's per-call setup is not charged to it."""

    def __init__(self, spec, images, batch, model_name):
        import tensorflow as tf

        from core import data

        tf.keras.utils.set_random_seed(0)
        with _strategy(spec).scope():
            self.model = common.build_model(model_name, images.shape[1:], precision_of(spec),
                                            spec["jit_compile"], grouped=not spec.get("ungrouped"),
                                            as_written=spec.get("as_written", False))
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

    def compile(self) -> None:
        self.run(1)

    def run(self, steps: int) -> float | None:
        """Runs one extra execution first; returns the seconds of the `steps` after it."""
        self.times = []
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps + self.spe, verbose=0,
                       callbacks=[self.clock])
        return self.times[-1] - self.times[0]


# ------------------------------------------------------------------ worker side
def _send(message: dict) -> None:
    """A protocol line on stdout (everything else a worker prints goes to stderr)."""
    sys.__stdout__.write("@@" + json.dumps(message) + "\n")
    sys.__stdout__.flush()


def worker_main(setting: str, names: list[str]) -> None:
    """Builds and compiles `names` under one thread setting, then times one round of all
    of them per 'round' line on stdin, until 'exit'."""
    sys.stdout = sys.stderr  # keep stdout for the protocol
    from core import data, distribute, signals

    distribute.set_cpu_threads(*THREADS[setting])
    if setting == "deterministic":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    distribute.setup_logical_cpus(FLAGS.num_cpu_devices)
    images = data.load_split(FLAGS.train_split, FLAGS.dataset, FLAGS.data_dir).images
    batch = FLAGS.batch_size
    variants, compile_s = {}, {}
    for name in names:
        print(f"[{setting}] building {name}...", flush=True)
        spec = VARIANTS[name]
        start = time.perf_counter()
        variant = (KerasVariant if name in KERAS else OurVariant)(spec, images, batch, FLAGS.model)
        variant.compile()
        compile_s[name] = time.perf_counter() - start
        variant.run(min(FLAGS.warmup_steps, 4 * spec.get("steps", FLAGS.warmup_steps)))
        variants[name] = variant
    _send({"compile_seconds": compile_s})
    for line in sys.stdin:
        if line.strip() != "round":
            break
        rates, step_times = {}, {}
        for name, variant in variants.items():
            steps = min(FLAGS.steps, VARIANTS[name].get("steps", FLAGS.steps))
            seconds = variant.run(steps)
            rates[name] = steps * batch / seconds
            step_times[name] = seconds / steps
        _send({"rates": rates, "step_times": step_times})
    # Exit at once: interpreter shutdown can hang on the distributed iterators' threads.
    # exit_now removes AutoGraph's temporary files first, which os._exit alone leaves.
    sys.__stdout__.flush()
    signals.exit_now(0)


# ------------------------------------------------------------------ driver side
class Worker:
    """A worker process for one thread setting, driven over its stdin/stdout."""

    def __init__(self, setting: str, names: list[str]):
        self.setting = setting
        argv = [sys.executable, os.path.abspath(__file__), f"--worker={setting}",
                f"--variants={','.join(names)}"]
        for name in ("model", "dataset", "data_dir", "train_split", "batch_size", "steps",
                     "warmup_steps", "num_cpu_devices"):
            value = FLAGS[name].value
            if value is not None:
                argv.append(f"--{name}={value}")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        code = self.proc.wait()
        raise common.Failed(f"the {self.setting!r} worker exited with code {code} (its error "
                            "is above)", code)

    def request_round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def main(argv):
    del argv
    chosen = dict(VARIANTS)
    if FLAGS.variants:
        unknown = set(FLAGS.variants) - set(chosen)
        if unknown:
            raise app.UsageError(f"unknown variants {sorted(unknown)}: choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in FLAGS.variants}
    if FLAGS.worker:
        worker_main(FLAGS.worker, list(chosen))
        return
    import tensorflow as tf

    num_gpus = len(tf.config.list_physical_devices("GPU"))
    if not FLAGS.variants and num_gpus:
        # Shards and one thread per op are a CPU recipe: on GPUs they only add rounds.
        chosen = {k: v for k, v in chosen.items()
                  if v.get("threads") != "per_core" and "batch_shards" not in v}
    skipped = {name: why for name, spec in chosen.items()
               if (why := cannot_run(spec, FLAGS.batch_size, num_gpus))}
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    chosen = {k: v for k, v in chosen.items() if k not in skipped}
    if not chosen:
        raise app.UsageError("no variant can run: " + "; ".join(f"{k}: {v}"
                                                                for k, v in skipped.items()))

    # The machine context and the matmul peaks, measured with every core (default threads).
    context = common.machine_context(with_peaks=FLAGS.peaks)
    context["thread_settings"] = {name: {"num_intra_threads": intra, "num_inter_threads": inter}
                                  for name, (intra, inter) in THREADS.items()}
    by_setting: dict[str, list[str]] = {}
    for name, spec in chosen.items():
        by_setting.setdefault(spec.get("threads", "default"), []).append(name)
    workers, compile_s = [], {}
    try:
        for setting, names in by_setting.items():  # one at a time: compile times stay clean
            print(f"starting the {setting!r} worker: {', '.join(names)}", flush=True)
            worker = Worker(setting, names)
            workers.append(worker)
            compile_s.update(worker.receive()["compile_seconds"])
        rates = {name: [] for name in chosen}
        step_times = {name: [] for name in chosen}
        for r in range(FLAGS.rounds):
            for worker in workers:
                measured = worker.request_round()
                for name, rate in measured["rates"].items():
                    rates[name].append(rate)
                    step_times[name].append(measured["step_times"][name])
            print(f"round {r + 1}/{FLAGS.rounds}: " + ", ".join(
                f"{n} {rates[n][-1]:,.0f}" for n in chosen), flush=True)
        report(context, chosen, rates, step_times, compile_s, skipped)
    finally:
        for worker in workers:
            worker.close()


def report(context, chosen, rates, step_times, compile_s, skipped) -> None:
    from core import data
    from layers.autoencoders import build_autoencoder

    image_shape = data.load_split(FLAGS.train_split, FLAGS.dataset, FLAGS.data_dir).image_shape
    model = build_autoencoder(FLAGS.model, image_shape)
    flops = common.train_flops_per_example(model, image_shape)
    batch = FLAGS.batch_size
    results = {}
    for name, spec in chosen.items():
        summary = common.summarize(rates[name], step_times[name])
        summary["compile_seconds"] = compile_s[name]
        summary["precision"] = precision_of(spec)
        summary["threads"] = spec.get("threads", "default")
        summary["loop"] = "keras_fit" if name in KERAS else "tapeloop"
        peak = context.get("matmul_peak_flops", {}).get(
            "bfloat16" if "bfloat16" in summary["precision"] else "float32")
        summary["flops_per_sec"] = summary["median"] * flops
        summary["fraction_of_peak"] = summary["flops_per_sec"] / peak if peak else None
        results[name] = summary

    headline = {}
    for precision in ("float32", BF16, "mixed_float16"):
        ours = {n: r for n, r in results.items()  # augmented variants do other work, and
                # the max-pool by reshape without --deterministic is no setting of train.py
                if r["loop"] == "tapeloop" and r["precision"] == precision
                and not OURS.get(n, {}).get("augment")
                and not OURS.get(n, {}).get("pool_by_reshape")}
        theirs = {n: r for n, r in results.items()
                  if r["loop"] == "keras_fit" and r["precision"] == precision}
        if ours and theirs:
            best_ours = max(ours, key=lambda n: ours[n]["median"])
            best_theirs = max(theirs, key=lambda n: theirs[n]["median"])
            headline[precision] = {"ours": best_ours, "keras": best_theirs,
                                   "ratio": ours[best_ours]["median"] / theirs[best_theirs]["median"]}
            written = {n: r for n, r in theirs.items() if n.endswith("_as_written")}
            if written:  # against Keras on the layers as they read, beside the strict one
                best_written = max(written, key=lambda n: written[n]["median"])
                headline[precision].update(
                    keras_as_written=best_written,
                    ratio_as_written=ours[best_ours]["median"] / written[best_written]["median"])
    payload = {"context": context, "config": {
        "model": FLAGS.model, "dataset": FLAGS.dataset, "train_split": FLAGS.train_split,
        "batch_size": batch, "steps": FLAGS.steps, "rounds": FLAGS.rounds,
        "warmup_steps": FLAGS.warmup_steps, "train_flops_per_example": flops},
        "results": results, "headline": headline, "skipped": skipped}
    intra, inter = THREADS["per_core"]
    lines = ["# Training throughput\n", common.context_markdown(payload["context"]),
             f"Model `{FLAGS.model}` ({flops / 1e6:.2f} MFLOP per training example, "
             "benchmarks/NOTES.md says how they are counted), "
             f"{FLAGS.dataset} {FLAGS.train_split}, global batch {batch}; {FLAGS.rounds} rounds "
             f"of {FLAGS.steps} steps per variant, interleaved, each after one untimed execution "
             "of the variant's steps per call. Threads: `default` is "
             f"TensorFlow's choice, `per_core` is --num_intra_threads={intra} "
             f"--num_inter_threads={inter}; `sharded` variants split the batch into "
             f"{CORES} shards (--batch_shards={CORES}).\n"]
    for precision, h in headline.items():
        lines.append(f"**{precision}: best tapeloop `{h['ours']}` / best Keras fit `{h['keras']}` "
                     f"= {h['ratio']:.2f}x**\n")
        if "ratio_as_written" in h:
            lines.append(f"{precision}, against Keras fit on the model's layers as they read "
                         f"(no faster forms), `{h['keras_as_written']}`: "
                         f"{h['ratio_as_written']:.2f}x\n")
    lines.append("| variant | precision | threads | examples/s (median) | stderr | jitter "
                 "| step ms p50 / p90 | compile s | % of matmul peak |")
    lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in sorted(results.items(), key=lambda kv: -kv[1]["median"]):
        pct = f"{100 * r['fraction_of_peak']:.1f}" if r["fraction_of_peak"] else "-"
        lines.append(f"| `{name}` | {r['precision']} | {r['threads']} | {r['median']:,.0f} | "
                     f"{r['stderr']:,.0f} | {r['jitter']:,.0f} | {r['step_ms_p50']:.1f} / "
                     f"{r['step_ms_p90']:.1f} | {r['compile_seconds']:.1f} | {pct} |")
    for name, why in skipped.items():
        lines.append(f"\nSkipped `{name}`: {why}.")
    name = FLAGS.report_name or ("throughput" if FLAGS.model == "seed" else f"throughput_{FLAGS.model}")
    common.write_report(FLAGS.output_dir, name, payload, lines)


if __name__ == "__main__":
    common.run(main)
