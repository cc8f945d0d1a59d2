#!/usr/bin/env python3
"""Reading your own image files: our folder and TFRecord paths against Keras'
`image_dataset_from_directory`, and training fed by each.

    python benchmarks/image_files.py                    # 20,000 images, ~15 min on 2 cores
    python benchmarks/image_files.py --num_images=2000  # a quick look

Generates (once, into --work_dir) N colour JPEGs of 256x256 (the `shapes` images,
upscaled with a little noise), the same images as PNG, and the same JPEG bytes as
TFRecord shards (Model Garden's keys); also `core.prepare`'s shards of them at 64x64
(resized once), as PNG and as raw pixels (`--encoding=raw`). Then, interleaved round
by round in one process, measures images/s delivering 64x64x3 batches of 256 (float32,
[0, 1]) from:

  folder_jpeg, folder_png  our FolderSource pipeline (`data.train_dataset`)
  tfrecord_jpeg            our TFRecordSource over the 256x256 JPEG shards
  tfrecord_prepared        our TFRecordSource over core.prepare's 64x64 PNG shards
  tfrecord_prepared_raw    the same over its raw-pixel shards
  keras_jpeg, keras_png    keras.utils.image_dataset_from_directory(image_size=(64, 64),
                           crop_to_aspect_ratio=True, shuffle=True), divided by 255,
                           with prefetch: its recommended use
  folder_jpeg_resized      the same folder through the general decode (1/4 scale, then the
                           resize's branch), which a folder of mixed sizes takes: what
                           decoding straight to the size saves
  jpeg_decode_only         the ceiling of any path that decodes every JPEG: 4,096 of the
                           files' bytes held in memory, decode_jpeg at 1/4 scale (64x64),
                           16 per call of a parallel map (as ours, data.DECODE_CHUNK),
                           batched as uint8, and nothing else (no reads, no shuffle, no float)
  jpeg_decode_only_per_file  the same, one JPEG per map call: what a map call costs

and the `seed` model's training rate at 64x64x3 on the same images held in memory
(data on device) and fed from the folder, from the folder through `--cache=DIR` (its
epochs after the first: raw pixels written by the first), and from both prepared
shard sets, in the same run. Also the JPEG decoder's own downscaling (decode_jpeg's `ratio`) against decoding
whole: the difference in pixels and the speed. Writes results/image_files.{json,md}.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 20_000, "Images to generate (256x256).", lower_bound=1)
flags.DEFINE_string("work_dir", "/tmp/tapeloop-image-files", "Generated files go here (reused).")
flags.DEFINE_integer("batch_size", 256, "Batch size.", lower_bound=1)
flags.DEFINE_integer("batches", 40, "Batches per timed round of each input path.", lower_bound=1)
flags.DEFINE_integer("train_steps", 40, "Steps per timed round of each training variant.", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Timed rounds.", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")

SIZE = 256
OUT = (64, 64)


def generate(work_dir: str, n: int) -> dict[str, str]:
    """The JPEG and PNG folders and both shard sets; skipped where already complete."""
    from core import prepare

    paths = {k: os.path.join(work_dir, f"{k}-{n}") for k in
             ("jpeg", "png", "tfrecord_jpeg", "tfrecord_prepared", "tfrecord_prepared_raw")}
    done = os.path.join(work_dir, f"done-{n}")
    if not os.path.exists(done):
        _generate_files(paths, n)
        open(done, "w").close()
    if not os.path.exists(os.path.join(paths["tfrecord_prepared"], "dataset_info.json")):
        prepare.convert("folder", paths["tfrecord_prepared"], paths["jpeg"], image_size=OUT,
                        shards=16, overwrite=True, progress=None)
    if not os.path.exists(os.path.join(paths["tfrecord_prepared_raw"], "dataset_info.json")):
        prepare.convert("folder", paths["tfrecord_prepared_raw"], paths["jpeg"], image_size=OUT,
                        shards=16, overwrite=True, progress=None, encoding="raw")
    return paths


def _generate_files(paths: dict[str, str], n: int) -> None:
    import tensorflow as tf

    from core import prepare, shapes

    start = time.monotonic()
    base = shapes.load(seed=5, sizes={"train": min(n, 10_000), "test": 1})["train"][0]

    def image(i):
        x = tf.image.resize(tf.gather(base, i % len(base)), [SIZE, SIZE], method="bicubic")
        x = tf.cond(i >= len(base), lambda: tf.image.flip_left_right(x), lambda: x)
        noise = tf.random.stateless_normal([SIZE, SIZE, 3], seed=[7, i], stddev=4.0)
        return tf.cast(tf.clip_by_value(tf.round(x + noise), 0, 255), tf.uint8)

    ds = tf.data.Dataset.range(n).map(
        lambda i: (tf.io.encode_jpeg(image(i), quality=90), tf.io.encode_png(image(i))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for kind in ("jpeg", "png"):
        os.makedirs(os.path.join(paths[kind], "train", "all"), exist_ok=True)
    os.makedirs(paths["tfrecord_jpeg"], exist_ok=True)
    shards = 16
    writers = [tf.io.TFRecordWriter(os.path.join(paths["tfrecord_jpeg"],
                                                 f"train-{s:05d}-of-{shards:05d}"))
               for s in range(shards)]
    for i, (jpg, png) in enumerate(ds.as_numpy_iterator()):
        for kind, raw in (("jpeg", jpg), ("png", png)):
            ext = {"jpeg": "jpg", "png": "png"}[kind]
            with open(os.path.join(paths[kind], "train", "all", f"{i:06d}.{ext}"), "wb") as f:
                f.write(raw)
        writers[i * shards // n].write(prepare.example(jpg, (SIZE, SIZE, 3), -1, "jpeg")
                                       .SerializeToString())
    for w in writers:
        w.close()
    for kind in ("jpeg", "png"):  # a small test/ split, so the folders have both
        os.makedirs(os.path.join(paths[kind], "test", "all"), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(paths[kind], "train", "all")))[:8]:
            target = os.path.join(paths[kind], "test", "all", name)
            if not os.path.exists(target):
                os.link(os.path.join(paths[kind], "train", "all", name), target)
    print(f"generated {n:,} images in {time.monotonic() - start:.0f} s", flush=True)


def jpeg_downscale_quality(folder: str, k: int = 256) -> dict:
    """Decoding at 1/4 scale (decode_jpeg ratio) against decoding whole, to 64x64."""
    import numpy as np
    import tensorflow as tf

    from core import images

    files = sorted(os.listdir(folder))[:k]
    raw = [tf.io.read_file(os.path.join(folder, f)) for f in files]

    def run(downscale):
        fn = tf.function(lambda c: images.decode(c, OUT, 3, "crop", downscale_jpeg=downscale))
        fn(raw[0])
        start = time.perf_counter()
        out = np.stack([fn(c).numpy() for c in raw]).astype(np.int64)
        return out, len(raw) / (time.perf_counter() - start)

    fast, fast_rate = run(True)
    whole, whole_rate = run(False)
    diff = np.abs(fast - whole)
    mse = float(np.mean((fast - whole) ** 2))
    return {"images": len(raw), "mean_abs_diff": float(diff.mean()),
            "p99_abs_diff": float(np.percentile(diff, 99)), "max_abs_diff": int(diff.max()),
            "psnr_db": float(10 * np.log10(255**2 / mse)) if mse else float("inf"),
            "decodes_per_s_ratio": fast_rate, "decodes_per_s_whole": whole_rate,
            "speedup": fast_rate / whole_rate}


def main(argv):
    del argv
    import tensorflow as tf

    from core import data, distribute
    from core.trainer import Trainer

    n, batch = FLAGS.num_images, FLAGS.batch_size
    # The CPU recipe, as train.py picks it on this machine (core.distribute.cpu_defaults).
    config_like = dict(batch_shards=2 if distribute.usable_cores() >= 2 else 1)
    if config_like["batch_shards"] > 1 and not tf.config.list_physical_devices("GPU"):
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(config_like["batch_shards"])
    paths = generate(FLAGS.work_dir, n)
    quality = jpeg_downscale_quality(os.path.join(paths["jpeg"], "train", "all"))

    def ours(kind, where):
        src = data.open_split("train", kind, where, image_size=OUT).source
        return src, data.train_dataset(src, batch, 0)

    folder_jpeg, ds_fj = ours("folder", paths["jpeg"])
    resized = copy.copy(folder_jpeg)  # every file the same size: no resize, unless made to
    resized.decoding = dataclasses.replace(folder_jpeg.decoding, exact=False)
    ds_fjr = data.train_dataset(resized, batch, 0)
    _, ds_fp = ours("folder", paths["png"])
    _, ds_tj = ours("tfrecord", paths["tfrecord_jpeg"])
    prepared, ds_tp = ours("tfrecord", paths["tfrecord_prepared"])
    prepared_raw, ds_tr = ours("tfrecord", paths["tfrecord_prepared_raw"])
    # --cache=DIR: the first epoch writes the decoded folder as raw shards (timed here
    # once, as a whole pass); every later epoch reads them.
    cache_dir = os.path.join(FLAGS.work_dir, f"cache-{n}")
    if tf.io.gfile.exists(cache_dir):  # time a first pass, not a reuse
        tf.io.gfile.rmtree(cache_dir)
    start = time.perf_counter()
    folder_cached = data.cache_to_dir(folder_jpeg, cache_dir)
    cache_seconds = time.perf_counter() - start

    def keras_ds(where):
        ds = tf.keras.utils.image_dataset_from_directory(
            os.path.join(where, "train"), labels=None, image_size=OUT, batch_size=batch,
            crop_to_aspect_ratio=True, shuffle=True, seed=0)
        return ds.map(lambda x: x / 255.0).repeat().prefetch(tf.data.AUTOTUNE)

    ds_kj, ds_kp = keras_ds(paths["jpeg"]), keras_ds(paths["png"])
    jpeg_dir = os.path.join(paths["jpeg"], "train", "all")
    jpeg_bytes = [tf.io.gfile.GFile(os.path.join(jpeg_dir, f), "rb").read()
                  for f in sorted(tf.io.gfile.listdir(jpeg_dir))[:4096]]
    def decode_jpeg(c):
        return tf.ensure_shape(tf.io.decode_jpeg(c, channels=3, ratio=SIZE // OUT[0]), (*OUT, 3))

    k = data.decode_chunk_size(batch)
    ds_decode_only = tf.data.Dataset.from_tensor_slices(jpeg_bytes).repeat().batch(
        k, drop_remainder=True).map(lambda cs: tf.stack([decode_jpeg(cs[j]) for j in range(k)]),
                                    num_parallel_calls=tf.data.AUTOTUNE).rebatch(
        batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    ds_decode_only_per_file = tf.data.Dataset.from_tensor_slices(jpeg_bytes).repeat().map(
        decode_jpeg, num_parallel_calls=tf.data.AUTOTUNE).batch(batch).prefetch(tf.data.AUTOTUNE)

    def drain(ds, k):
        # A fresh iterator every round (no contender gets batches its prefetch threads
        # made while another was being timed); its first batch, the pipeline's start, is
        # timed apart: a training run starts its pipeline once.
        start = time.perf_counter()
        iterator = iter(ds)
        float(tf.reduce_sum(next(iterator)[:, 0, 0, 0]))
        started = time.perf_counter()
        for _ in range(k):
            x = next(iterator)
        float(tf.reduce_sum(x[:, 0, 0, 0]))
        return k, started - start, time.perf_counter() - started

    def train(trainer, ds, k):
        """The same for training: one untimed step starts the iterator."""
        start = time.perf_counter()
        iterator = iter(ds) if ds is not None else None
        trainer.train_loop(iterator, 1)
        started = time.perf_counter()
        trainer.train_loop(iterator, k)
        return k, started - start, time.perf_counter() - started

    # Training the seed model at 64x64x3: from memory (on device), the folder, the shards.
    memory = data.materialize(prepared)
    strategy = tf.distribute.get_strategy()

    def trainer_for(device_data=None):
        with strategy.scope():
            model = common.build_model("seed", (*OUT, 3))
            dd = data.DeviceData(memory.images, batch, 1, 0) if device_data else None
            return Trainer(model, strategy, batch, 3e-3, device_data=dd,
                           batch_shards=config_like["batch_shards"])

    t_mem, t_folder, t_tfr = trainer_for(True), trainer_for(), trainer_for()
    t_raw, t_cached = trainer_for(), trainer_for()
    ds_train_folder = data.train_dataset(folder_jpeg, batch, 1)
    ds_train_tfr = data.train_dataset(prepared, batch, 1)
    ds_train_raw = data.train_dataset(prepared_raw, batch, 1)
    ds_train_cached = data.train_dataset(folder_cached, batch, 1)
    steps = FLAGS.train_steps
    contenders = {
        "folder_jpeg": lambda: drain(ds_fj, FLAGS.batches),
        "folder_jpeg_resized": lambda: drain(ds_fjr, FLAGS.batches),
        "folder_png": lambda: drain(ds_fp, FLAGS.batches),
        "tfrecord_jpeg": lambda: drain(ds_tj, FLAGS.batches),
        "tfrecord_prepared": lambda: drain(ds_tp, FLAGS.batches),
        "tfrecord_prepared_raw": lambda: drain(ds_tr, FLAGS.batches),
        "keras_jpeg": lambda: drain(ds_kj, FLAGS.batches),
        "keras_png": lambda: drain(ds_kp, FLAGS.batches),
        "jpeg_decode_only": lambda: drain(ds_decode_only, FLAGS.batches),
        "jpeg_decode_only_per_file": lambda: drain(ds_decode_only_per_file, FLAGS.batches),
        "train_in_memory": lambda: train(t_mem, None, steps),
        "train_from_folder_jpeg": lambda: train(t_folder, ds_train_folder, steps),
        "train_from_tfrecord_prepared": lambda: train(t_tfr, ds_train_tfr, steps),
        "train_from_tfrecord_prepared_raw": lambda: train(t_raw, ds_train_raw, steps),
        "train_from_folder_jpeg_cached": lambda: train(t_cached, ds_train_cached, steps),
    }
    for fn in contenders.values():  # warm-up, compile, fill the prefetch buffers
        fn()
    rates = {name: [] for name in contenders}
    starts = {name: [] for name in contenders}
    for r in range(FLAGS.rounds):
        for name, fn in contenders.items():
            k, start_s, seconds = fn()
            rates[name].append(k * batch / seconds)
            starts[name].append(start_s)
        print(f"round {r + 1}/{FLAGS.rounds}: " + ", ".join(
            f"{k} {v[-1]:,.0f}" for k, v in rates.items()), flush=True)
    results = {name: common.summarize(v) for name, v in rates.items()}
    for name, res in results.items():
        res["start_s"] = float(sorted(starts[name])[len(starts[name]) // 2])
    train_rate = results["train_in_memory"]["median"]
    for res in results.values():
        res["x_training_in_memory"] = res["median"] / train_rate
    pairs = [("folder_jpeg", "keras_jpeg"), ("folder_jpeg", "folder_jpeg_resized"),
             ("folder_png", "keras_png"),
             ("tfrecord_jpeg", "keras_jpeg"), ("tfrecord_prepared", "keras_jpeg"),
             ("tfrecord_prepared_raw", "keras_jpeg"),
             ("jpeg_decode_only", "keras_jpeg"),
             ("jpeg_decode_only", "jpeg_decode_only_per_file"),
             ("folder_jpeg", "jpeg_decode_only"),
             ("train_from_folder_jpeg", "train_in_memory"),
             ("train_from_tfrecord_prepared", "train_in_memory"),
             ("train_from_tfrecord_prepared_raw", "train_in_memory"),
             ("train_from_folder_jpeg_cached", "train_in_memory")]
    # Per-round ratios (each round's two numbers measured in the same stretch of time):
    # their median is the headline, their range the spread. The ratio of the two medians
    # can mislead when the medians come from different rounds.
    round_ratios = {f"{a} / {b}": [x / y for x, y in zip(rates[a], rates[b])] for a, b in pairs}
    ratios = {name: statistics.median(rr) for name, rr in round_ratios.items()}
    ratios_of_medians = {f"{a} / {b}": results[a]["median"] / results[b]["median"]
                         for a, b in pairs}
    context = common.machine_context(with_peaks=False)
    payload = {"context": context, "config": {"num_images": n, "batch_size": batch,
                                              "image": f"{SIZE}x{SIZE} -> 64x64x3",
                                              "rounds": FLAGS.rounds},
               "results": results, "ratios": ratios, "round_ratios": round_ratios,
               "ratios_of_medians": ratios_of_medians,
               "cache_first_pass_s": cache_seconds,
               "jpeg_downscale": quality}
    lines = ["# Image files: folder, TFRecord and Keras\n", common.context_markdown(context),
             f"{n:,} colour images of {SIZE}x{SIZE} delivered as 64x64x3 float batches of "
             f"{batch}; median of {FLAGS.rounds} interleaved rounds "
             f"(`python benchmarks/image_files.py --num_images={n}`). Each round starts a "
             f"fresh iterator and times its {FLAGS.batches} batches ({FLAGS.train_steps} "
             "training steps) after the first; the first's wait, the pipeline's start, is "
             "its own column (a median).\n",
             "| path | images/s | jitter | x training in memory | start s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, res in results.items():
        lines.append(f"| {name} | {res['median']:,.0f} | {res['jitter']:,.0f} | "
                     f"{res['x_training_in_memory']:.2f} | {res['start_s']:.2f} |")
    lines += ["", "| ratio | median of the per-round ratios | per-round range | ratio of the medians |",
              "| --- | ---: | --- | ---: |"]
    for name, value in ratios.items():
        rr = round_ratios[name]
        lines.append(f"| {name} | {value:.2f}x | {min(rr):.2f}-{max(rr):.2f} | "
                     f"{ratios_of_medians[name]:.2f}x |")
    lines += ["", f"`--cache=DIR`'s first pass (decoding the {n:,} JPEGs into raw shards, "
              f"before the timed rounds): {cache_seconds:.1f} s."]
    q = quality
    lines += ["", f"JPEG decoded by libjpeg at 1/4 scale then resized, against decoded whole "
              f"then resized (crop to 64x64, {q['images']} images): mean |difference| "
              f"{q['mean_abs_diff']:.2f} grey levels of 255, 99th percentile "
              f"{q['p99_abs_diff']:.0f}, max {q['max_abs_diff']}, PSNR {q['psnr_db']:.1f} dB; "
              f"{q['speedup']:.2f}x the decodes per second ({q['decodes_per_s_ratio']:,.0f} "
              f"against {q['decodes_per_s_whole']:,.0f}, one at a time)."]
    common.write_report(FLAGS.output_dir, "image_files", payload, lines)


if __name__ == "__main__":
    common.run(main)
