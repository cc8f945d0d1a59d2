#!/usr/bin/env python3
"""On a GPU machine, run this first: every GPU path of the loop, checked and timed.

    python benchmarks/gpu_check.py                 # a few minutes with GPUs; seconds without
    python benchmarks/gpu_check.py --steps=100 --output_dir=/tmp/gpu_check

With GPUs, each path trains the `seed` model on the built-in fontdigits data for
`--steps` steps from the same weights: one GPU (float32, XLA, bfloat16 where the GPU
computes it, float16 with loss scaling, data on the device), all GPUs mirrored (with
XLA), and deterministic with XLA last (op determinism cannot be turned off once on;
the seed model's max-pool by reshape is what lets XLA compile it). For each
it records:
  - the ops the placer put on the CPU, from TensorFlow's placement log of the first
    loop call (structural ops such as arguments and constants excepted): there should
    be none;
  - the last loop's mean loss, which must agree with the float32 path's (5%);
  - steps/s over the timed loops, and the same model and batch through Keras `fit`
    (steps_per_execution=32, XLA as the path; under MirroredStrategy Keras' own "auto")
    on the same devices, as a ratio.

Everywhere, GPUs or not, it runs what a CPU can check: the kernel-registry walk of
every path's traced loop (core/gpu_kernels.py) and the decisions the runner makes on
GPUs (precision by compute capability, XLA, --deterministic with max-pooling, the
multi-worker all-reduce). Without a GPU it says so and exits 0.

`--simulate_on_cpu` runs the GPU paths on logical CPU devices instead: it checks this
script, not a GPU (the tests run it so). Writes results/gpu_check.{json,md}.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 300, "Training steps per path.", lower_bound=1)
flags.DEFINE_integer("steps_per_loop", 50, "Steps per compiled loop call.", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Global batch (divided over the GPUs when mirrored).", lower_bound=1)
flags.DEFINE_bool("simulate_on_cpu", False, "Run the GPU paths on 2 logical CPU devices "
                  "(checks the script, not a GPU).")
flags.DEFINE_bool("keras", True, "Time Keras fit beside each path.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(__file__), "results"),
                    "Where gpu_check.{json,md} go.")

# Ops the placer may put on the host without a cost per step: function arguments and
# results, constants, no-ops, and the input pipeline's iterator.
STRUCTURAL = {"_Arg", "_Retval", "_DeviceArg", "_DeviceRetval", "NoOp", "Const", "_EagerConst",
              "Identity", "IteratorGetNext", "IteratorGetNextAsOptional", "OptionalGetValue",
              "OptionalHasValue", "MultiDeviceIteratorGetNextFromShard", "_Send", "_Recv",
              "_HostSend", "_HostRecv", "VarHandleOp", "Placeholder"}
LOSS_AGREEMENT = 0.05


class PlacementLog:
    """TensorFlow's placement log, read per call. The placer prints a function's placements
    (with C's printf, to file descriptor 1) when the function is first instantiated, and
    only if logging was on before TensorFlow started: so `start()` turns it on first
    thing and sends descriptor 1 to a file for the whole run (our own output goes to
    the real stdout), and `during(fn)` returns the lines printed while fn ran."""

    def start(self) -> None:
        import ctypes

        import tensorflow as tf

        tf.debugging.set_log_device_placement(True)
        self.libc = ctypes.CDLL(None)
        sys.stdout.flush()
        self.real = os.dup(1)
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 1)
        sys.stdout = os.fdopen(os.dup(self.real), "w", buffering=1)

    def during(self, fn) -> list[tuple[str, str, str]]:
        """Runs fn(); returns the (node, op, device) lines the placer printed meanwhile."""
        self.libc.fflush(None)
        begin = self.file.seek(0, os.SEEK_END)
        fn()
        self.libc.fflush(None)
        self.file.seek(begin)
        text = self.file.read().decode(errors="replace")
        lines = []
        for line in text.splitlines():
            parts = line.split(": ")
            if len(parts) == 3 and parts[1].startswith("(") and parts[2].startswith("/job:"):
                lines.append((parts[0], parts[1].strip("()"), parts[2]))
        return lines


PLACEMENT = PlacementLog()


def host_ops(lines, on_gpu: bool) -> list[str]:
    """Op types placed on the CPU, structural ones excepted (sorted, with counts)."""
    counts: dict[str, int] = {}
    for _, op, device in lines:
        if "device:CPU" in device and op not in STRUCTURAL:
            counts[op] = counts.get(op, 0) + 1
    return [f"{op} x{n}" for op, n in sorted(counts.items())] if on_gpu else []


def paths(devices: list[str], compute_capability) -> list[dict]:
    """The GPU paths, each a dict of Trainer settings; `skip` says why one cannot run."""
    from core import distribute

    one = devices[:1]
    auto = distribute.default_precision(compute_capability)
    out = [
        dict(name="1 GPU, float32", devices=one),
        dict(name="1 GPU, XLA", devices=one, jit=True),
        dict(name="1 GPU, XLA, bfloat16", devices=one, jit=True, precision="mixed_bfloat16",
             skip=None if compute_capability is None or tuple(compute_capability) >= (8, 0)
             else "bfloat16 needs compute capability 8.0 (Ampere) or newer"),
        dict(name="1 GPU, XLA, float16 + loss scaling", devices=one, jit=True,
             precision="mixed_float16"),
        dict(name="1 GPU, XLA, data on the device", devices=one, jit=True, device_data=True),
        dict(name=f"{len(devices)} GPUs mirrored, XLA, {auto}", devices=devices, jit=True,
             precision=auto, mirrored=True,
             skip=None if len(devices) > 1 else "one GPU: nothing to mirror"),
        # Last: op determinism is process-wide. XLA compiles the max-pool by reshape.
        dict(name="1 GPU, deterministic, XLA (max-pool by reshape)", devices=one, jit=True,
             deterministic=True),
    ]
    return out


def run_path(path: dict, images, on_gpu: bool) -> dict:
    import numpy as np
    import tensorflow as tf

    from core import data
    from core.trainer import Trainer

    if path.get("deterministic"):
        tf.config.experimental.enable_op_determinism()
    precision = path.get("precision", "float32")
    devices = path["devices"]
    strategy = (tf.distribute.MirroredStrategy(devices) if path.get("mirrored")
                else tf.distribute.OneDeviceStrategy(devices[0]))
    batch = FLAGS.batch_size
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        model = common.build_model("seed", images.shape[1:], precision, path.get("jit", False),
                                   onednn=False, deterministic=path.get("deterministic", False))
        device_data = (data.DeviceData(images, batch, strategy.num_replicas_in_sync, 0)
                       if path.get("device_data") else None)
        trainer = Trainer(model, strategy, batch, 3e-3, precision, path.get("jit", False),
                          device_data=device_data)
    iterator = None if device_data else iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(images, batch, 0, 0, ctx)))
    loop = FLAGS.steps_per_loop
    start = time.perf_counter()
    lines = PLACEMENT.during(lambda: trainer.train_loop(iterator, loop))
    compile_s = time.perf_counter() - start
    times, loss, done = [], None, loop
    while done < FLAGS.steps:
        n = min(loop, FLAGS.steps - done)
        start = time.perf_counter()
        loss = trainer.train_loop(iterator, n)  # a float: the host waited for the device
        times.append((time.perf_counter() - start) / n)
        done += n
    row = dict(name=path["name"], precision=precision, jit=bool(path.get("jit")),
               replicas=strategy.num_replicas_in_sync, compile_s=compile_s, loss=loss,
               steps_per_sec=1 / statistics.median(times) if times else None,
               host_ops=host_ops(lines, on_gpu), placed=len(lines))
    if FLAGS.keras and times:
        row["keras_steps_per_sec"], row["keras_spe"], row["keras_xla"] = keras_rate(
            strategy, images, precision, path)
    row["finite"] = bool(np.isfinite(loss)) if loss is not None else None
    return row


def keras_rate(strategy, images, precision, path) -> tuple[float, int, bool]:
    """(steps/s, steps_per_execution, whether fit compiled with XLA) of the same model
    through Keras fit on the same devices: steps_per_execution 32, or 1 where fit fails with
    more (Keras 3 under MirroredStrategy over 2 logical CPUs: "You must feed a value for
    placeholder tensor"). Keras turns XLA off itself under a tf.distribute strategy (its
    "auto") and under op determinism (`model_supports_jit`, with a warning)."""
    import tensorflow as tf

    from core import data

    dataset = data.train_dataset(images, FLAGS.batch_size, 0).map(lambda x: (x, x))
    for spe in (min(32, FLAGS.steps_per_loop), 1):
        with strategy.scope():
            model = common.build_model("seed", images.shape[1:], precision, bool(path.get("jit")),
                                       onednn=False,
                                       deterministic=path.get("deterministic", False))
            model.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                          loss=tf.keras.losses.BinaryCrossentropy(from_logits=True),
                          steps_per_execution=spe,
                          # Mirrored: Keras' own choice ("auto"), as its fit does.
                          jit_compile="auto" if path.get("mirrored") else bool(path.get("jit")))
        try:
            model.fit(dataset, epochs=1, steps_per_epoch=spe, verbose=0)  # compile, warm up
        except tf.errors.InvalidArgumentError:
            if spe == 1:
                raise
            continue
        steps = max(spe, (FLAGS.steps - FLAGS.steps_per_loop) // spe * spe)
        start = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
        return steps / (time.perf_counter() - start), spe, bool(model.jit_compile)
    raise AssertionError("unreachable")


def cpu_checks() -> list[dict]:
    """What a CPU can check: the kernel walk of each path's traced loop, and the decisions."""
    import numpy as np
    import tensorflow as tf

    from core import data, distribute
    from core.gpu_kernels import ops_without_gpu_kernel
    from core.trainer import Trainer
    from layers import fast_forms
    from layers.autoencoders import build_autoencoder

    images = np.random.default_rng(0).integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
    rows = []
    for name, kw in [("tf.data", {}), ("data on device", dict(device=True)),
                     ("bfloat16", dict(precision="mixed_bfloat16")),
                     ("float16", dict(precision="mixed_float16")),
                     ("XLA, data on device", dict(jit=True, device=True))]:
        strategy = tf.distribute.get_strategy()
        precision = kw.get("precision", "float32")
        with strategy.scope():
            device_data = data.DeviceData(images, 32, 1, 0) if kw.get("device") else None
            trainer = Trainer(common.build_model("seed", (28, 28, 1), precision,
                                                 kw.get("jit", False), onednn=False), strategy, 32,
                              1e-3, precision, jit_compile=kw.get("jit", False),
                              device_data=device_data)
        iterator = None if device_data else iter(strategy.distribute_datasets_from_function(
            lambda ctx: data.train_dataset(images, 32, 0, 0, ctx)))
        fn = trainer._train_loop.get_concrete_function(iterator, tf.TensorSpec([], tf.int32))
        missing = ops_without_gpu_kernel(fn)
        rows.append(dict(check=f"kernel walk: {name}", ok=not missing,
                         detail=", ".join(sorted({op for _, op, _ in missing})) or
                         "every op has a GPU kernel for its dtypes"))
    for cc, expected in [((7, 0), "mixed_float16"), ((8, 0), "mixed_bfloat16"), (None, "float32")]:
        got = distribute.default_precision(cc)
        rows.append(dict(check=f"precision auto on compute capability {cc}", ok=got == expected,
                         detail=got))
    # --deterministic with XLA on a GPU: the seed model's pool in the form the runner
    # installs there has no select-and-scatter, so XLA stays on; Keras' MaxPooling2D
    # (your own model's) has one, so that model trains without XLA.
    seed = build_autoencoder("seed")
    fast_forms.install(seed, fast_forms.choose(True, "float32", onednn=False,
                                               deterministic=True)[0])
    jit, why = distribute.deterministic_jit(True, True, distribute.has_max_pool_gradient(
        seed, (28, 28, 1)))
    rows.append(dict(check="--deterministic + XLA on a GPU, seed model", ok=jit is True,
                     detail=why or "XLA kept (max-pool by reshape)"))
    pooled = tf.keras.Sequential([tf.keras.Input((28, 28, 1)), tf.keras.layers.Conv2D(2, 3),
                                  tf.keras.layers.MaxPooling2D(), tf.keras.layers.UpSampling2D()])
    jit, why = distribute.deterministic_jit(True, True, distribute.has_max_pool_gradient(
        pooled, (28, 28, 1)))
    rows.append(dict(check="--deterministic + XLA on a GPU, Keras MaxPooling2D", ok=jit is False,
                     detail=why or "XLA kept"))
    nccl = distribute.communication_options(1).implementation.name
    rows.append(dict(check="multi-worker all-reduce with GPUs", ok=nccl == "NCCL", detail=nccl))
    return rows


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from core import data, distribute

    if FLAGS.simulate_on_cpu:
        distribute.setup_logical_cpus(2)
    PLACEMENT.start()  # before TensorFlow runs anything
    gpus = distribute.gpus()
    on_gpu = bool(gpus)
    context = common.machine_context(with_peaks=False)
    lines = ["# GPU check", "", common.context_markdown(context)]
    checks = cpu_checks()
    lines += ["## What a CPU can check", "", "| check | ok | detail |", "| --- | --- | --- |"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for c in checks]
    rows = []
    if on_gpu or FLAGS.simulate_on_cpu:
        if on_gpu:
            devices = [d.name for d in tf.config.list_logical_devices("GPU")]
            cc = distribute.gpu_compute_capability()
            details = tf.config.experimental.get_device_details(gpus[0])
            lines += ["", f"GPUs: {len(devices)} x {details.get('device_name', 'GPU')} "
                      f"(compute capability {cc}); TF32 matmuls "
                      f"{'on' if tf.config.experimental.tensor_float_32_execution_enabled() else 'off'}."]
        else:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
            cc = None
            lines += ["", "**Simulated on 2 logical CPU devices (--simulate_on_cpu): this checks "
                      "the script, not a GPU. No op placement or speed here says anything "
                      "about GPUs.**"]
        images = data.load_split("train[:8192]", "fontdigits").images
        for path in paths(devices, cc):
            if path.get("skip"):
                rows.append(dict(name=path["name"], skipped=path["skip"]))
                continue
            print(f"running: {path['name']}", flush=True)
            rows.append(run_path(path, images, on_gpu))
        reference = next((r["loss"] for r in rows if r.get("loss") is not None), None)
        lines += ["", "## GPU paths", "",
                  f"{FLAGS.steps} steps of batch {FLAGS.batch_size}, `seed` model, fontdigits.",
                  "", "| path | replicas | compile s | steps/s | Keras fit steps/s | ours / Keras "
                  "| last loss | agrees | ops on the CPU |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in rows:
            if "skipped" in r:
                lines.append(f"| {r['name']} | | | | | | | | skipped: {r['skipped']} |")
                continue
            keras = r.get("keras_steps_per_sec")
            r["agrees"] = bool(reference and abs(r["loss"] - reference) <= LOSS_AGREEMENT
                               * reference)
            lines.append(
                f"| {r['name']} | {r['replicas']} | {r['compile_s']:.1f} | "
                f"{r['steps_per_sec'] or 0:.1f} | {keras or 0:.1f} (spe {r.get('keras_spe')}"
                f"{', no XLA' if keras and r['jit'] and not r.get('keras_xla') else ''}) | "
                f"{(r['steps_per_sec'] / keras) if keras else float('nan'):.2f}x | "
                f"{r['loss']:.4f} | {'yes' if r['agrees'] else 'NO'} | "
                f"{(', '.join(r['host_ops']) or 'none') if on_gpu else 'n/a: simulated'} "
                f"({r['placed']} placements read) |")
        if any(r.get("keras_steps_per_sec") and r["jit"] and not r.get("keras_xla")
               for r in rows):
            lines += ["", "Keras fit ran without XLA where its cell says `no XLA`, though the "
                      "path's own loop used it: Keras turns XLA off itself under a "
                      "tf.distribute strategy (`jit_compile=\"auto\"`, its default there) and "
                      "under op determinism (`model_supports_jit`), so those ratios include "
                      "XLA's gain."]
    else:
        lines += ["", "**No GPU found: only the checks above ran.** What only a GPU run can "
                  "show: that the placer keeps every op of the step on the GPU, the paths' "
                  "speed against Keras fit, XLA's and cuDNN's behaviour with op determinism, "
                  "NCCL between workers. Run this on a GPU machine."]
    ok = all(c["ok"] for c in checks) and all(
        r.get("agrees", True) and not r.get("host_ops") and r.get("finite", True)
        for r in rows)
    lines += ["", f"Verdict: {'every check passed' if ok else 'SOME CHECKS FAILED (see NO above)'}."]
    common.write_report(FLAGS.output_dir, "gpu_check", dict(
        context=context, gpus=len(gpus), simulated=FLAGS.simulate_on_cpu, checks=checks,
        paths=rows, ok=ok), lines)
    np.seterr(all="ignore")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    common.run(main)
