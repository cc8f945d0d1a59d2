#!/usr/bin/env python3
"""A chunk of image files decoded in one tf.data map call, in two forms.

    python benchmarks/decode_forms.py                      # ~3 minutes on 2 cores
    python benchmarks/decode_forms.py --num_images=200 --rounds=1 --batches=2  # a smoke run

A folder or TFRecord pipeline decodes k files per map call (`data.DECODE_CHUNK`: a map
call costs tens of microseconds whatever it does). The call's function holds the k
decodes in one of two forms:

- k traced copies: `tf.stack([decode(file_j) for j in range(k)])`, the decode (header
  read, JPEG ratio switch, resize branches) traced k times; tapeloop's form before
  `sources.each`;
- traced once (`sources.each`, what `decode_chunk` uses): the decode traced as one
  function, called k times.

Generates (once, into --work_dir) --num_images colour images of mixed sizes (96-320 px a
side, the `shapes` images rescaled with a little noise) as a folder of JPEGs and as
TFRecord shards of PNGs (Model Garden's keys, no dataset_info.json: the general decode).
Then, round by round and interleaved, for each source and form builds a fresh pipeline of
64x64x3 uint8 batches of 32 (chunks of 16), as `data.train_dataset` does, and times: its
build (the map's trace), its first batch (the function's instantiation), and the
images/s of the next --batches batches. The forms must give the same pixels (each
round's first batches are compared; no report otherwise).

Also the figures' examples (runner.MAX_FIGURE_EXAMPLES, 2,000 spread over the split) read
from the TFRecord shards by `TFRecordSource.examples`, one pipeline that parses and decodes
them, against its form before: each record parsed and decoded eagerly, one at a time.

Writes results/decode_forms.{json,md}: medians with their ranges.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 2000, "Images to generate (96-320 px a side).", lower_bound=64)
flags.DEFINE_string("work_dir", "/tmp/tapeloop-decode-forms", "Generated files go here (reused).")
flags.DEFINE_integer("batches", 40, "Batches of 32 timed per pipeline for images/s.", lower_bound=1)
flags.DEFINE_integer("rounds", 5, "Rounds, each building every pipeline afresh.", lower_bound=1)
flags.DEFINE_string("output_dir", os.path.join(common.ROOT, "benchmarks", "results"),
                    "Reports go here.")

OUT = (64, 64)
BATCH = 32
CHUNK = 16
SIDES = (96, 128, 160, 200, 256, 320)


def generate(work_dir: str, n: int) -> dict[str, str]:
    """The JPEG folder and the PNG shards; skipped where already complete."""
    import tensorflow as tf

    from core import prepare, shapes

    paths = {"folder of JPEGs": os.path.join(work_dir, f"jpeg-{n}"),
             "TFRecord of PNGs": os.path.join(work_dir, f"tfrecord-{n}")}
    done = os.path.join(work_dir, f"done-{n}")
    if os.path.exists(done):
        return paths
    base = shapes.load(seed=5, sizes={"train": min(n, 2000), "test": 1})["train"][0]

    def image(i):
        h = tf.gather(SIDES, i % len(SIDES))
        w = tf.gather(SIDES, (i // len(SIDES)) % len(SIDES))
        x = tf.image.resize(tf.gather(base, i % len(base)), [h, w], method="bicubic")
        noise = tf.random.stateless_normal(tf.shape(x), seed=[7, i], stddev=4.0)
        return tf.cast(tf.clip_by_value(tf.round(x + noise), 0, 255), tf.uint8)

    ds = tf.data.Dataset.range(n).map(
        lambda i: (tf.io.encode_jpeg(image(i), quality=90), tf.io.encode_png(image(i)),
                   tf.shape(image(i))), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    os.makedirs(os.path.join(paths["folder of JPEGs"], "train", "all"), exist_ok=True)
    os.makedirs(paths["TFRecord of PNGs"], exist_ok=True)
    shards = 4
    writers = [tf.io.TFRecordWriter(os.path.join(paths["TFRecord of PNGs"],
                                                 f"train-{s:05d}-of-{shards:05d}"))
               for s in range(shards)]
    for i, (jpg, png, shape) in enumerate(ds.as_numpy_iterator()):
        with open(os.path.join(paths["folder of JPEGs"], "train", "all", f"{i:06d}.jpg"),
                  "wb") as f:
            f.write(jpg)
        writers[i * shards // n].write(prepare.example(png, tuple(shape), -1).SerializeToString())
    for writer in writers:
        writer.close()
    open(done, "w").close()
    return paths


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from core import data, runner, sources

    paths = generate(FLAGS.work_dir, FLAGS.num_images)
    folder = sources.open_folder(paths["folder of JPEGs"], "train", OUT, 3, "crop", "error")[0]
    shards = sources.open_tfrecord(paths["TFRecord of PNGs"], "train", "train", OUT, 3, "crop")
    assert not folder.decoding.exact and not shards.decoding.exact and not shards.raw_channels

    def copies_of_folder(indices):
        files = tf.gather(tf.constant(folder.paths), indices)
        return tf.stack([folder.decoding(tf.io.read_file(files[j]))
                         for j in range(indices.shape[0])])

    def copies_of_records(records):
        encoded = tf.io.parse_example(records, {shards.image_key: shards.features[
            shards.image_key]})[shards.image_key]
        return tf.stack([shards.decoding(encoded[j]) for j in range(records.shape[0])])

    def chunks(source):  # what data.train_dataset feeds decode_chunk: k indices or records
        if source is folder:
            return tf.data.Dataset.range(folder.num_examples).repeat()
        return shards.records().repeat()

    forms = {("folder of JPEGs", "k traced copies"): (folder, copies_of_folder),
             ("folder of JPEGs", "traced once"): (folder, folder.decode_chunk),
             ("TFRecord of PNGs", "k traced copies"): (shards, copies_of_records),
             ("TFRecord of PNGs", "traced once"): (shards, shards.decode_chunk)}

    def build(source, decode_chunk):
        ds = chunks(source).batch(CHUNK, drop_remainder=True)
        ds = ds.map(decode_chunk, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.rebatch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    times = {key: {"build_s": [], "first_batch_s": [], "images_per_sec": []} for key in forms}
    firsts = {}
    for r in range(FLAGS.rounds):
        order = list(forms) if r % 2 == 0 else list(reversed(forms))
        for key in order:
            start = time.perf_counter()
            ds = build(*forms[key])
            built = time.perf_counter()
            iterator = iter(ds)
            firsts[key] = next(iterator).numpy()
            first = time.perf_counter()
            for _ in range(FLAGS.batches):
                next(iterator).numpy()
            end = time.perf_counter()
            times[key]["build_s"].append(built - start)
            times[key]["first_batch_s"].append(first - built)
            times[key]["images_per_sec"].append(FLAGS.batches * BATCH / (end - first))
            del iterator, ds
        for source in ("folder of JPEGs", "TFRecord of PNGs"):  # the same pixels, or no report
            np.testing.assert_array_equal(firsts[(source, "k traced copies")],
                                          firsts[(source, "traced once")])

    # The figures' examples: the same records, one pipeline against one at a time.
    positions = data.spread(shards.num_examples, runner.MAX_FIGURE_EXAMPLES)

    def one_at_a_time():
        starts = np.cumsum([0, *shards.counts[:-1]])
        shard_of = np.searchsorted(starts, positions, side="right") - 1
        parsed = []
        for shard in np.unique(shard_of):
            offsets = positions[shard_of == shard] - starts[shard]
            wanted = tf.constant(offsets)
            records = shards.shard_records(shards.files[shard], shards.skips[shard],
                                           offsets[-1] + 1)
            parsed += [shards.parse(r)[0] for _, r in records.enumerate().filter(
                lambda i, _, wanted=wanted: tf.reduce_any(tf.equal(i, wanted)))]
        return np.stack([p.numpy() for p in parsed])

    reads = {"one pipeline (TFRecordSource.examples)": lambda: shards.examples(positions)[0],
             "each record eagerly": one_at_a_time}
    read_s = {name: [] for name in reads}
    for r in range(FLAGS.rounds):
        got = {}
        for name in (list(reads) if r % 2 == 0 else list(reversed(reads))):
            start = time.perf_counter()
            got[name] = reads[name]()
            read_s[name].append(time.perf_counter() - start)
        np.testing.assert_array_equal(*got.values())

    def stat(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values),
                "rounds": values}

    rows = []
    for (source, form), t in times.items():
        ready = [b + f for b, f in zip(t["build_s"], t["first_batch_s"])]
        rows.append({"source": source, "form": form, "ready_s": stat(ready),
                     **{k: stat(v) for k, v in t.items()}})
    for row in rows:
        base = next(r for r in rows if r["source"] == row["source"]
                    and r["form"] == "k traced copies")
        row["ready_saved_s"] = base["ready_s"]["median"] - row["ready_s"]["median"]
        row["rate_vs_copies"] = row["images_per_sec"]["median"] / base["images_per_sec"]["median"]

    examples = [{"form": name, "seconds": stat(t),
                 "speedup": statistics.median(read_s["each record eagerly"]) /
                 statistics.median(t)} for name, t in read_s.items()]
    context = common.machine_context(with_peaks=False)
    config = {"num_images": FLAGS.num_images, "batches": FLAGS.batches, "rounds": FLAGS.rounds,
              "batch": BATCH, "chunk": CHUNK, "output": list(OUT),
              "figure_examples": len(positions)}
    lines = ["# A chunk of image files decoded in one map call, in two forms\n",
             common.context_markdown(context),
             f"{FLAGS.num_images:,} images of 96-320 px a side to 64x64x3, batches of {BATCH} "
             f"in chunks of {CHUNK}; each round builds every pipeline afresh, interleaved. "
             "Ready: the pipeline's build (the map's trace) plus its first batch; images/s: "
             f"the next {FLAGS.batches} batches. Medians of {FLAGS.rounds} rounds (range). "
             "The module docstring of `benchmarks/decode_forms.py` says what each form is.\n",
             "| source | form | ready, s | build, s | first batch, s | images/s | "
             "x k copies |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['form']} | {r['ready_s']['median']:.2f} "
            f"({r['ready_s']['min']:.2f}-{r['ready_s']['max']:.2f}) | "
            f"{r['build_s']['median']:.2f} | {r['first_batch_s']['median']:.2f} | "
            f"{r['images_per_sec']['median']:,.0f} ({r['images_per_sec']['min']:,.0f}-"
            f"{r['images_per_sec']['max']:,.0f}) | {r['rate_vs_copies']:.2f}x |")
    lines += ["", f"The figures' examples: {len(positions):,} spread over the TFRecord split, "
              f"read, parsed and decoded; seconds, median of {FLAGS.rounds} rounds (range).\n",
              "| form | seconds | x each record eagerly |", "| --- | ---: | ---: |"]
    lines += [f"| {e['form']} | {e['seconds']['median']:.2f} ({e['seconds']['min']:.2f}-"
              f"{e['seconds']['max']:.2f}) | {e['speedup']:.2f}x |" for e in examples]
    common.write_report(FLAGS.output_dir, "decode_forms",
                        {"context": context, "config": config, "results": rows,
                         "figure_examples": examples}, lines)


if __name__ == "__main__":
    common.run(main)
