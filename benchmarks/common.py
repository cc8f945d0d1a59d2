"""Shared benchmark machinery: machine context, matmul peak, model FLOPs, statistics, reports.

Method (after tf_cnn_benchmarks and nanoGPT's bench.py): warm-up excluded and
compile time reported on its own; every timed interval ends with a value
forced to the host (the device has finished); variants are interleaved round
by round in one process, so the machine's drift hits all of them alike;
medians with their spread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import core  # noqa: E402  (imports no TensorFlow)

core.quiet_tensorflow()  # as train.py: no "failed call to cuInit" on a machine without GPUs
core.prefer_onednn()  # as train.py: what it runs is what is timed

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from core.errors import TapeloopError  # noqa: E402


class Failed(TapeloopError):
    """A part of a benchmark failed: a worker process, or a train.py it ran. Its exit code
    is theirs."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code or 1


def failed_run(what: str, proc) -> Failed:
    """The failure of a `train.py` a benchmark ran (a CompletedProcess with text stderr):
    train.py's own one-line error where it printed one, else the end of its log."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")]
    reason = (errors[-1][len("train.py: error: "):] if errors
              else "the end of its log:\n" + proc.stderr[-3000:])
    return Failed(f"{what} failed (exit code {proc.returncode}): {reason}", proc.returncode)


def run(main) -> None:
    """`app.run(main)`, with tapeloop's errors (a bad flag, missing data, a failed part) and
    absl's (a flag it cannot parse, a script's `app.UsageError`) as one line and their
    exit code (2 for flags), as train.py prints them, instead of a traceback or absl's
    two lines and exit 1."""
    from absl import app

    from core import errors

    program = os.path.basename(sys.argv[0])

    def main_with_errors(argv):
        core.one_copy_of_tensorflow_logs()  # TensorFlow was imported before app.run's handler
        from layers.autoencoders import ModelError

        try:
            return main(argv)
        except (TapeloopError, ModelError, app.UsageError) as e:  # ModelError: a --model
            print(f"{program}: error: {e}", file=sys.stderr)       # that does not build
            sys.stderr.flush()
            sys.exit(getattr(e, "exit_code", 2))

    app.run(main_with_errors,
            flags_parser=errors.flags_parser(program, f"python benchmarks/{program}"))


def _cpuinfo(field: str) -> str | None:
    """The first `field` line's value in Linux's /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or "unknown CPU"


# The vector units that decide a CPU's speed here: oneDNN's float32 kernels with AVX2 or
# AVX-512, bfloat16 with AVX-512 (BF16 or AMX for native units). Linux /proc/cpuinfo names.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_features() -> list[str] | None:
    """Which of CPU_FEATURES this CPU has, or None where /proc/cpuinfo cannot say."""
    flags = _cpuinfo("flags")
    return None if flags is None else [name for name in CPU_FEATURES if name in flags.split()]


def matmul_shape() -> tuple[int, int]:
    """(n, matmuls per timed call) of the peak measurement: on a GPU, 8192x8192 (a 2048 one
    leaves tensor cores idle) and 16 chained matmuls per sync (~0.2 s of work at 100 TFLOP/s,
    so the one host sync per call is under 0.1% of it); on a CPU, 2048 and 4."""
    return (8192, 16) if tf.config.list_physical_devices("GPU") else (2048, 4)


def tf32_enabled() -> bool:
    """Whether float32 matmuls and convolutions may run as TF32 on Ampere and later GPUs
    (TensorFlow's default): a float32 "peak" on those GPUs is then TF32's."""
    return bool(tf.config.experimental.tensor_float_32_execution_enabled())


def matmul_peak(dtype: tf.DType, n: int | None = None, repeats: int = 7) -> float:
    """Measured FLOP/s of n x n matmuls on the default device (median of `repeats` timed
    calls, each `inner` chained matmuls ended by one host sync; see matmul_shape)."""
    default_n, inner = matmul_shape()
    n = n or default_n
    a = tf.random.uniform((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)

    @tf.function
    def run(x):
        for _ in range(inner):
            x = tf.matmul(x, a) * tf.cast(1.0 / n, dtype)  # keep values bounded
        return tf.reduce_sum(tf.cast(x[:1, :1], tf.float32))

    float(run(a))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        float(run(a))  # forces the result to the host: the call's one sync
        times.append(time.perf_counter() - start)
    return 2 * n**3 * inner / statistics.median(times)


def usable_cores() -> int:
    """The cores this process may run on: the number the CPU defaults use."""
    from core import distribute

    return distribute.usable_cores()


def one_core(global_batch: int) -> tuple[int, int]:
    """Runs TensorFlow on one thread (call before any op runs) and returns (cores, one
    core's share of `global_batch`): how the per-core recipe sees each op."""
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    cores = usable_cores()
    return cores, max(1, global_batch // cores)


def machine_context(with_peaks: bool = True) -> dict:
    from layers import fast_forms

    gpus = tf.config.list_physical_devices("GPU")
    device = (tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
              if gpus else cpu_name())
    context = {
        "device": device,
        "device_type": "GPU" if gpus else "CPU",
        "cpu_cores": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": tf.keras.version(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        # Whether oneDNN ran the convolutions: 1.3-3x on an AVX2 CPU (README, "oneDNN on
        # every x86 CPU"), so a table means little without it.
        "cpu_features": cpu_features(),
        "onednn": None if gpus else fast_forms.onednn_convolutions("float32"),
    }
    if with_peaks:
        n, inner = matmul_shape()
        context["matmul_peak_method"] = {"n": n, "matmuls_per_sync": inner,
                                         "tf32": tf32_enabled() if gpus else None}
        context["matmul_peak_flops"] = {
            "float32": matmul_peak(tf.float32),
            "bfloat16": matmul_peak(tf.bfloat16),
        }
    return context


def build_model(name, image_shape, precision="float32", jit_compile=False, grouped=True,
                onednn=None, as_written=False, without=(), deterministic=False):
    """`build_autoencoder`, computing in the forms the runner chooses for this setting
    (`layers.fast_forms.choose`): what train.py runs. grouped=False: without the
    images-as-channels layout; onednn=False: the forms of a GPU run; as_written: no
    forms, the model's layers as they read (what a Keras user of the same layers runs);
    without: names of `Forms` fields turned off (what one form gives the whole step);
    deterministic: the forms of a --deterministic run."""
    from layers import fast_forms
    from layers.autoencoders import build_autoencoder

    model = build_autoencoder(name, image_shape, precision)
    if as_written:
        return model
    forms, _ = fast_forms.choose(jit_compile, precision, onednn, deterministic)
    forms = dataclasses.replace(forms, **{name: False for name in without})
    fast_forms.install(model, forms if grouped else dataclasses.replace(forms, image_groups=1))
    return model


def conv_flops_per_example(model, input_shape) -> int:
    """Forward FLOPs of one example: 2 * H_out * W_out * k_h * k_w * C_in * C_out per conv.

    Counted on the architecture as defined (a Conv2DTranspose counts on its
    input grid; an UpsampleConv counts as the 'same' conv on the upsampled map
    it is equivalent to), not on how a kernel computes it. Pooling, activations
    and the loss are left out (under 1% here).
    """
    return sum(conv["flops"] for conv in conv_layers(model, input_shape))


def train_flops_per_example(model, input_shape) -> int:
    """Training FLOPs of one example: each conv's forward, its gradient to the weights
    and its gradient to its input cost one forward each (3x), except that nothing
    computes the gradient to the input images, which are data (the first conv: 2x)."""
    flops = [conv["flops"] for conv in conv_layers(model, input_shape)]
    return 3 * sum(flops) - flops[0]


def conv_layers(model, input_shape) -> list[dict]:
    """Each convolution in the order it runs: name, the grid it runs on (H, W, C_in),
    filters, kernel size, transposed or not, and forward FLOPs per example."""
    from layers import blocks

    convs = []
    x = tf.zeros((1, *input_shape))

    def visit(layer, inputs, name=None):
        out = layer(inputs)
        convs.append(_conv_record(layer, inputs, out, name or layer.name))
        return out

    def walk(layer, inputs):
        if isinstance(layer, (blocks.UpsampleConv, tf.keras.layers.Conv2D)):
            return visit(layer, inputs)
        children = getattr(layer, "blocks", None)
        if children is not None:  # Encoder / Decoder
            for child in children:
                inputs = walk(child, inputs)
            if hasattr(layer, "to_logits"):
                inputs = walk(layer.to_logits, inputs)
            return inputs
        if hasattr(layer, "encoder") and hasattr(layer, "decoder"):
            return walk(layer.decoder, walk(layer.encoder, inputs))
        # A block: its convolution(s), then whatever else it does.
        for name in ("conv",):
            sub = getattr(layer, name, None)
            if sub is not None:
                visit(sub, inputs, name=f"{layer.name}/{name}")
        return layer(inputs)

    walk(model, x)
    if not convs:  # not built from layers/blocks.py (the resnet, your own): record the calls
        convs = _recorded_convs(model, x)
    return convs


def _conv_record(layer, inputs, out, name: str) -> dict:
    """One convolution as `conv_layers` lists it. A transposed conv counts on its input
    grid, every other conv on its output grid (for an UpsampleConv: the upsampled map the
    equivalent 'same' conv runs on)."""
    kernel = layer.kernel_size
    k = kernel if isinstance(kernel, int) else kernel[0]
    cin, cout = int(inputs.shape[-1]), int(out.shape[-1])
    transposed = isinstance(layer, tf.keras.layers.Conv2DTranspose)
    grid = inputs if transposed else out
    h, w = int(grid.shape[1]), int(grid.shape[2])
    return {"name": name, "input": [h, w, cin], "filters": cout, "kernel": int(k),
            "transposed": transposed, "flops": 2 * h * w * k * k * cin * cout}


def _recorded_convs(model, x) -> list[dict]:
    """Every Conv2D (and Conv2DTranspose) `model(x)` calls, wherever it is nested,
    with the grid it ran on: each layer's `call` wrapped for one forward pass."""
    convs, originals = [], {}

    def recorder(layer, call):
        def recorded(inputs, *args, **kwargs):
            out = call(inputs, *args, **kwargs)
            convs.append(_conv_record(layer, inputs, out, getattr(layer, "path", layer.name)))
            return out
        return recorded

    for layer in model._flatten_layers(include_self=False):  # noqa: SLF001
        if isinstance(layer, tf.keras.layers.Conv2D):
            originals[id(layer)] = (layer, layer.call)
            layer.call = recorder(layer, layer.call)
    try:
        model(x)
    finally:
        for layer, call in originals.values():
            layer.call = call
    return convs


def jpeg_at_size(images, budget_bytes: int) -> dict:
    """JPEG as the reference codec: each uint8 image (N, H, W, C) encoded at the highest
    quality (1-100) whose file is at most `budget_bytes`, decoded, and scored with the
    metrics evaluation uses (means over the images that fit). Images that do not fit
    even at quality 1 are counted, not scored."""
    from core import metrics

    def encoded(image, quality):
        return tf.io.encode_jpeg(image, quality=quality).numpy()

    chosen, sizes, decoded, kept = [], [], [], []
    for i, image in enumerate(images):
        if len(encoded(image, 1)) > budget_bytes:
            continue
        lo, hi = 1, 100  # the largest quality that fits: sizes grow with quality
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(encoded(image, mid)) <= budget_bytes else (lo, mid - 1)
        data = encoded(image, lo)
        chosen.append(lo)
        sizes.append(len(data))
        decoded.append(tf.io.decode_jpeg(data, channels=image.shape[-1]).numpy())
        kept.append(i)
    out = {"budget_bytes": budget_bytes, "images": len(images), "fit": len(kept)}
    if kept:
        targets = tf.constant(images[kept], tf.float32) / 255.0
        jpegs = tf.constant(np.stack(decoded), tf.float32) / 255.0
        out.update(mse=float(tf.reduce_mean(metrics.mse(targets, jpegs))),
                   psnr=float(tf.reduce_mean(metrics.psnr(targets, jpegs))),
                   ssim=float(tf.reduce_mean(metrics.ssim(targets, jpegs))),
                   mean_bytes=float(np.mean(sizes)), quality_min=min(chosen),
                   quality_median=float(np.median(chosen)), quality_max=max(chosen))
    return out


def jpeg_smallest(images) -> dict:
    """JPEG's smallest files: each uint8 image (N, H, W, C) at quality 1 with optimised
    Huffman tables (`optimize_size`), scored like `jpeg_at_size`. Below this size JPEG has
    no setting at all."""
    from core import metrics

    files = [tf.io.encode_jpeg(image, quality=1, optimize_size=True).numpy() for image in images]
    decoded = np.stack([tf.io.decode_jpeg(f, channels=images.shape[-1]).numpy() for f in files])
    targets = tf.constant(images, tf.float32) / 255.0
    jpegs = tf.constant(decoded, tf.float32) / 255.0
    return {"images": len(images), "mean_bytes": float(np.mean([len(f) for f in files])),
            "min_bytes": min(len(f) for f in files),
            "mse": float(tf.reduce_mean(metrics.mse(targets, jpegs))),
            "psnr": float(tf.reduce_mean(metrics.psnr(targets, jpegs))),
            "ssim": float(tf.reduce_mean(metrics.ssim(targets, jpegs)))}


def code_ranges(codes) -> tuple[np.ndarray, np.ndarray]:
    """Each code channel's (last axis) minimum and maximum over `codes` (N, ..., C)."""
    axes = tuple(range(codes.ndim - 1))
    return codes.min(axis=axes), codes.max(axis=axes)


def quantize(codes, low, high, bits: int = 8) -> np.ndarray:
    """`codes` (N, ..., C) as a decoder receives them after storing each number in `bits`
    bits: clipped to its channel's [low, high] (from training codes: `code_ranges`), cut
    into 2^bits - 1 equal steps, rounded, and mapped back to floats. The ranges are the
    codec's constants (2 floats a channel), not part of each image's code."""
    levels = 2 ** bits - 1
    scale = np.maximum(high - low, np.finfo(np.float32).tiny)
    steps = np.round((np.clip(codes, low, high) - low) / scale * levels)
    return (steps / levels * scale + low).astype(np.float32)


def form_rows(shape: str, calls: dict, rounds: int) -> list[dict]:
    """`calls` (form name -> zero-argument callable; "plain" among them) timed by
    `interleaved_times`: per form, in `calls`' order, the median ms, its range and the
    speed-up over "plain", labelled with `shape`."""
    seconds = interleaved_times(calls, rounds)
    times = {name: [1e3 * t for t in ts] for name, ts in seconds.items()}
    base = statistics.median(times["plain"])
    return [{"shape": shape, "form": name, "ms": statistics.median(t), "min_ms": min(t),
             "max_ms": max(t), "speedup": base / statistics.median(t)}
            for name, t in times.items()]


def form_table(rows: list[dict], shape_header: str) -> list[str]:
    """`form_rows` as a Markdown table."""
    lines = [f"| {shape_header} | form | ms | range | x plain |",
             "| --- | --- | ---: | --- | ---: |"]
    return lines + [f"| {r['shape']} | `{r['form']}` | {r['ms']:.2f} | "
                    f"{r['min_ms']:.2f}-{r['max_ms']:.2f} | {r['speedup']:.2f}x |" for r in rows]


def write_form_report(output_dir: str, name: str, title: str, script: str, rows: list[dict],
                      shape_header: str, setting: str, config: dict) -> None:
    """The report of a forms script (`form_rows` on one thread): results/NAME.{json,md}
    with `config` (its "rounds" among them) and the table; `setting` says what every row
    ran in (dtype, groups, XLA)."""
    context = machine_context(with_peaks=False)
    payload = {"context": context, "config": {**config, "threads": "intra 1, inter 1"},
               "results": rows}
    lines = [f"# {title}\n", context_markdown(context),
             f"Milliseconds per forward and backward pass, median of {config['rounds']} "
             f"interleaved rounds (range), {setting}, one thread. The module docstring of "
             f"`benchmarks/{script}` says what each form is.\n",
             *form_table(rows, shape_header)]
    write_report(output_dir, name, payload, lines)


def interleaved_times(calls: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each timed call of each zero-argument callable in `calls` (each returns
    a tensor or a structure of them): every one is called once untimed (trace, compile,
    warm-up), then `rounds` times, interleaved round by round; each timed call ends with
    its results on the host."""
    def host(result):
        tf.nest.map_structure(lambda t: t.numpy(), result)

    for call in calls.values():
        host(call())
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            host(call())
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_ms(loops: dict, rounds: int, per_call: int) -> dict[str, float]:
    """Median milliseconds per unit of work of each callable in `loops` (a call does
    `per_call` units), timed by `interleaved_times`."""
    times = interleaved_times(loops, rounds)
    return {name: 1e3 * statistics.median(t) / per_call for name, t in times.items()}


def summarize(rates: list[float], step_times: list[float] | None = None) -> dict:
    """Median, standard error, jitter (1.4826 x MAD) of per-round rates; step-time p50/p90."""
    rates = [float(r) for r in rates]
    median = statistics.median(rates)
    mad = statistics.median([abs(r - median) for r in rates])
    out = {
        "median": median,
        "stderr": statistics.stdev(rates) / math.sqrt(len(rates)) if len(rates) > 1 else 0.0,
        "jitter": 1.4826 * mad,
        "min": min(rates),
        "max": max(rates),
        "rounds": len(rates),
        "per_round": rates,  # in round order: ratios of variants round by round
    }
    if step_times:
        out["step_ms_p50"] = 1000 * float(np.percentile(step_times, 50))
        out["step_ms_p90"] = 1000 * float(np.percentile(step_times, 90))
    return out


def write_report(output_dir: str, name: str, payload: dict, lines: list[str]) -> None:
    """Writes NAME.json (payload) and NAME.md (lines) into output_dir, and prints the table."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, f"{name}.json")
    md_path = os.path.join(output_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    markdown = "\n".join(lines) + "\n"
    with open(md_path, "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


def _cpu_markdown(context: dict) -> str:
    """'; AVX2, no AVX-512; oneDNN on' (empty for a report written before they were kept)."""
    parts = []
    features = context.get("cpu_features")
    if features is not None:
        names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
                 "amx_bf16": "AMX-BF16"}
        parts.append(", ".join(names[f] for f in features) or "no AVX2")
        if features and "avx512f" not in features:
            parts[-1] += ", no AVX-512"
    if context.get("onednn") is not None:
        parts.append("oneDNN " + ("on" if context["onednn"] else "off"))
    return "".join("; " + p for p in parts)


def context_markdown(context: dict) -> str:
    lines = [f"Machine: {context['device']} ({context['device_type']}, {context['cpu_cores']} cores"
             f"{_cpu_markdown(context)}), TensorFlow {context['tensorflow']}, "
             f"Keras {context['keras']}, {context['date']}."]
    peaks = context.get("matmul_peak_flops")
    if peaks:
        method = context.get("matmul_peak_method", {"n": 2048, "tf32": None})
        tf32 = {True: " (float32 as TF32: TensorFlow's default on Ampere and later)",
                False: " (TF32 off)", None: ""}[method.get("tf32")]
        lines.append(f"Measured matmul peak ({method['n']}x{method['n']}): " + ", ".join(
            f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks.items()) + tf32 + ".")
    return "\n".join(lines) + "\n"
