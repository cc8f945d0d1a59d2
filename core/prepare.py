"""`python -m core.prepare`: any dataset tapeloop reads -> sharded TFRecord files.

    python -m core.prepare --dataset=folder --data_dir=photos --image_size=64,64 \\
        --output_dir=shards --shards=8

writes, for every split of the dataset, `<split>-00000-of-00008` ... of
`tf.train.Example`s with Model Garden's keys (`image/encoded` PNG bytes,
`image/format`, `image/height`, `image/width`, `image/channels`,
`image/class/label`), in the split's order, plus `dataset_info.json` (examples and
bytes per shard, the image shape, class names), which lets `--dataset=tfrecord`
start without counting records and find truncated shards. Images are stored as
decoded and resized (PNG, lossless, uncompressed by default: decoding is what a
training input pipeline spends its time on), so training decodes small images.

`--encoding=raw` stores the pixels themselves (`image/format` "raw", TF-slim's
convention: uint8 bytes in height, width, channels order): the same size as
uncompressed PNG, and reading them costs a reshape instead of a PNG decode
(benchmarks/NOTES.md section 13). Tools that only decode JPEG or PNG cannot read them.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

from absl import app, flags, logging

ENCODINGS = ("png", "raw")


def define_flags() -> None:
    """The command line's flags (defined only when run as a program, so importing this
    module beside train.py defines nothing)."""
    flags.DEFINE_string("dataset", None, "What to convert: folder, mnist, fashion_mnist, fontdigits, "
                        "shapes, synthetic, tfrecord (your own shards, rewritten: resized, as "
                        "raw pixels), or tfds:NAME[/CONFIG].")
    flags.DEFINE_string("data_dir", None, "The dataset's --data_dir (folder: your images).")
    flags.DEFINE_list("splits", None, "Splits to write (default: every split of a folder; "
                      "otherwise train and the split train.py evaluates by default); "
                      "slices allowed, e.g. train[:90%],train[90%:] (written as train and test).")
    flags.DEFINE_list("image_size", None, "HEIGHT,WIDTH to resize to, or one number for a "
                      "square (default: the first image's).")
    flags.DEFINE_integer("channels", None, "1 or 3 (default: 1 if a folder's images are all "
                         "greyscale, shards: the first image's; else 3).")
    flags.DEFINE_enum("resize", "crop", ("crop", "pad", "stretch"), "How images are fitted.")
    flags.DEFINE_enum("bad_images", "error", ("error", "skip"), "Undecodable files: stop, or skip them.")
    flags.DEFINE_string("image_feature", None, "--dataset=tfrecord or tfds:NAME: the feature "
                        "that holds the image (default: image/encoded, else the one that does; "
                        "TFDS: image, or its only Image feature).")
    flags.DEFINE_string("output_dir", None, "Where the shards go (created; gs:// works).")
    flags.DEFINE_integer("shards", 4, "Shards per split (at least one per worker you will train on).")
    flags.DEFINE_bool("gzip", False, "GZIP-compress the shards.")
    flags.DEFINE_enum("encoding", "png", ENCODINGS, "How images are stored: png (any reader "
                      "decodes it) or raw (uint8 pixels: the fastest to read; README).")
    flags.DEFINE_integer("png_compression", 0, "PNG compression level of the stored images: 0 "
                         "(none: ~2.4x faster to decode, ~1.5x the bytes; README) to 9.")
    flags.DEFINE_bool("overwrite", False, "Replace shards already in --output_dir.")


def _feature(value):
    import tensorflow as tf

    if isinstance(value, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def example(encoded: bytes, shape, label: int, fmt: str = "png"):
    """One tf.train.Example with Model Garden's (TF-slim's) image keys."""
    import tensorflow as tf

    h, w, c = shape
    return tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": _feature(encoded), "image/format": _feature(fmt.encode()),
        "image/height": _feature(h), "image/width": _feature(w), "image/channels": _feature(c),
        "image/class/label": _feature(label)}))


def write_split(source, split: str, output_dir: str, shards: int, gzip: bool,
                progress=None, png_compression: int = 0, encoding: str = "png") -> dict:
    """Writes `source` (any tapeloop source) as `shards` TFRecord files, in order, each
    image as PNG or, with encoding="raw", as its uint8 pixels.

    Returns:
      {"split", "examples", "bytes", "shards": [{"file", "examples", "bytes"}]}.
    """
    import contextlib

    import numpy as np
    import tensorflow as tf

    from core import data
    from core.errors import WriteError, write_reason
    from core.process import WRITE_ERRORS

    n = source.num_examples
    shards = max(1, min(shards, n))
    bounds = np.linspace(0, n, shards + 1).astype(int)
    # (image, label) pairs: streamed records carry their labels (a TFDS dataset's, your
    # shards'); the others' are known up front.
    labels = source.labels if source.labels is not None else np.full(n, -1, np.int64)
    if isinstance(source, data.Split):
        pairs = tf.data.Dataset.from_tensor_slices((source.images, labels))
    elif source.indexable:
        pairs = tf.data.Dataset.range(n).map(
            lambda i: (source.decode_index(i), tf.gather(tf.constant(labels), i)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        pairs = source.records().map(source.parse, num_parallel_calls=tf.data.AUTOTUNE,
                                     deterministic=True)
    if encoding == "raw":
        encoded = ((x.tobytes(), y) for x, y in pairs.prefetch(64).as_numpy_iterator())
    else:
        encoded = pairs.map(lambda x, y: (tf.io.encode_png(x, compression=png_compression), y),
                            num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True).prefetch(64).as_numpy_iterator()
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    written = []
    done = 0
    for i in range(shards):
        name = f"{split}-{i:05d}-of-{shards:05d}"
        path = os.path.join(output_dir, name)
        tmp = path + ".tmp"
        try:
            with tf.io.TFRecordWriter(tmp, options) as writer:
                for _ in range(bounds[i], bounds[i + 1]):
                    image, label = next(encoded)
                    writer.write(example(image, source.image_shape, int(label),
                                         encoding).SerializeToString())
                    done += 1
                    if progress:
                        progress(split, done, n)
            tf.io.gfile.rename(tmp, path, overwrite=True)
        except WRITE_ERRORS as e:  # a full disk (an image that fails to decode is not one)
            with contextlib.suppress(OSError, tf.errors.OpError):
                tf.io.gfile.remove(tmp)
            raise WriteError(path, write_reason(e)) from None
        written.append({"file": name, "examples": int(bounds[i + 1] - bounds[i]),
                        "bytes": int(tf.io.gfile.stat(path).length)})
    return {"split": split, "examples": n, "bytes": sum(s["bytes"] for s in written),
            "shards": written}


def _bar(split: str, done: int, total: int) -> None:
    if done % 200 and done != total:
        return
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r{split:>10} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}")
    _bar.open = done != total  # a line left open: what is said next starts a line of its own
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


_bar.open = False


def _own_line(text: str) -> str:
    """`text` on a line of its own, after a progress bar cut short (a stop, an error)."""
    return ("\n" if _bar.open else "") + text


def _split_names(dataset: str, data_dir: str | None) -> list[str]:
    """Every split of a folder; a TFDS dataset's training and default eval split."""
    if dataset == "folder":
        from core.sources import folder_splits, warn_unread_split_folders

        splits = folder_splits(data_dir)
        warn_unread_split_folders(data_dir)
        return list(splits) if len(splits) > 1 else ["train[:90%]", "train[90%:]"]
    if dataset.startswith("tfds:"):
        from core.sources import default_splits

        return list(default_splits(dataset, data_dir))
    if dataset == "tfrecord":  # your own shards: every split they have
        from core.sources import shard_splits

        return shard_splits(data_dir) or ["train"]
    return ["train", "test"]


def convert(dataset: str, output_dir: str, data_dir: str | None = None,
            splits: list[str] | None = None, image_size=None, channels: int | None = None,
            resize: str = "crop", bad_images: str = "error", shards: int = 4,
            gzip: bool = False, overwrite: bool = False, progress=_bar,
            png_compression: int = 0, encoding: str = "png",
            image_feature: str | None = None) -> dict:
    """Writes every split of `dataset` (or `splits`) as TFRecord shards in `output_dir`,
    checking every split before writing anything; returns dataset_info.json's content.

    Raises:
      ConfigError, DataError: bad arguments or data (nothing is written).
      WriteError: the disk filled up (the shards written are removed).
    """
    import tensorflow as tf

    from core import data
    from core.config import (DATASETS, check_data_dir_is_read, check_image_feature,
                             check_no_path_in_dataset, expand_home)
    from core.config import image_size as config_image_size
    from core.errors import ConfigError, WriteError
    from core.process import write_file

    output_dir, data_dir = expand_home(output_dir), expand_home(data_dir)

    if not dataset:
        raise ConfigError("--dataset is required: what to convert, e.g. --dataset=folder "
                          "--data_dir=~/photos, or mnist, tfrecord, tfds:NAME")
    check_no_path_in_dataset(dataset, ("folder",))
    if dataset not in DATASETS and not dataset.startswith("tfds:"):
        raise ConfigError(f"--dataset={dataset}: choose one of {', '.join(DATASETS)}, or "
                          "tfds:NAME")
    if not output_dir:
        raise ConfigError("--output_dir is required: the folder the shards go to")
    check_data_dir_is_read(dataset, data_dir)
    from core.sources import reachable

    reachable(data_dir, "--data_dir")
    reachable(output_dir, "--output_dir")

    def where(path):
        return path.rstrip("/") if "://" in path else os.path.realpath(path)

    if data_dir and where(output_dir) == where(data_dir):
        raise ConfigError(f"--output_dir={output_dir} is --data_dir: the shards written would "
                          + ("join the split they are written from" if dataset == "tfrecord" else
                             "go in among your data")
                          + "; choose another folder, e.g. --output_dir=" +
                          (data_dir.rstrip("/") + "-shards"))
    check_image_feature(dataset, image_feature)
    if shards < 1:
        raise ConfigError(f"--shards={shards}: must be >= 1")
    if encoding not in ENCODINGS:
        raise ConfigError(f"--encoding={encoding}: choose one of {', '.join(ENCODINGS)}")
    if not -1 <= png_compression <= 9:
        raise ConfigError(f"--png_compression={png_compression}: 0 (none) to 9, or -1 (zlib's)")
    try:
        size = config_image_size([int(v) for v in image_size]) if image_size else None
    except ValueError:  # not numbers: the same line as numbers that are not sizes
        raise ConfigError(f"--image_size={','.join(image_size)}: give HEIGHT,WIDTH as two "
                          "positive numbers, e.g. 64,48, or one for a square, e.g. 64") from None
    if channels not in (None, 1, 3):  # (2 wrote the images' own channels, without a word)
        raise ConfigError(f"--channels={channels}: 1 (greyscale) or 3 (RGB)")
    specs = list(splits or _split_names(dataset, data_dir))
    if len(set(specs)) != len(specs):  # (train,train wrote train's images as train and test)
        raise ConfigError(f"--splits={','.join(specs)}: names a split twice; give each once")
    names = [s.split("[")[0] for s in specs]
    if len(specs) == 2 and len(set(names)) == 1:  # train[:90%], train[90%:]
        names = ["train", "test"]
    if len(set(names)) != len(names):
        raise ConfigError(f"--splits={','.join(specs)}: each split must get its own name")
    if tf.io.gfile.glob(os.path.join(glob.escape(output_dir), "*-of-*")) and not overwrite:
        raise ConfigError(f"--output_dir={output_dir} already holds shards: pass --overwrite, or "
                          "choose another folder")
    start = time.monotonic()
    opened = []
    for spec in specs:  # check everything before writing anything
        o = data.open_split(spec, dataset, data_dir, image_size=size, channels=channels,
                            resize=resize, bad_images=bad_images, image_feature=image_feature)
        size = size or o.source.image_shape[:2]  # every split the first split's size
        channels = channels or o.source.image_shape[2]
        opened.append(o)
    tf.io.gfile.makedirs(output_dir)
    try:
        results = [write_split(o.source, name, output_dir, shards, gzip, progress,
                               png_compression, encoding) for o, name in zip(opened, names)]
        # --overwrite: the earlier shards of these splits that were not written over (of
        # another count, or one a stopped prepare left as NAME.tmp), or a reader takes both.
        written = {os.path.join(output_dir, s["file"]) for r in results for s in r["shards"]}
        for name in names:
            for path in tf.io.gfile.glob(os.path.join(glob.escape(output_dir), f"{name}-*-of-*")):
                if path not in written:
                    tf.io.gfile.remove(path)
        info = _info(dataset, data_dir, opened, names, specs, results, gzip, encoding, start)
        write_file(os.path.join(output_dir, "dataset_info.json"), json.dumps(info, indent=2))
    except WriteError as e:  # a full disk: no split left half written
        for name in names:
            for path in tf.io.gfile.glob(os.path.join(glob.escape(output_dir), f"{name}-*-of-*")):
                tf.io.gfile.remove(path)
        raise WriteError(f"the shards in {output_dir}", e.reason, "free space there, then run "
                         "the same command again (the shards written are removed)") from None
    return info


def _info(dataset, data_dir, opened, names, specs, results, gzip, encoding, start) -> dict:
    """dataset_info.json: what was written, from what, and how long it took."""
    return {"dataset": dataset, "data_dir": data_dir,
            "image_shape": list(opened[0].source.image_shape),
            "class_names": list(getattr(opened[0].source, "class_names", ()) or ()),
            "compression": "GZIP" if gzip else "", "encoding": encoding,
            "splits": {name: {"from": spec, "examples": r["examples"], "bytes": r["bytes"]}
                       for name, spec, r in zip(names, specs, results)},
            "shards": [s for r in results for s in r["shards"]],
            "skipped": sorted(p for o in opened for p in o.skipped),
            "seconds": round(time.monotonic() - start, 1)}


def main(argv) -> int:
    del argv
    from core.errors import TapeloopError

    from core import signals

    flag = flags.FLAGS
    # A stop exits at once: the shards written are whole, the one being written is left as
    # NAME.tmp, which readers skip, and without dataset_info.json (written last) a reader
    # finds the set incomplete; --overwrite writes them all again.
    def stopped(signal: str) -> str:
        return _own_line(f"prepare: stopped by {signal}: {flag.output_dir} holds only the "
                         "shards written so far, if any; run the same command with --overwrite "
                         "to write them all")

    try:
        with signals.ExitOnSignals(stopped):
            info = convert(flag.dataset, flag.output_dir, flag.data_dir, flag.splits,
                           flag.image_size, flag.channels, flag.resize, flag.bad_images,
                           flag.shards, flag.gzip, flag.overwrite,
                           png_compression=flag.png_compression, encoding=flag.encoding,
                           image_feature=flag.image_feature)
    except TapeloopError as e:
        print(_own_line(f"prepare: error: {e}"), file=sys.stderr)
        return e.exit_code
    size_mb = sum(s["bytes"] for s in info["shards"]) / 2**20
    total = sum(s["examples"] for s in info["shards"])
    shards = len(info["shards"])
    print(f"wrote {total:,} image{'s' if total != 1 else ''} "
          f"({'x'.join(map(str, info['image_shape']))}) in {shards} shard"
          f"{'s' if shards != 1 else ''}, {size_mb:,.1f} MB, to {flag.output_dir} in "
          f"{info['seconds']:.1f} s"
          + (f"; skipped {len(info['skipped'])} undecodable files" if info["skipped"] else "")
          + "\n" + _next_command(list(info["splits"]), flag.output_dir))
    return 0


def _next_command(splits: list[str], output_dir: str) -> str:
    """The train.py command that reads the splits written, as their names make it: held-out
    shards evaluate a training run, shards of train alone train with --mode=train, shards
    without train evaluate a run."""
    from core.sources import EVAL_SPLITS

    command = f"python train.py --dataset=tfrecord --data_dir={output_dir}"
    held_out = next((s for s in EVAL_SPLITS if s in splits), None)
    other = next((s for s in splits if s != "train"), None)
    if "train" not in splits:
        return f"evaluate a run on them: {command} --mode=eval --model_dir=RUN"
    if held_out:
        return f"train on them: {command}"
    if other:
        return f"train on them: {command} --eval_split={other}"
    return (f"train on them: {command} --mode=train (no held-out split was written to evaluate "
            "on: --splits=train[:90%],train[90%:] writes one)")


def run() -> None:
    import core
    from core import errors

    core.quiet_tensorflow()
    define_flags()
    logging.set_verbosity(logging.WARNING)
    app.run(lambda argv: sys.exit(main(argv)),
            flags_parser=errors.flags_parser("prepare", "python -m core.prepare"))


if __name__ == "__main__":
    run()
