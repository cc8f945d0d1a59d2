"""Datasets (mnist, fashion_mnist, fontdigits, synthetic) and their tf.data pipelines.

Images stay uint8 in host memory. The training order is a function of
(seed, epoch) alone, `epoch_permutation`, so a run resumed at step s draws
exactly the batches an uninterrupted run would have, and the on-device path can
draw the same ones without a tf.data iterator.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import socket
import time
import zipfile

from absl import logging
import numpy as np
import tensorflow as tf

from core import idx
from core.errors import ConfigError, DataError, WriteError, first_line, write_reason

# Where Keras' own loaders fetch from, and the file names they cache.
MNIST_NPZ_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
FASHION_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_SPLIT_RE = re.compile(r"^(\w+)(?:\[(-?\d+%?)?:(-?\d+%?)?\])?$")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory: uint8 images (N, H, W, C) and int64 labels (N,) or None."""

    images: np.ndarray
    labels: np.ndarray | None
    name: str
    class_names: tuple[str, ...] = ()  # label i's name, where the dataset has them
    kind = "memory"
    indexable = True

    def describe(self) -> str:
        return f"{self.num_examples:,} images in memory"

    def examples(self, positions) -> tuple[np.ndarray, np.ndarray | None]:
        """The examples at `positions` (ascending) and their labels."""
        index = np.asarray(positions, np.int64)
        return self.images[index], (self.labels[index] if self.labels is not None else None)

    @property
    def num_examples(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])


def spread(num_examples: int, k: int) -> np.ndarray:
    """The positions of `k` examples evenly spaced over `num_examples` (all of them if
    there are no more than `k`), ascending from the first: the examples the figures show.
    A folder split is in path order, a class after another, and so are shards written from
    it: its first examples would show its first class only."""
    if num_examples <= k:
        return np.arange(num_examples, dtype=np.int64)
    return np.arange(k, dtype=np.int64) * num_examples // k


def parse_split(spec: str, sizes: dict[str, int] | None = None) -> tuple[str, slice]:
    """'test[:8000]', 'train[10%:]', 'test[-20%:]' -> ('test', slice).

    Percentages are of the whole split, rounded to the nearest example, as TFDS does.
    """
    m = _SPLIT_RE.match(spec.replace(" ", ""))
    if not m:
        raise ConfigError(f"split {spec!r}: expected a name like 'train', optionally sliced "
                        "like 'test[:8000]' or 'train[:10%]'")
    name, lo, hi = m.groups()
    if sizes is not None and name not in sizes:
        raise ConfigError(f"split {spec!r}: unknown split {name!r}, choose from {', '.join(sizes)}")
    total = sizes[name] if sizes is not None else None

    def bound(text):
        if text is None:
            return None
        if text.endswith("%"):
            pct = int(text[:-1])
            if not -100 <= pct <= 100:
                raise ConfigError(f"split {spec!r}: percentage {pct}% is outside -100..100")
            if total is None:
                raise ConfigError(f"split {spec!r}: percentages need the split size")
            return int(round(pct * total / 100))
        return int(text)

    return name, slice(bound(lo), bound(hi))


def _locate(data_dir: str, names: tuple[str, ...], what: str) -> str:
    for name in names:
        path = os.path.join(data_dir, name)
        if tf.io.gfile.exists(path):
            return path
    raise DataError(
        f"--data_dir={data_dir} has no {what}: expected {' or '.join(names)} there "
        "(or mnist.npz for mnist)")


# Zalando's names of Fashion-MNIST's labels 0-9 (the dataset's README).
FASHION_CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                       "Sneaker", "Bag", "Ankle boot")


def _keras_fetch(fname: str, origin: str, subdir: str, sha256: str | None) -> str:
    """Downloads into Keras' cache (~/.keras/datasets) unless already there."""
    try:
        return tf.keras.utils.get_file(fname, origin=origin, file_hash=sha256,
                                       cache_subdir=subdir)
    except Exception as e:  # get_file raises a bare Exception on network errors
        after_url = first_line(e, 10_000).split(" -- ", 1)[-1]  # Keras prefixes the URL again
        reason = first_line(after_url, 100)
        raise DataError(
            f"could not download {origin} ({reason}): if this machine is "
            f"offline, put the files in a folder and pass --data_dir=FOLDER, or use "
            "--dataset=fontdigits, which needs no download") from None


def _load_idx_split(dataset: str, split: str, data_dir: str | None, verify: bool) -> Split:
    if split not in IDX_FILES:
        raise DataError(f"{dataset} has splits train and test, not {split!r}")
    images_name, labels_name = IDX_FILES[split]
    if data_dir is not None:
        if not tf.io.gfile.isdir(data_dir):
            raise DataError(f"--data_dir={data_dir} is not a folder: give the folder that holds "
                            f"{images_name}.gz and {labels_name}.gz")
        npz = os.path.join(data_dir, "mnist.npz")
        has_idx = any(tf.io.gfile.exists(os.path.join(data_dir, n + s))
                      for n in (images_name,) for s in (".gz", ""))
        if dataset == "mnist" and tf.io.gfile.exists(npz) and not has_idx:
            return _load_npz(npz, split, verify)
        images_path = _locate(data_dir, (images_name + ".gz", images_name), f"{split} images")
        labels_path = _locate(data_dir, (labels_name + ".gz", labels_name), f"{split} labels")
    elif dataset == "mnist":
        return _load_npz(_keras_fetch("mnist.npz", MNIST_NPZ_URL, "datasets",
                                      idx.SHA256["mnist"]["mnist.npz"]), split, verify)
    else:
        subdir = os.path.join("datasets", "fashion-mnist")
        paths = [_keras_fetch(n + ".gz", FASHION_URL + n + ".gz", subdir,
                              idx.SHA256[dataset][n + ".gz"]) for n in (images_name, labels_name)]
        images_path, labels_path = paths
    images, labels = idx.read_images_and_labels(images_path, labels_path, dataset, verify)
    return Split(images, labels, split,
                 FASHION_CLASS_NAMES if dataset == "fashion_mnist" else ())


def _load_npz(path: str, split: str, verify: bool) -> Split:
    if verify:
        idx.verify_checksum(path, "mnist")
    try:
        with tf.io.gfile.GFile(path, "rb") as raw, np.load(io.BytesIO(raw.read()),
                                                           allow_pickle=False) as f:
            images, labels = f[f"x_{split}"], f[f"y_{split}"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, tf.errors.OpError) as e:
        raise DataError(f"{path}: not a readable Keras mnist.npz ({e}): download it again") from None
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: {split} images {images.shape} and labels {labels.shape} do not "
                        "match MNIST's layout: download it again")
    return Split(images[..., None].astype(np.uint8), labels.astype(np.int64), split)


def load_split(spec: str, dataset: str, data_dir: str | None = None, verify: bool = True,
               synthetic_shape: tuple[int, int, int] = (28, 28, 1),
               sizes: dict[str, int] | None = None) -> Split:
    """Loads the split `spec` (e.g. 'test[:8000]') of `dataset` into memory.

    Only the files of the named split are read. `sizes` overrides the split sizes
    of the generated datasets (fontdigits, synthetic), for tests.

    Raises:
      DataError: unknown split, missing, corrupted or unreachable files.
      ConfigError: a `data_dir` that a built-in dataset would ignore.
    """
    from core.config import check_data_dir_is_read

    check_data_dir_is_read(dataset, data_dir)
    if dataset == "shapes":
        from core import shapes

        sizes = sizes or shapes.SPLIT_SIZES
    sizes = sizes or SPLIT_SIZES
    name, sl = parse_split(spec, sizes)
    if dataset in ("mnist", "fashion_mnist"):
        split = _load_idx_split(dataset, name, data_dir, verify)
    elif dataset == "fontdigits":
        from core import fontdigits

        images, labels = fontdigits.load(seed=0, sizes=sizes)[name]
        split = Split(images, labels, name)
    elif dataset == "shapes":
        images, labels = shapes.load(seed=0, sizes=sizes)[name]
        split = Split(images, labels, name, shapes.CLASS_NAMES)
    elif dataset == "synthetic":
        rows = range(sizes[name])[sl]
        images = synthetic_images(name, rows, synthetic_shape)
        split = Split(images, None, name)
        sl = slice(None)  # generated already sliced
    else:
        raise DataError(f"unknown dataset {dataset!r}")
    images = split.images[sl]
    if len(images) == 0:
        raise ConfigError(f"split {spec!r} of {dataset} is empty ({split.num_examples} examples "
                        "before slicing): widen the slice")
    labels = split.labels[sl] if split.labels is not None else None
    return Split(images, labels, spec, split.class_names)


@dataclasses.dataclass
class Opened:
    """A split ready to feed, and what the checks found on the way."""

    source: object  # Split, sources.FolderSource or sources.TFRecordSource
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # path: reason
    upscaled: int = 0  # images smaller than --image_size


def open_split(spec: str, dataset: str, data_dir: str | None = None, verify: bool = True,
               synthetic_shape: tuple[int, int, int] = (28, 28, 1), image_size=None,
               channels: int | None = None, resize: str = "crop", bad_images: str = "error",
               sizes: dict[str, int] | None = None, image_feature: str | None = None) -> Opened:
    """The split `spec` of any dataset: in memory for the built-in ones, streamed from
    files for folder and tfrecord. `image_size` (H, W) defaults to the first image's;
    `channels` to 1 if a folder's images are all greyscale (shards: the first image's),
    else 3; `image_feature`: the records' feature that holds the image (tfrecord,
    tfds).

    Raises:
      DataError: missing, unreadable or undecodable files (exit 3).
      ConfigError: a bad split or slice (exit 2).
    """
    from core import sources

    if dataset == "folder":
        with sources.utf8_names(data_dir):
            source, skipped, upscaled = sources.open_folder(data_dir, spec, image_size, channels,
                                                            resize, bad_images)
        return Opened(source, skipped, upscaled)
    if dataset == "tfrecord":
        name, _ = parse_split(spec.split("[", 1)[0])  # the name; a slice is refused there
        with sources.utf8_names(data_dir):
            return Opened(sources.open_tfrecord(data_dir, spec, name, image_size, channels,
                                                resize, image_feature))
    if dataset.startswith("tfds:"):
        return Opened(sources.open_tfds(dataset[len("tfds:"):], data_dir, spec, image_size,
                                        channels, resize, image_feature))
    split = load_split(spec, dataset, data_dir, verify, synthetic_shape, sizes)
    if image_size is None and channels is None:
        return Opened(split)
    h, w, c = split.image_shape
    size = tuple(image_size) if image_size else (h, w)
    if size == (h, w) and (channels or c) == c:
        return Opened(split)  # already as asked: no copy, no resize pipeline
    upscaled = split.num_examples if (h < size[0] or w < size[1]) else 0
    return Opened(Split(resize_array(split.images, size, channels or c, resize), split.labels,
                        split.name, split.class_names), upscaled=upscaled)


def shared_examples(dataset: str, data_dir: str | None, train_spec: str, eval_spec: str,
                    train_source, eval_source) -> int:
    """How many examples of the eval split the training split holds too: slices of one
    split that overlap (`test[:5000]` and `test[4000:]`), or one split for both (shards
    cannot be sliced). Folders compare their files; the others their slices' indices.
    `train_source` may be None (an evaluation, which does not open it)."""
    name, other = (spec.split("[", 1)[0].strip() for spec in (train_spec, eval_spec))
    if name != other:
        return 0
    paths = getattr(train_source, "paths", None), getattr(eval_source, "paths", None)
    if dataset == "folder" and paths[0] is None and paths[1] is not None:
        from core import sources  # an evaluation opens no training split: list its files

        paths = sources.split_paths(data_dir, train_spec), paths[1]
    if paths[0] is not None and paths[1] is not None:
        return len(set(paths[0]) & set(paths[1]))
    if dataset == "tfrecord":
        return eval_source.num_examples
    if dataset.startswith("tfds:"):
        from core import sources

        splits = sources.tfds_builder(dataset[len("tfds:"):], data_dir).info.splits
        sizes = {name: splits[name].num_examples}
    elif dataset == "shapes":
        from core import shapes

        sizes = shapes.SPLIT_SIZES
    else:
        sizes = SPLIT_SIZES
    ranges = [range(sizes[name])[parse_split(spec, sizes)[1]] for spec in (train_spec, eval_spec)]
    return max(0, min(r.stop for r in ranges) - max(r.start for r in ranges))


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation without swapping (Linux's
    MemAvailable), or None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _decode_batch(image_bytes: int) -> int:
    """Images `materialize` decodes a batch: 1024, or fewer to keep a batch within 256 MB
    (tf.data's batch fails to allocate one of 5 GB with four times that free)."""
    return max(1, min(1024, 2**28 // max(image_bytes, 1)))


def check_fits_in_memory(sources, flag: str) -> None:
    """Raises ConfigError if decoding `sources` (those not in memory yet) into host memory,
    as `flag` asks, needs more than the memory available: the decode would run for as long
    as the files take, and then the kernel would kill the process without a word."""
    pending = [s for s in sources if s is not None and not isinstance(s, Split)]
    if not pending:
        return
    sizes = [(s.num_examples, int(np.prod(s.image_shape))) for s in pending]
    # The arrays, and `materialize`'s batches in flight while it fills one (3 at most).
    need = sum(n * size for n, size in sizes) + max(
        min(3 * _decode_batch(size), n) * size for n, size in sizes)
    have = available_memory()
    if have is not None and need > have:
        raise ConfigError(
            f"{flag}: decoding {' and '.join(s.name for s in pending)} into memory needs "
            f"{need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB available here: "
            "give --cache=DIR to decode once to disk (or write shards with python -m "
            "core.prepare), or leave the files on disk with --cache=none")


def materialize(source) -> Split:
    """A file source decoded once into a uint8 array in host memory (--cache=memory,
    --data_on_device); an in-memory Split is returned as it is."""
    if isinstance(source, Split):
        return source
    if source.indexable:
        ds = tf.data.Dataset.range(source.num_examples).map(
            lambda i: (source.decode_index(i), tf.constant(-1, tf.int64)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        ds = source.records().map(source.parse, num_parallel_calls=tf.data.AUTOTUNE,
                                  deterministic=True)
    images = np.empty((source.num_examples, *source.image_shape), np.uint8)
    labels = np.empty(source.num_examples, np.int64)
    start = 0
    for batch, label in ds.batch(_decode_batch(int(np.prod(source.image_shape)))).prefetch(2):
        images[start:start + len(batch)] = batch.numpy()
        labels[start:start + len(batch)] = label.numpy()
        start += len(batch)
    if source.labels is not None:
        labels = source.labels
    elif (labels < 0).any():
        labels = None
    logging.info("decoded %s into memory: %.0f MB", source.name, images.nbytes / 2**20)
    return Split(images, labels, source.name, tuple(source.class_names))


def cache_to_dir(source, cache_dir: str):
    """A file source decoded once into TFRecord shards under `cache_dir` (--cache=DIR) and
    streamed from there: raw pixels at the output size instead of the original files.
    Reused by every run with the same files and decoding (the folder's name is a hash
    of both: a folder's paths and their byte sizes, so that images saved again under the
    same names are decoded anew instead of training on the old pixels; shards' names and
    record counts). In-memory datasets are returned as they are.
    """
    if isinstance(source, Split):
        return source
    import contextlib
    import glob
    import hashlib
    import uuid

    from core import process, signals, sources

    elements = (list(zip(source.paths, source.file_sizes)) if getattr(source, "paths", None)
                else list(zip(source.files, source.skips, source.counts)))
    turned = getattr(source, "orientations", None)  # EXIF orientations, where any file has one
    decoding = (source.decoding,) + (() if turned is None else (turned.tolist(),))
    # 2: streamed sources' caches hold their labels (version 1 wrote -1 for every record).
    key = hashlib.sha256(repr((2, source.kind, elements, *decoding)).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"{source.kind}-{key}")
    if not tf.io.gfile.exists(os.path.join(folder, sources.INFO_FILE)):
        logging.info("--cache=%s: decoding %s once into %s", cache_dir, source.name, folder)
        others = tf.io.gfile.glob(glob.escape(folder) + ".tmp-*")
        if others:  # a stop removes its own (removed_if_exiting); a kill -9 cannot
            logging.warning("--cache=%s holds %s, the same cache being decoded by another run, "
                            "or left by a run that was killed: remove it if no run is writing "
                            "it", cache_dir, ", ".join(os.path.basename(o) for o in others))
        staging = folder if "://" in folder else f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with signals.removed_if_exiting(staging):
                _write_cache(source, staging)
        except (WriteError, *process.WRITE_ERRORS) as e:  # a full disk: leave nothing half
            with contextlib.suppress(OSError, tf.errors.OpError):
                tf.io.gfile.rmtree(staging)
            raise WriteError(f"the --cache shards of {source.name} in {cache_dir}",
                             e.reason if isinstance(e, WriteError) else write_reason(e),
                             "free space there or give another --cache, then run the same "
                             "command again") from None
        except BaseException:  # a KeyboardInterrupt from Python (a notebook's stop)
            with contextlib.suppress(OSError, tf.errors.OpError):
                tf.io.gfile.rmtree(staging)
            raise
        if staging != folder:
            try:
                tf.io.gfile.rename(staging, folder)
            except tf.errors.OpError:  # another run cached the same split first
                tf.io.gfile.rmtree(staging)
    d = source.decoding
    cached = sources.open_tfrecord(folder, "train", "train", d.size, d.channels, d.resize)
    cached.name = f"{source.name} (cached in {folder})"
    return cached


def _write_cache(source, staging: str) -> None:
    """Writes `source` as raw shards into `staging`, dataset_info.json last."""
    import json

    from core import prepare, sources

    tf.io.gfile.makedirs(staging)
    shards = max(1, min(64, source.num_examples // 2000))
    written = prepare.write_split(source, "train", staging, shards, gzip=False, encoding="raw")
    info = {"from": source.name, "image_shape": list(source.image_shape),
            "class_names": list(source.class_names), "encoding": "raw",
            "shards": written["shards"]}
    with tf.io.gfile.GFile(os.path.join(staging, sources.INFO_FILE), "w") as f:
        f.write(json.dumps(info, indent=2))  # last: its presence means complete


def resize_array(images: np.ndarray, size: tuple[int, int], channels: int,
                 resize: str) -> np.ndarray:
    """uint8 (N, h, w, c) -> uint8 (N, H, W, channels), as files are decoded (images.fit)."""
    from core import images as images_lib

    def one(x):
        if x.shape[-1] == 1 and channels == 3:
            x = tf.image.grayscale_to_rgb(x)
        elif x.shape[-1] == 3 and channels == 1:
            x = tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(x, tf.float32))), tf.uint8)
        return images_lib.fit(x, size, resize)

    ds = tf.data.Dataset.from_tensor_slices(images).map(one, num_parallel_calls=tf.data.AUTOTUNE)
    return np.concatenate([b.numpy() for b in ds.batch(4096)]) if len(images) else images


_SYNTHETIC_BLOCK = 1000  # images drawn per seed: any slice is generated alone, the same


def synthetic_images(split: str, rows: range, shape: tuple[int, int, int]) -> np.ndarray:
    """Uniform random uint8 images `rows` of synthetic split `split`. Only those rows are
    generated (in blocks seeded by position), so a slice costs only its own memory.

    Raises:
      ConfigError: the slice would need more than MAX_SYNTHETIC_BYTES of memory.
    """
    from core.config import MAX_SYNTHETIC_BYTES

    size = len(rows) * int(np.prod(shape))
    if size > MAX_SYNTHETIC_BYTES:
        raise ConfigError(
            f"--dataset=synthetic: {len(rows):,} images of {'x'.join(map(str, shape))} are "
            f"{size / 2**30:.1f} GiB, over the {MAX_SYNTHETIC_BYTES / 2**30:.0f} GiB limit of "
            "generated data: slice the split smaller, e.g. --train_split='train[:2000]'")
    out = np.empty((len(rows), *shape), np.uint8)
    if not len(rows):
        return out
    first, last = rows[0], rows[-1]
    for block in range(first // _SYNTHETIC_BLOCK, last // _SYNTHETIC_BLOCK + 1):
        lo = block * _SYNTHETIC_BLOCK
        rng = np.random.default_rng([len(split), block])
        images = rng.integers(0, 256, (_SYNTHETIC_BLOCK, *shape), dtype=np.uint8)
        take = [r - lo for r in range(max(first, lo), min(last, lo + _SYNTHETIC_BLOCK - 1) + 1)]
        start = max(first, lo) - first
        out[start:start + len(take)] = images[take[0]:take[-1] + 1]
    return out


def epoch_permutation(num_examples: int, seed, epoch) -> tf.Tensor:
    """The order of epoch `epoch`: a permutation of range(num_examples), int32.

    Stateless (Philox on every device, with and without XLA), so it can be
    recomputed anywhere from (seed, epoch): on the host for tf.data, inside the
    compiled loop for on-device data, and after a restart.
    """
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    noise = tf.random.stateless_uniform([num_examples], seed=key, alg="philox")
    return tf.argsort(noise, stable=True)


def _pipeline_rows(input_context: tf.distribute.InputContext | None) -> tuple[int, int, int]:
    """(replicas in sync, first replica of this pipeline, replicas it feeds)."""
    if input_context is None:
        return 1, 0, 1
    total = input_context.num_replicas_in_sync
    local = total // input_context.num_input_pipelines
    return total, input_context.input_pipeline_id * local, local


def to_float(images: tf.Tensor) -> tf.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]."""
    return tf.cast(images, tf.float32) * (1.0 / 255.0)


def as_source(source):
    """A uint8 array (N, H, W, C) becomes an in-memory `Split`; sources pass through."""
    return Split(source, None, "memory") if isinstance(source, np.ndarray) else source


def window_shuffle(ds: tf.data.Dataset, seed, epoch, window: int) -> tf.data.Dataset:
    """Shuffles within consecutive windows of `window` elements, by a permutation that is a
    function of (seed, epoch, window index): unlike `Dataset.shuffle`, it takes the epoch
    as a tensor, so every epoch of an endless stream is shuffled differently and
    reproducibly."""
    def mix(i, block):
        key = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]), i)
        noise = tf.random.stateless_uniform(tf.shape(block)[:1], seed=key, alg="philox")
        return tf.data.Dataset.from_tensor_slices(tf.gather(block, tf.argsort(noise, stable=True)))

    return ds.batch(window).enumerate().flat_map(mix)


# Files decoded per tf.data map call. Each call of a map function costs tens of
# microseconds of the pipeline's threads whatever it does; one JPEG of 256x256 at 1/4
# scale takes ~200. Decoding 16 per call took the JPEG folder from 1.71x to 2.23x
# Keras' rate (benchmarks/NOTES.md 13). --bad_images=skip decodes one per call: it
# drops what fails, and a chunk would drop its good files with its bad one.
DECODE_CHUNK = 16


def decode_chunk_size(per_replica: int) -> int:
    """The largest chunk up to DECODE_CHUNK that divides a replica's batch: chunks never
    straddle two batches, so a file that fails is found in the step that read it."""
    return max(k for k in range(1, DECODE_CHUNK + 1) if per_replica % k == 0)


def _decoded_chunks(ds: tf.data.Dataset, decode_chunk, per_replica: int) -> tf.data.Dataset:
    """Chunks of a replica's batch (indices or records, k each) -> uint8 batches of
    `per_replica`, decoded k at a time, in order."""
    ds = ds.map(decode_chunk, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.rebatch(per_replica, drop_remainder=True)


def _decoded_skipping_bad(ds: tf.data.Dataset, decode) -> tf.data.Dataset:
    """One example per map call, those that fail dropped (--bad_images=skip)."""
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.ignore_errors()


def _service_shard(ds: tf.data.Dataset, service: str | None) -> tf.data.Dataset:
    """With a tf.data service, each service worker takes every N-th element (a per-replica
    batch of indices or records), before decoding: the dispatcher fills in N and i."""
    if not service:
        return ds
    hint = tf.data.experimental.SHARD_HINT
    return ds.shard(hint, hint)


def wait_for_service(service: str, seconds: float) -> None:
    """Returns once something accepts connections at `service` (grpc://HOST:PORT), trying
    for up to `seconds` (a dispatcher started just after the trainer is fine); raises
    ConfigError otherwise. TensorFlow's client would retry an unreachable dispatcher
    forever, with nothing in the log."""
    host, port = service[len("grpc://"):].rsplit(":", 1)
    deadline, waiting = time.monotonic() + seconds, False
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
            return
        except OSError as e:
            reason = e.strerror or type(e).__name__
        if time.monotonic() >= deadline:
            raise ConfigError(f"--tf_data_service={service}: no dispatcher answers at "
                              f"{host}:{port} ({reason}, for {seconds:g} s): start it first "
                              "(tf.data.experimental.service.DispatchServer), or fix the address")
        if not waiting:
            logging.info("waiting up to %g s for the tf.data service dispatcher at %s:%s (%s)",
                         seconds, host, port, reason)
            waiting = True
        time.sleep(1.0)


def _via_service(ds: tf.data.Dataset, service: str | None) -> tf.data.Dataset:
    """Runs `ds` on the tf.data service at `service`; its workers' outputs are read
    round-robin (coordinated reads), one element per worker per round. With one worker
    that is exactly the local order; with N, every N consecutive steps arrive as a
    round, in the order the workers joined the job (not always worker 0 first)."""
    if not service:
        return ds
    import uuid

    svc = tf.data.experimental.service
    return ds.repeat().apply(svc.distribute(
        processing_mode=svc.ShardingPolicy.HINT, service=service,
        job_name=f"tapeloop-{uuid.uuid4().hex}", consumer_index=0, num_consumers=1))


def train_dataset(images, global_batch_size: int, seed: int, start_step: int = 0,
                  input_context: tf.distribute.InputContext | None = None,
                  skip_bad: bool = False, service: str | None = None) -> tf.data.Dataset:
    """Endless per-replica batches of float32 images in [0, 1].

    `images` is a uint8 array or a source (`Split`, `sources.FolderSource`,
    `sources.TFRecordSource`).

    Indexable sources (arrays, folders): each epoch is `epoch_permutation(n, seed,
    epoch)` cut into n // global_batch_size global batches (the remainder is dropped:
    static shapes, no recompiles). Global batch k is split into per-replica slices in
    replica order; this pipeline yields the slices of its replicas, which the strategy
    hands out round-robin. So the examples of every step are the same for any number
    of replicas or workers, and a folder pipeline decodes only its own replicas' files.

    TFRecord shards are streamed: epoch e reads the shards in the order
    `epoch_permutation(shards, seed, e)`, interleaved, shuffled in windows
    (`window_shuffle`), so the order is again a function of (seed, epoch). A resumed
    run skips the records of the steps already taken before decoding them. Under
    several workers each reads its own shards (shard i goes to worker i mod W).

    skip_bad: drop examples that fail to decode (--bad_images=skip) instead of failing.
    service: `grpc://HOST:PORT` of a tf.data service dispatcher: reading and decoding run
      on its workers (each takes every N-th per-replica batch; they are read back
      round-robin, see `_via_service`). File sources only.
    """
    source = as_source(images)
    total, first, local = _pipeline_rows(input_context)
    per_replica = global_batch_size // total
    if service and isinstance(source, Split):
        raise ConfigError("--tf_data_service sends reading and decoding to other machines; "
                          "in-memory datasets have none: use it with folder, tfrecord or tfds data")
    if not source.indexable:
        return _stream_train(source, per_replica, local, seed, start_step, input_context,
                             skip_bad, service)
    n = source.num_examples
    steps_per_epoch = n // global_batch_size
    if steps_per_epoch == 0:
        raise DataError(f"the training split has {n} examples, fewer than one batch of "
                        f"{global_batch_size}: lower --batch_size or use a larger split")
    start_epoch, skip = divmod(start_step, steps_per_epoch)

    def epoch_batches(epoch):
        order = epoch_permutation(n, seed, epoch)[: steps_per_epoch * global_batch_size]
        return tf.data.Dataset.from_tensor_slices(
            tf.reshape(order, [steps_per_epoch, total, per_replica])[:, first:first + local])

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_batches).skip(skip)
    ds = ds.unbatch()  # (per_replica,) index rows, one per replica in turn
    if isinstance(source, Split):
        host_images = tf.constant(source.images)
        ds = ds.map(lambda rows: to_float(tf.gather(host_images, rows)),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif skip_bad:
        ds = _decoded_skipping_bad(_service_shard(ds, service).unbatch(), source.decode_index)
        ds = _via_service(ds.batch(per_replica, drop_remainder=True).map(to_float), service)
    else:
        k = decode_chunk_size(per_replica)
        chunks = _service_shard(ds, service).map(lambda row: tf.reshape(row, [-1, k])).unbatch()
        ds = _decoded_chunks(chunks, source.decode_chunk, per_replica)
        ds = _via_service(ds.map(to_float), service)
    return ds.prefetch(tf.data.AUTOTUNE)


SHUFFLE_WINDOW = 1024  # records held at once by the TFRecord shuffle (raw, not decoded)
INTERLEAVE_SHARDS = 16  # shards read at once


def _stream_train(source, per_replica: int, local: int, seed: int, start_step: int,
                  input_context, skip_bad: bool, service: str | None) -> tf.data.Dataset:
    files, counts, skips = list(source.files), list(source.counts), list(source.skips)
    if input_context is not None and input_context.num_input_pipelines > 1:
        pid, pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
        files, counts = files[pid::pipelines], counts[pid::pipelines]
        skips = skips[pid::pipelines]
        if not files:
            raise DataError(f"{source.name} has {len(source.files)} shard(s), fewer than the "
                            f"{pipelines} workers: write at least one shard per worker "
                            "(python -m core.prepare --shards=N)")
    local_batch = local * per_replica
    steps_per_epoch = sum(counts) // local_batch
    if steps_per_epoch == 0:
        raise DataError(f"{source.name}: this worker's shards hold {sum(counts)} examples, fewer "
                        f"than one batch of {local_batch}: lower --batch_size")
    start_epoch, skip = divmod(start_step, steps_per_epoch)
    shards = (tf.constant(files), tf.constant(skips, tf.int64), tf.constant(counts, tf.int64))

    def epoch_records(epoch):
        order = epoch_permutation(len(files), seed, epoch)
        records = tf.data.Dataset.from_tensor_slices(
            tuple(tf.gather(t, order) for t in shards)).interleave(
            source.shard_records, cycle_length=min(len(files), INTERLEAVE_SHARDS), block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return window_shuffle(records, seed, epoch, SHUFFLE_WINDOW).take(
            steps_per_epoch * local_batch)

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records)
    ds = ds.skip(skip * local_batch)  # raw records: resuming decodes nothing it skips
    if service:
        ds = _service_shard(ds.batch(per_replica, drop_remainder=True), service).unbatch()
    if source.batch_decodable and not skip_bad:  # raw pixels: decode whole batches
        ds = ds.batch(per_replica, drop_remainder=True).map(
            lambda records: to_float(source.decode_records(records)),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    elif skip_bad:
        ds = _decoded_skipping_bad(ds, source.decode_record)
        ds = ds.batch(per_replica, drop_remainder=True).map(to_float)
    else:
        k = decode_chunk_size(per_replica)
        ds = _decoded_chunks(ds.batch(k, drop_remainder=True), source.decode_chunk, per_replica)
        ds = ds.map(to_float)
    return _via_service(ds, service).prefetch(tf.data.AUTOTUNE)


class DeviceData:
    """The training split held on every replica's device; each step's batch is drawn
    there, inside the compiled loop, with no tf.data iterator.

    Build it inside the strategy's scope. The batches are exactly `train_dataset`'s:
    epoch e's order is `epoch_permutation(n, seed, e)`, computed on the device by
    `reorder`, which the trainer calls from the host between compiled loops (and
    splits loops at epoch ends for), so the loop itself holds no branch. What runs
    where on a GPU (checked against TensorFlow's kernel registry by a test): the
    images are uint8 and drawn with ResourceGather (GatherV2 has no uint8 GPU kernel,
    so `tf.gather` of the read value would copy the split to the host); the order is
    int64 (int32 tensors live in host memory on GPUs). The variables are SyncOnRead:
    every replica holds and updates its own copy on its own device, with no
    cross-device traffic; none is checkpointed, as all of it follows
    from (seed, step).
    """

    def __init__(self, images: np.ndarray, global_batch_size: int, num_replicas: int, seed: int):
        local = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.num_examples = int(images.shape[0])
        self.global_batch_size = int(global_batch_size)
        self.per_replica_batch = self.global_batch_size // num_replicas
        self.steps_per_epoch = self.num_examples // self.global_batch_size
        self.seed = seed
        self.images = tf.Variable(images, name="device_images", **local)
        self.order = tf.Variable(tf.zeros([self.num_examples], tf.int64), name="order", **local)
        self.epoch_on_device = None  # which epoch's order `order` holds (host-side)
        self._reorder = None

    def reorder(self, strategy: tf.distribute.Strategy, epoch: int) -> None:
        """Host side, before a compiled loop: puts epoch `epoch`'s order on every replica."""
        if epoch == self.epoch_on_device:
            return
        if self._reorder is None:
            def assign(e):
                self.order.assign(tf.cast(epoch_permutation(self.num_examples, self.seed, e),
                                          tf.int64))

            self._reorder = tf.function(lambda e: strategy.run(assign, args=(e,)), autograph=False)
        self._reorder(tf.constant(epoch, tf.int64))
        self.epoch_on_device = epoch

    def batch(self, step: tf.Tensor) -> tf.Tensor:
        """This replica's slice of global step `step`'s batch, float32 in [0, 1]. Traced.
        `step` must be in the epoch `reorder` was last called for."""
        k = step % self.steps_per_epoch
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        start = k * self.global_batch_size + tf.cast(replica, tf.int64) * self.per_replica_batch
        rows = tf.slice(self.order.read_value(), tf.reshape(start, [1]),
                        [self.per_replica_batch])
        # ResourceGather on this replica's own copy (`.handle` in replica context).
        return to_float(tf.raw_ops.ResourceGather(resource=self.images.handle, indices=rows,
                                                  dtype=tf.uint8))


def add_eval_noise(clean: tf.Tensor, index: tf.Tensor, noise_factor: float, seed: int) -> tf.Tensor:
    """Example `index` of the eval split, float32 [0, 1], plus its fixed Gaussian noise times
    `noise_factor`, clipped. The noise is a function of (seed, index): the same at
    every evaluation, on every worker, for every source. Traced."""
    key = tf.stack([tf.constant(seed, tf.int64) * 7919 + 271828, tf.cast(index, tf.int64)])
    noise = tf.random.stateless_normal(tf.shape(clean), seed=key, alg="philox")
    return tf.clip_by_value(clean + noise_factor * noise, 0.0, 1.0)


def noisy_copy(images: np.ndarray, noise_factor: float, seed: int, start: int = 0) -> np.ndarray:
    """`add_eval_noise` over uint8 `images`, examples start, start+1, ... of the eval split:
    the inputs the denoiser is evaluated (and shown) on."""
    n = len(images)
    ds = tf.data.Dataset.from_tensor_slices((images, tf.range(start, start + n, dtype=tf.int64)))
    ds = ds.map(lambda x, i: add_eval_noise(to_float(x), i, noise_factor, seed)).batch(max(n, 1))
    return next(iter(ds)).numpy() if n else np.zeros((0, *images.shape[1:]), np.float32)


def eval_dataset(images, global_batch_size: int,
                 input_context: tf.distribute.InputContext | None = None,
                 noise_factor: float = 0.0, seed: int = 0,
                 skip_bad: bool = False) -> tf.data.Dataset:
    """Every example exactly once, in split order, as (inputs, targets, weights) per-replica
    batches.

    Targets are the clean images in [0, 1]; inputs are the same, or with a denoiser
    (`noise_factor` > 0) the targets plus `add_eval_noise`.

    The last global batch is padded with weight-0 copies of the first example so
    every batch has the same shape (one compiled eval step) and every replica gets
    one; metrics are weighted sums, so padding never counts.
    """
    source = as_source(images)
    n = source.num_examples
    total, first, local = _pipeline_rows(input_context)
    per_replica = global_batch_size // total
    num_batches = -(-n // global_batch_size)
    padded = num_batches * global_batch_size
    if source.indexable:
        order = np.concatenate([np.arange(n), np.zeros(padded - n, np.int64)])
        weights = (np.arange(padded) < n).astype(np.float32)
        rows = order.reshape(num_batches, total, per_replica)[:, first:first + local]
        wrows = weights.reshape(num_batches, total, per_replica)[:, first:first + local]
        ds = tf.data.Dataset.from_tensor_slices((rows, wrows)).unbatch()  # per-replica rows
        if isinstance(source, Split):
            host_images = tf.constant(source.images)
            ds = ds.map(lambda r, w: (r, tf.gather(host_images, r), w))
        elif skip_bad:
            ds = _decoded_skipping_bad(ds.unbatch(), lambda i, w: (i, source.decode_index(i), w))
            ds = ds.batch(per_replica, drop_remainder=True)
        else:
            k = decode_chunk_size(per_replica)
            ds = ds.map(lambda r, w: (tf.reshape(r, [-1, k]), tf.reshape(w, [-1, k]))).unbatch()
            ds = _decoded_chunks(ds, lambda i, w: (i, source.decode_chunk(i), w), per_replica)
    else:  # streamed in shard order; this pipeline keeps its replicas' positions
        records = source.records().enumerate()
        pad = records.take(1).map(lambda i, r: (i, r)).repeat(padded - n)
        weights = tf.data.Dataset.from_tensor_slices(
            (np.arange(padded) < n).astype(np.float32))
        ds = tf.data.Dataset.zip(records.concatenate(pad), weights).enumerate()

        def mine(position, element):
            replica = (position % global_batch_size) // per_replica
            return tf.logical_and(replica >= first, replica < first + local)

        ds = ds.filter(mine).map(lambda _, e: (e[0][0], e[0][1], e[1]))  # (index, record, w)
        if skip_bad:
            ds = _decoded_skipping_bad(ds, lambda i, r, w: (i, source.decode_record(r), w))
            ds = ds.batch(per_replica, drop_remainder=True)
        else:
            ds = _decoded_chunks(ds.batch(decode_chunk_size(per_replica), drop_remainder=True),
                                 lambda i, r, w: (i, source.decode_chunk(r), w), per_replica)

    def finish(index, image, w):
        targets = to_float(image)
        if not noise_factor:
            return targets, targets, w
        inputs = tf.map_fn(lambda a: add_eval_noise(a[0], a[1], noise_factor, seed),
                           (targets, index), fn_output_signature=tf.float32)
        return inputs, targets, w

    return ds.map(finish).prefetch(tf.data.AUTOTUNE)
