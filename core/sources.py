"""Sources that decode files: a folder of images and TFRecord shards.

A source is one split. It lists its elements (file paths, or shards of
records), knows how many examples it has and their shape, and decodes one
element to uint8 [H, W, C] (`core.images.decode`). `core.data` builds the one
tf.data pipeline they all share; nothing here holds decoded images, except
`examples`, which decodes the few the figures show.

Folder layout: every JPEG/PNG/WebP/BMP/GIF under the folder, recursively, in sorted
path order. A `train/` subfolder and its siblings `test/`, `validation/`, `val/`,
`valid/` are the splits; otherwise the whole folder is the split `train`. The first folder level inside
a split names the class, as in `keras.utils.image_dataset_from_directory`.

TFRecord layout: `train-*` and `test-*` (or `validation-*`, ..., or `train.tfrecord`: `split_of`)
shards of `tf.train.Example`s with Model Garden's keys (`image/encoded`, `image/format`,
`image/height`, `image/width`, `image/class/label`; others are found by `_image_feature`),
optionally GZIP-compressed, plus the
`dataset_info.json` that `python -m core.prepare` writes (example counts and
byte sizes per shard; without it the shards are counted once at start-up).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import glob
import json
import os
import re
import time

from absl import logging
import numpy as np
import tensorflow as tf

from core import images as images_lib
from core import signals
from core.errors import ConfigError, DataError, first_line, op_error_reason

INFO_FILE = "dataset_info.json"
# A folder's subfolders (and a shard's file prefix) that name splits; the first of
# EVAL_SPLITS present is the default --eval_split ("val" is ImageNet's and many
# datasets' folder, "valid" fastai's).
EVAL_SPLITS = ("test", "validation", "val", "valid")
SPLIT_FOLDERS = ("train", *EVAL_SPLITS)
# Threads for the up-front check of a folder's files. On a local disk the check is
# Pillow reading headers, mostly under the GIL: a few threads are fastest (32 threads
# checked 0.6-0.8x as many files a second as 4: benchmarks/folder_check.py).
# On an object store (gs://, s3://) each file costs requests of tens of ms, during which
# tf.io.gfile releases the GIL, so many threads overlap them; but on gs:// each open file
# holds TensorFlow's read buffer (GCS_READ_CACHE_BLOCK_SIZE_MB, 64 MB by default, filled
# in full), so 64 threads hold up to 4 GB while the check runs.
_SCAN_THREADS_LOCAL = 4
_SCAN_THREADS_REMOTE = 64
SCAN_PROGRESS_SECONDS = 30.0  # how often a long check logs how far it is
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How every file becomes one example: the output size, channels and resize mode.

    jpeg_ratio: when the up-front check found every file a JPEG that libjpeg can decode
    at the same 1/ratio scale, that ratio, fixed (no per-file header read or branch).
    exact: the up-front check found every file a JPEG (at `jpeg_ratio`) or every file a
    PNG that decodes to exactly `size`: nothing to resize, no branch.
    """

    size: tuple[int, int]
    channels: int
    resize: str = "crop"
    jpeg_ratio: int | None = None
    exact: bool = False

    def __call__(self, contents: tf.Tensor, orientation: tf.Tensor | None = None) -> tf.Tensor:
        return images_lib.decode(contents, self.size, self.channels, self.resize,
                                 fixed_ratio=self.jpeg_ratio, exact=self.exact,
                                 orientation=orientation)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.size, self.channels)

    def describe(self) -> str:
        """How files become examples, for the log."""
        size = "x".join(map(str, self.size))
        scaled = f"JPEGs decoded by libjpeg at 1/{self.jpeg_ratio} scale" \
            if self.jpeg_ratio and self.jpeg_ratio > 1 else "decoded"
        if self.exact:
            return f"{scaled} straight to {size}, no resize"
        return f"{scaled}, then resized to {size} where they differ (--resize={self.resize})"


def each(decode, *columns) -> tf.Tensor:
    """`decode` of each row of `columns` (tensors, or dicts of them, whose first dimension
    is a static k), stacked: a chunk's k decodes in one tf.data map call (data.DECODE_CHUNK
    says why). `decode` is traced once and called k times: with k traced copies of it a
    pipeline took 2.4-3.1 s longer to be ready on a 2-core Xeon, and decoded no faster
    (benchmarks/decode_forms.py). It holds TensorFlow ops only, no Python control flow on
    tensors, so AutoGraph is off. Traced."""
    one = tf.function(decode, autograph=False)
    k = tf.nest.flatten(columns)[0].shape[0]
    return tf.stack([one(*tf.nest.map_structure(lambda column, j=j: column[j], columns))
                     for j in range(k)])


# ------------------------------------------------------------------ folder
def folder_splits(data_dir: str) -> dict[str, str]:
    """{split name: its root folder}: the SPLIT_FOLDERS subfolders if train/ is one, else
    {'train': DIR}."""
    if not data_dir:
        raise ConfigError("--dataset=folder needs --data_dir=FOLDER, the folder of your images")
    if not tf.io.gfile.isdir(data_dir):
        archive = data_dir.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar"))
        raise DataError(f"--data_dir={data_dir} is not a folder: give the folder that holds "
                        "your images" + (" (extract the archive into one first)" if archive
                                         else ""))
    present = {name: os.path.join(data_dir, name) for name in SPLIT_FOLDERS
               if tf.io.gfile.isdir(os.path.join(data_dir, name))}
    if "train" in present:  # train/ alone: sliced 90/10 like a flat folder
        return present
    return {"train": data_dir}


# Subfolder names that look like splits; only SPLIT_FOLDERS (beside train/) are read as such.
_SPLIT_LIKE = {"train", "training", "test", "testing", "val", "valid", "validation", "eval",
               "evaluation", "dev", "holdout"}


def warn_unread_split_folders(data_dir: str) -> None:
    """Logs the subfolders of `data_dir` that look like splits (`Training/`, `Test/`,
    `dev/`...) but are read as classes of one split, or not read at all."""
    splits = folder_splits(data_dir)
    try:
        listed = tf.io.gfile.listdir(data_dir)
    except tf.errors.PermissionDeniedError:
        raise DataError(f"--data_dir={data_dir} is not readable (permission denied): fix its "
                        "permissions") from None
    names = sorted(n.rstrip("/") for n in listed if tf.io.gfile.isdir(os.path.join(data_dir, n)))
    odd = [n for n in names if n.lower() in _SPLIT_LIKE and n not in splits]
    if not odd:
        return
    folders = ", ".join(f"{n}/" for n in odd)
    if splits["train"] != data_dir:  # a train/ subfolder: the splits are subfolders
        logging.warning("--data_dir=%s: %s not read (the splits beside train/ are %s); rename "
                        "to one of those to evaluate on it", data_dir, folders,
                        ", ".join(f"{n}/" for n in EVAL_SPLITS))
    else:
        logging.warning("--data_dir=%s has no train/ subfolder, so %s are read as classes of one "
                        "split, train, sliced 90/10; if they are splits, name them %s (lower "
                        "case)", data_dir, folders, ", ".join(f"{n}/" for n in SPLIT_FOLDERS))


def slice_order(paths: list[str], root: str) -> list[int]:
    """The order in which a folder split is sliced (`train[90%:]`): by a hash of each file's
    path inside `root`, not by path, so that a slice of class folders holds every class
    (in path order, the last 10% is the last class's files; of photos named by date, the
    latest), the same wherever the folder is, and adding files moves few others across a
    slice. Keras' `validation_split` shuffles the paths for the same reason; a hash of the
    name is how TensorFlow's image-retraining example kept its validation files fixed.
    Inside a slice, files keep their path order."""
    def key(i):  # every path is under root (list_images)
        return hashlib.sha256(paths[i][len(root):].lstrip("/").encode()).digest()

    return sorted(range(len(paths)), key=key)


@contextlib.contextmanager
def utf8_names(folder: str | None, flag: str = "--data_dir"):
    """Inside the block, a file or folder name under `folder` that is not UTF-8 (a Latin-1
    `café.jpg` from an old archive or Windows share) is an error naming it: TensorFlow's
    folder listing decodes every name as UTF-8 and raised UnicodeDecodeError, a traceback.
    A DataError under --data_dir (where an unnamed one is also assumed to be); under
    another folder (--model_dir), a ConfigError, and only for a name found there."""
    try:
        yield
    except UnicodeDecodeError:
        found = _first_name_not_utf8(folder) if folder and not is_remote(folder) else None
        if flag != "--data_dir" and not found:
            raise
        which = (f"{found.decode('utf-8', 'backslashreplace')} has a name" if found else
                 "a name under it is")
        error = DataError if flag == "--data_dir" else ConfigError
        raise error(f"{flag}={folder}: {which} not in UTF-8, and TensorFlow lists "
                    "folders by UTF-8 names only: rename it (for a tree of Latin-1 names: "
                    f"convmv -f latin1 -t utf8 -r --notest {folder})") from None


def reachable(path: str | None, flag: str) -> None:
    """Raises an error of one line where TensorFlow cannot ask `path`'s file system about
    it: a scheme it has no file system for (`s3://`), or an object store it cannot reach
    (no network, no credentials). TensorFlow's own error is a traceback, and its `isdir`
    says False instead, which reads as a wrong path. A DataError for --data_dir, else a
    ConfigError."""
    if not path:
        return
    error = DataError if flag == "--data_dir" else ConfigError
    try:
        tf.io.gfile.exists(path)
    except tf.errors.UnimplementedError:
        raise error(f"{flag}={path}: TensorFlow has no file system for "
                    f"{path.split('://', 1)[0]}://: give a local path or a gs:// one") from None
    except tf.errors.OpError as e:
        # "All 10 retry attempts failed. The last failure: Error executing an HTTP request:
        # libcurl code 6 meaning '...', error details: Could not resolve host: ...".
        reason = first_line(e.message, limit=10_000)
        for wrapper in (r"^All \d+ retry attempts failed\. The last failure: ",
                        r"^Error executing an HTTP request: .*?error details: "):
            reason = re.sub(wrapper, "", reason)
        reason = first_line(reason)
        who = (" and your credentials (gcloud auth application-default login, or "
               "GOOGLE_APPLICATION_CREDENTIALS)" if path.startswith("gs://") else "")
        raise error(f"{flag}={path}: cannot reach it ({reason}): check the network{who}, "
                    "then run the same command again") from None


def _first_name_not_utf8(folder: str) -> bytes | None:
    for parent, folders, files in os.walk(os.fsencode(folder)):
        folders.sort()
        for name in sorted(folders + files):
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                return os.path.join(parent, name)
    return None


def default_splits(dataset: str, data_dir: str | None) -> tuple[str, str]:
    """(train split, eval split) when the user names none: the first of EVAL_SPLITS
    present for folders, shards and TFDS datasets (a TFDS dataset with only `train` is
    sliced 90/10, as a flat folder), test for the others."""
    with utf8_names(data_dir):
        return _default_splits(dataset, data_dir)


def _default_splits(dataset: str, data_dir: str | None) -> tuple[str, str]:
    if dataset == "folder":
        splits = folder_splits(data_dir)
        warn_unread_split_folders(data_dir)
        if len(splits) == 1:
            return "train[:90%]", "train[90%:]"
        return "train", next(name for name in EVAL_SPLITS if name in splits)
    if dataset == "tfrecord":
        present = shard_splits(data_dir)
        return "train", next((name for name in EVAL_SPLITS if name in present), "test")
    if dataset.startswith("tfds:"):  # imagenette has train and validation, tf_flowers train
        present = tfds_builder(dataset[len("tfds:"):], data_dir).info.splits
        held_out = next((name for name in EVAL_SPLITS if name in present), None)
        if held_out is None and "train" in present:
            return "train[:90%]", "train[90%:]"  # TFDS shuffled the examples when preparing
        return "train", held_out or "test"
    return "train", "test"


def is_run_folder(files: list[str]) -> bool:
    """Whether a folder holding `files` is a training run's output: TensorFlow's checkpoint
    state file or event files (a model dir has its HParams events from its first step)."""
    return "checkpoint" in files or any(f.startswith("events.out.tfevents.") for f in files)


def list_images(root: str) -> tuple[list[str], dict[str, int], list[str], list[str]]:
    """(sorted image paths under `root`, {other extension or name: count}, run folders
    not read, linked folders not read again), recursively.

    Hidden files and folders (named .*) are not read, as `ls` does not show them: macOS
    leaves `._NAME.jpg` resource forks beside copied photos (not images), and notebooks
    `.ipynb_checkpoints/` copies of them. Hidden files are counted as "hidden". Nor are
    training run folders (`is_run_folder`) and what is under them: a --model_dir inside
    the data folder would otherwise add its figures (reconstructions.png, ...) to the
    training images, and another class, from its second run on.

    Links to folders elsewhere are followed (a class folder linked from another disk),
    each real folder once. A link to a folder inside `root` (or holding it) is not: its
    images are read where they are. Followed, a link back to `root` was walked 40 levels
    deep, until the path was too long, and every image was read 40 times, in both slices
    of train[:90%] / train[90%:]. Whatever the order the walk lists folders in, the same
    ones are read."""
    found, others, runs, repeats = [], collections.Counter(), [], []
    local = not is_remote(root)  # object stores have no links
    top = os.path.realpath(root) if local else root
    seen = {top}

    def read_already(path: str) -> bool:
        if not (local and os.path.islink(path)):
            return False
        real = os.path.realpath(path)
        if real in seen or real.startswith(top + os.sep) or top.startswith(real + os.sep):
            return True
        seen.add(real)
        return False

    for folder, subfolders, files in _walk(root):
        if is_run_folder(files):
            runs.append(folder)
            subfolders[:] = []
            continue
        subfolders.sort()  # the links followed, whatever order the walk lists them in
        visible = [d for d in subfolders if not d.startswith(".")]  # walk skips the others
        skipped = {d for d in visible if read_already(os.path.join(folder, d))}
        repeats += [os.path.join(folder, d) for d in visible if d in skipped]
        subfolders[:] = [d for d in visible if d not in skipped]
        for name in files:
            if name.startswith("."):
                others["hidden"] += 1
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in images_lib.EXTENSIONS:
                found.append(os.path.join(folder, name))
            else:
                others[ext or name] += 1
    return sorted(found), dict(sorted(others.items())), sorted(runs), sorted(repeats)


def _walk(root: str):
    """tf.io.gfile.walk, whose one error passed on, a folder it may not list, is one line."""
    try:
        yield from tf.io.gfile.walk(root)
    except tf.errors.PermissionDeniedError as e:
        folder = e.message.rsplit(";", 1)[0]
        if folder.rstrip("/") == root.rstrip("/"):
            raise DataError(f"{root} is not readable (permission denied): fix its "
                            "permissions") from None
        raise DataError(f"{folder} is not readable (permission denied): fix its permissions, "
                        f"or move it out of {root}") from None


def class_labels(root: str, paths: list[str]) -> tuple[np.ndarray | None, list[str]]:
    """Labels from the first folder level under `root`; (None, []) if any image sits at
    the root itself (an unlabelled folder)."""
    firsts = [os.path.relpath(p, root).replace("\\", "/").split("/") for p in paths]
    if not firsts or any(len(parts) < 2 for parts in firsts):
        return None, []
    names = sorted({parts[0] for parts in firsts})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[parts[0]] for parts in firsts], np.int64), names


def is_remote(path: str) -> bool:
    """A path of a filesystem other than the local one (gs://, s3://, ram://, ...)."""
    return "://" in path and not path.startswith("file://")


def scan(paths: list[str], what: str = "files",
         progress_every: float = SCAN_PROGRESS_SECONDS,
         ) -> tuple[list[images_lib.FileInfo | None], dict[str, str]]:
    """check_file on every path, in parallel: (infos, {bad path: reason}). Logs how far it
    is every `progress_every` seconds, naming them `what`."""
    def one(path):
        try:
            return images_lib.check_file(path), None
        except images_lib.BadImage as e:
            return None, str(e)

    threads = _SCAN_THREADS_REMOTE if paths and is_remote(paths[0]) else _SCAN_THREADS_LOCAL
    results = []
    start = last = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for result in pool.map(one, paths):
            signals.interruption_point()
            results.append(result)
            now = time.monotonic()
            if now - last >= progress_every and len(results) < len(paths):
                last, rate = now, len(results) / (now - start)
                logging.info("checking %s: %d of %d files, %.0f files/s, about %.0f s left",
                             what, len(results), len(paths), rate,
                             (len(paths) - len(results)) / rate)
    return [r[0] for r in results], {p: r[1] for p, r in zip(paths, results) if r[1]}


class FolderSource:
    """One split of a folder of images: the sorted paths, their labels, and the decoding.

    orientations: the files' EXIF orientations (images.orient), or None when every file
    is stored upright (then the decode has no orientation step at all).
    file_sizes: the files' lengths in bytes when they were checked (a `--cache=DIR` copy is
    of these files: an image saved again under its name is another file).
    """

    kind = "folder"
    indexable = True

    def __init__(self, name: str, paths: list[str], labels: np.ndarray | None,
                 class_names: list[str], decoding: Decoding,
                 orientations: np.ndarray | None = None, file_sizes: tuple[int, ...] = ()):
        self.name = name
        self.paths = paths
        self.file_sizes = tuple(file_sizes)
        self.labels = labels
        self.class_names = class_names
        self.decoding = decoding
        self.orientations = orientations
        self.image_shape = decoding.image_shape
        self.num_examples = len(paths)

    def _files(self, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
        """The paths of examples `indices` and their EXIF orientations (None: all upright),
        each table put in the graph once per call. Traced."""
        orientations = (None if self.orientations is None
                        else tf.gather(tf.constant(self.orientations), indices))
        return tf.gather(tf.constant(self.paths), indices), orientations

    def describe(self) -> str:
        n = len(self.class_names)
        classes = f"{n} class{'es' if n != 1 else ''}" if n else "unlabelled"
        files = "file" if self.num_examples == 1 else "files"
        return f"{self.num_examples:,} image {files} ({classes})"

    def describe_decoding(self) -> str:
        return self.decoding.describe()

    def decode_index(self, index: tf.Tensor) -> tf.Tensor:
        """Example `index` -> uint8 [H, W, C]. Traced."""
        path, orientation = self._files(index)
        return self.decoding(tf.io.read_file(path), orientation)

    def decode_chunk(self, indices: tf.Tensor) -> tf.Tensor:
        """Examples `indices` (a vector of static length k) -> uint8 [k, H, W, C]: k files
        in one tf.data map call (data.DECODE_CHUNK says why). Traced."""
        paths, orientations = self._files(indices)
        if orientations is None:
            return each(lambda path: self.decoding(tf.io.read_file(path)), paths)
        return each(lambda path, orientation: self.decoding(tf.io.read_file(path), orientation),
                    paths, orientations)

    def examples(self, positions) -> tuple[np.ndarray, np.ndarray | None]:
        """The examples at `positions` (ascending), decoded, and their labels."""
        index = np.asarray(positions, np.int64)
        ds = tf.data.Dataset.from_tensor_slices(index).map(
            self.decode_index, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        images = next(iter(ds.batch(max(len(index), 1)))).numpy()
        return images, (self.labels[index] if self.labels is not None else None)

    def find_bad(self, indices) -> tuple[str, str] | None:
        """The first of `indices` whose file does not decode: (path, reason)."""
        for i in indices:
            path = self.paths[int(i)]
            try:
                orientation = None if self.orientations is None else self.orientations[int(i)]
                self.decoding(tf.io.read_file(path), orientation)
            except (tf.errors.OpError, ValueError) as e:
                return path, op_error_reason(e)
        return None


def split_paths(data_dir: str, spec: str) -> list[str]:
    """The files of folder split `spec` as `open_folder` picks them, neither checked nor
    decoded (no file is opened); none for a split the folder does not have."""
    roots = folder_splits(data_dir)
    name = spec.split("[", 1)[0].strip()
    if name not in roots:
        return []
    paths = list_images(roots[name])[0]
    return [paths[i] for i in _picked(paths, roots[name], spec)]


def _picked(paths: list[str], root: str, spec: str) -> list[int] | range:
    """The indices into `paths` (split `spec`'s files under `root`) that its slice takes,
    in path order: a slice cuts the hash order (`slice_order`), so every class is in both
    `train[:90%]` and `train[90%:]`."""
    from core.data import parse_split

    name = spec.split("[", 1)[0].strip()
    _, sl = parse_split(spec, {name: len(paths)})
    return sorted(slice_order(paths, root)[sl]) if sl != slice(None) else range(len(paths))


def open_folder(data_dir: str, spec: str, image_size, channels, resize: str,
                bad_images: str) -> tuple[FolderSource, dict[str, str], int]:
    """Lists, slices and checks one folder split (`spec`, e.g. 'train[:90%]').

    Returns:
      (source, {skipped path: reason}, number of images smaller than the output size).
    Raises:
      DataError: no images, or bad files with --bad_images=error.
    """
    roots = folder_splits(data_dir)
    name = spec.split("[", 1)[0].strip()
    if name not in roots:
        raise ConfigError(f"split {spec!r}: {data_dir} has the splits {', '.join(roots)} "
                          f"({'/, '.join(SPLIT_FOLDERS)}/ subfolders beside train/ make splits; "
                          "without train/ the whole folder is 'train', sliced like "
                          "'train[:90%]'): give one of them" + (
                              ", e.g. --eval_split=train[90%:] and --train_split=train[:90%]"
                              if list(roots) == ["train"] else ""))
    split_root = roots[name]
    paths, others, runs, repeats = list_images(split_root)
    if repeats:
        targets = ", ".join(sorted({os.path.realpath(p) for p in repeats})[:4])
        one = len(repeats) == 1
        logging.warning("%s: not following the link%s %s: %s (%s) %s read once, by %s own "
                        "path or an earlier link, and following %s would repeat %s images",
                        split_root, "" if one else "s", ", ".join(repeats[:4]),
                        "its folder" if one else "their folders", targets,
                        "is" if one else "are", "its" if one else "their",
                        "it" if one else "them", "its" if one else "their")
    if runs:
        logging.warning("%s: not reading %d training run folder%s inside it (%s): they hold "
                        "checkpoints or TensorFlow events, and their images are the runs' "
                        "figures; keep --model_dir outside --data_dir", split_root, len(runs),
                        "s" if len(runs) != 1 else "", ", ".join(runs[:4]))
    if not paths:
        what = (f"only files ending {', '.join(list(others)[:8])}" if others else "no files at all")
        shards = (": they look like TFRecord shards: pass --dataset=tfrecord"
                  if shard_splits(split_root) else "")
        raise DataError(f"--data_dir={data_dir}: {split_root} holds no images ({what}); "
                        f"tapeloop reads {', '.join(images_lib.EXTENSIONS)} files, recursively"
                        f"{shards}")
    if others:  # what a user may have expected to be read (.tif, .heic, ...)
        n = sum(others.values())
        logging.info("%s: not reading %d file%s of other types (%s); tapeloop reads %s",
                     split_root, n, "s" if n != 1 else "",
                     ", ".join(f"{k} {v}" for k, v in list(others.items())[:8]),
                     " ".join(images_lib.EXTENSIONS))
    labels, class_names = class_labels(split_root, paths)
    picked = _picked(paths, split_root, spec)
    total = len(paths)
    paths = [paths[i] for i in picked]
    labels = labels[list(picked)] if labels is not None else None
    if not paths:
        raise ConfigError(f"split {spec!r} of {data_dir} is empty ({name} has {total} "
                          f"image{'s' if total != 1 else ''}): widen the slice, or add images")
    start = time.monotonic()
    infos, bad = scan(paths, what=f"the image files of {spec}")
    logging.info("checked %d image file%s of %s in %.1f s", len(paths),
                 "" if len(paths) == 1 else "s", spec, time.monotonic() - start)
    if bad and bad_images == "error":
        first = next(iter(bad))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{first} is {bad[first]}{more}: replace or remove it, or pass "
                        "--bad_images=skip to leave it out")
    if bad:
        keep = [i for i, p in enumerate(paths) if p not in bad]
        paths, infos = [paths[i] for i in keep], [infos[i] for i in keep]
        labels = labels[keep] if labels is not None else None
        logging.warning("--bad_images=skip: skipping %d of %d files of %s that cannot be "
                        "decoded", len(bad), len(bad) + len(paths), spec)
        if not paths:
            raise DataError(f"every file of {spec} in {data_dir} is undecodable")
    first = infos[0]
    size = tuple(image_size) if image_size else (first.height, first.width)
    sizes = {(i.height, i.width) for i in infos}
    if not image_size and len(sizes) > 1:
        logging.info("%s: images of %d sizes, all fitted to the first one's, %dx%d "
                     "(--image_size=H,W chooses another)", spec, len(sizes), *size)
    ratios = {images_lib.static_jpeg_ratio(i.height, i.width, size) if i.format == "JPEG"
              else None for i in infos}
    ratio = ratios.pop() if len(ratios) == 1 else None
    formats = {i.format for i in infos}
    exact = bool((formats <= {"PNG", "WEBP"} or (formats == {"JPEG"} and ratio))
                 and {images_lib.decoded_size(i, ratio) for i in infos} == {size})
    # Colour unless every file is greyscale: a colour folder whose first file is grey
    # stays colour (the headers of all files are known here, unlike a stream of shards).
    channels = channels or (1 if all(i.channels == 1 for i in infos) else 3)
    decoding = Decoding(size, channels, resize, jpeg_ratio=ratio, exact=exact)
    smaller = sum(1 for i in infos if i.height < size[0] or i.width < size[1])
    orientations = np.array([i.orientation for i in infos], np.int32)
    turned = int((orientations != 1).sum())
    if turned:
        logging.info("%s: %d of %d files are JPEGs stored sideways or mirrored, turned upright "
                     "by their EXIF orientation as viewers show them (TensorFlow's and Keras' "
                     "decoders ignore it)", spec, turned, len(infos))
    return (FolderSource(spec, paths, labels, class_names, decoding,
                         orientations if turned else None, tuple(i.size for i in infos)),
            bad, smaller)


# ---------------------------------------------------------------- tfrecord
def _has_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _is_pattern(data_dir: str) -> bool:
    """A pattern of shards (`gs://b/data/*-of-*`), not a folder: a folder's name may hold
    '[' too (`shards [2023]`, a `--cache` dir), which a pattern would read as a set."""
    return _has_glob(data_dir) and not tf.io.gfile.isdir(data_dir)


def _inside(folder: str, pattern: str) -> str:
    """`pattern` inside `folder`, the folder's name taken literally ('[' and all)."""
    return os.path.join(glob.escape(folder), pattern)


def _glob(pattern: str) -> list[str]:
    """The files of `--data_dir=PATTERN`; its folder's name literally where it exists
    (`shards [2023]/train-*`)."""
    folder, name = os.path.split(pattern)
    if _has_glob(folder) and tf.io.gfile.isdir(folder):
        pattern = _inside(folder, name)
    return tf.io.gfile.glob(pattern)


# File name endings of TFRecord files that name their split before them (`train.tfrecord`,
# `test.record`, `train.tfrecord-00000-of-00004`), besides `train-00000-of-00004`.
_RECORD_ENDINGS = (".tfrecords", ".tfrecord", ".tfrec", ".record")


def split_of(name: str) -> str | None:
    """The split a shard file's name gives (its base name's): `train` of
    train-00000-of-00004 (what precedes the first '-', as it always was: val2017-00000-of-00008
    is `val2017`), of train.tfrecord, train.tfrecords.gz, train.record,
    train.tfrecord-00000-of-00004, and of numbered files (train_003.tfrecord); None for
    other files (dataset_info.json)."""
    name = os.path.basename(name)
    for ending in _RECORD_ENDINGS:
        i = name.find(ending)
        if i > 0 and "-" not in name[:i]:
            prefix = re.sub(r"(?<=.)_\d+$", "", name[:i])  # a file's number is not its split
            return None if prefix.isdigit() else prefix  # 00001.tfrecord: no split
    return name.split("-", 1)[0] if "-" in name else None


def shard_files(data_dir: str, split: str) -> list[str]:
    """The sorted shards of `split` (`split_of`) in `data_dir` (a folder, or a glob
    pattern of shards)."""
    if not data_dir:
        raise ConfigError("--dataset=tfrecord needs --data_dir=FOLDER with train-* and test-* "
                          "shards (python -m core.prepare writes them)")
    if _is_pattern(data_dir):
        matched = _glob(data_dir)
        if not matched:
            raise DataError(f"--data_dir={data_dir} matches no files: check the pattern")
    else:
        if not tf.io.gfile.isdir(data_dir):
            raise DataError(f"--data_dir={data_dir} is not a folder: give the folder of the "
                            "TFRecord shards (python -m core.prepare writes them)")
        matched = tf.io.gfile.glob(_inside(data_dir, f"{split}*"))
    # A shard being written (core.prepare's NAME.tmp, left by a prepare that stopped) is none.
    files = sorted(f for f in matched if split_of(f) == split and not f.endswith(".tmp"))
    if files and not _is_pattern(data_dir):  # a pattern may pick some shards on purpose
        _check_whole_set(data_dir, split, files)
    if not files:
        present = shard_splits(data_dir)
        has = (f" (it has shards of {', '.join(present)}): name one of those in --train_split "
               "or --eval_split" + (" (with --mode=train, which evaluates nothing, give no "
                                    "--eval_split)" if split in EVAL_SPLITS else "") + ", or"
               if present else ":")
        if not present and not _is_pattern(data_dir) and list_images(data_dir)[0]:
            raise DataError(f"--data_dir={data_dir} has no TFRecord shards but image files: "
                            "pass --dataset=folder to train on them")
        raise DataError(f"--data_dir={data_dir} has no {split}-* TFRecord shards{has} write them "
                        "with python -m core.prepare, or name the split's files "
                        f"{split}-00000-of-00001 (or {split}.tfrecord) and so on")
    return files


def _check_whole_set(data_dir: str, split: str, files: list[str]) -> None:
    """Raises DataError where the numbered shards of `split` (NAME-00001-of-00004) are not one
    whole set: some missing (a copy, or a core.prepare, that stopped part way), or two sets
    of other counts (an older set beside a newer): either trained on part of the data, or
    on some twice, without a word."""
    numbered = [m for m in (re.search(r"-(\d+)-of-(\d+)(?:\.\w+)?$", os.path.basename(f))
                            for f in files) if m]
    counts = sorted({int(m.group(2)) for m in numbered})
    again = ("write them again with python -m core.prepare --overwrite (it removes the "
             "old ones)")
    if len(counts) > 1:
        sets = ", ".join(f"-of-{n:05d}" for n in counts)
        raise DataError(f"--data_dir={data_dir} holds {len(counts)} sets of {split} shards "
                        f"({sets}): remove the older set, or {again}")
    if counts:
        have = {int(m.group(1)) for m in numbered}
        missing = sorted(set(range(counts[0])) - have)
        if missing:
            first = numbered[0]  # the others' names: its own, with their number
            prefix, width = first.string[:first.start()], len(first.group(1))
            shown = ", ".join(f"{prefix}-{i:0{width}d}-of-{first.group(2)}"
                              for i in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise DataError(f"--data_dir={data_dir} has {len(have)} of the {counts[0]} {split} "
                            f"shards (missing {shown}): a copy or a core.prepare that stopped "
                            f"part way? copy the missing ones, or {again}; to train on "
                            f"these alone, give them as a pattern, e.g. --data_dir="
                            f"{os.path.join(data_dir, first.string[:first.start()])}-*")


def shard_splits(data_dir: str) -> list[str]:
    """The split names of the shards in `data_dir` (`split_of` their names: `train` of
    train-00000-of-00004 or train.tfrecord), sorted; none if it is not a folder or pattern
    of files."""
    try:
        files = (_glob(data_dir) if _is_pattern(data_dir)
                 else tf.io.gfile.glob(_inside(data_dir, "*[-.]*")))
    except tf.errors.OpError:
        return []
    return sorted({split for split in map(split_of, files) if split})


def _compression(path: str) -> str:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return "GZIP" if f.read(2) == b"\x1f\x8b" else ""
    except tf.errors.OpError as e:
        _refuse_if_permission(path, e)
        raise


def read_info(data_dir: str) -> dict | None:
    folder = os.path.dirname(data_dir) if _is_pattern(data_dir) else data_dir
    path = os.path.join(folder, INFO_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)
    except (ValueError, tf.errors.OpError) as e:
        _refuse_if_permission(path, e)
        raise DataError(f"{path} is not readable JSON ({e}): delete it, and the shards are "
                        "counted at start-up") from None


class TFRecordSource:
    """One split of TFRecord shards of tf.train.Example: streamed, never indexed.

    Each shard contributes `counts[i]` records after skipping `skips[i]` (TFDS slices);
    `image_key` and `label_key` name the features (Model Garden's, or a TFDS
    dataset's). `raw_channels`: the images are raw pixels with this many channels
    (`image/format` "raw", with `image/height` and `image/width`, or the `size_keys`
    features), not encoded files;
    `fixed_shape`: every raw image has this (H, W, C) (`dataset_info.json` says so).
    """

    kind = "tfrecord"
    indexable = False

    def __init__(self, name: str, files: list[str], counts: list[int], compression: str,
                 decoding: Decoding, skips: list[int] | None = None,
                 image_key: str = "image/encoded", label_key: str | None = "image/class/label",
                 class_names=(), raw_channels: int | None = None, fixed_shape=None,
                 size_keys: tuple[str, str] = ("image/height", "image/width")):
        self.name = name
        self.size_keys = tuple(size_keys)  # a raw image's height and width features
        self.files = files
        self.counts = counts
        self.skips = skips or [0] * len(files)
        self.compression = compression
        self.decoding = decoding
        self.image_shape = decoding.image_shape
        self.num_examples = int(sum(counts))
        self.labels = None  # read with the records (examples)
        self.class_names = list(class_names)
        self.features = {image_key: tf.io.FixedLenFeature([], tf.string)}
        self.raw_channels = raw_channels
        self.fixed_shape = tuple(fixed_shape) if raw_channels and fixed_shape else None
        if raw_channels:
            self.features.update({k: tf.io.FixedLenFeature([], tf.int64)
                                  for k in self.size_keys})
        if label_key:
            self.features[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
        self.image_key, self.label_key = image_key, label_key

    def describe(self) -> str:
        gz = ", GZIP" if self.compression else ""
        raw = ", raw pixels" if self.raw_channels else ""
        return f"{self.num_examples:,} examples in {len(self.files)} TFRecord shard(s){gz}{raw}"

    def describe_decoding(self) -> str:
        if not self.raw_channels:
            return self.decoding.describe()
        if self.batch_decodable:
            return "raw pixels at the output size, a batch at a time"
        return f"raw pixels, resized to {'x'.join(map(str, self.decoding.size))} where they differ"

    def shard_records(self, path, skip, take) -> tf.data.Dataset:
        """The records one shard contributes. Traced (interleave) or eager."""
        return tf.data.TFRecordDataset(path, compression_type=self.compression).skip(skip).take(
            take)

    def records(self) -> tf.data.Dataset:
        """Every record of the split, in shard order."""
        return tf.data.Dataset.from_tensor_slices(
            (self.files, np.array(self.skips, np.int64), np.array(self.counts, np.int64))
        ).flat_map(self.shard_records)

    def parse(self, record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """A serialized Example -> (uint8 [H, W, C], label or -1). Traced."""
        features = tf.io.parse_single_example(record, self.features)
        label = features[self.label_key] if self.label_key else tf.constant(-1, tf.int64)
        return self._image(features), label

    def _image(self, features: dict) -> tf.Tensor:
        """One record's parsed features -> uint8 [H, W, C]."""
        d = self.decoding
        if self.raw_channels:
            return images_lib.decode_raw(features[self.image_key],
                                         *(features[key] for key in self.size_keys),
                                         self.raw_channels, d.size, d.channels, d.resize)
        return d(features[self.image_key])

    def decode_record(self, record: tf.Tensor) -> tf.Tensor:
        return self.parse(record)[0]

    def decode_chunk(self, records: tf.Tensor) -> tf.Tensor:
        """Records (a vector of static length k) -> uint8 [k, H, W, C]: one parse and k
        decodes in one tf.data map call (data.DECODE_CHUNK says why). Traced."""
        keys = [self.image_key] + (list(self.size_keys) if self.raw_channels else [])
        features = tf.io.parse_example(records, {key: self.features[key] for key in keys})
        return each(self._image, features)

    @property
    def batch_decodable(self) -> bool:
        """Whether a batch of records decodes at once (`decode_records`): raw pixels all
        of the output's shape, so decoding is one parse and one reshape per batch."""
        return self.fixed_shape is not None and self.fixed_shape == self.image_shape

    def decode_records(self, records: tf.Tensor) -> tf.Tensor:
        """A batch of records -> uint8 [N, H, W, C], for `batch_decodable` sources: a
        record of another byte count fails (InvalidArgumentError), as a damaged PNG does."""
        encoded = tf.io.parse_example(records, {self.image_key: self.features[self.image_key]})[
            self.image_key]
        size = int(np.prod(self.fixed_shape))
        check = tf.debugging.assert_equal(
            tf.strings.length(encoded), size,
            message=f"a raw image of {self.name} does not hold {size} bytes "
                    f"({'x'.join(map(str, self.fixed_shape))})")
        with tf.control_dependencies([check]):
            pixels = tf.io.decode_raw(encoded, tf.uint8, fixed_length=size)
        return tf.reshape(pixels, (-1, *self.fixed_shape))

    def examples(self, positions) -> tuple[np.ndarray, np.ndarray | None]:
        """The examples at `positions` (ascending), decoded, and their labels (None if any
        record has none). A shard is read in order up to its last wanted record, and only
        those are parsed: a few records of each shard for a few examples spread over many
        shards, not the whole split (the `--augment` preview of a large training split)."""
        positions = np.asarray(positions, np.int64)
        starts = np.cumsum([0, *self.counts[:-1]])
        shard_of = np.searchsorted(starts, positions, side="right") - 1  # empty shards: none
        wanted_records = None
        for shard in np.unique(shard_of):
            offsets = positions[shard_of == shard] - starts[shard]
            wanted = tf.constant(offsets)
            records = self.shard_records(self.files[shard], self.skips[shard], offsets[-1] + 1)
            records = records.enumerate().filter(
                lambda i, _, wanted=wanted: tf.reduce_any(tf.equal(i, wanted)))
            wanted_records = records if wanted_records is None else \
                wanted_records.concatenate(records)
        # Parsed and decoded in one pipeline: eagerly, a record at a time, the figures'
        # 2,000 took 8x as long (benchmarks/decode_forms.py).
        images, labels = next(iter(wanted_records.map(
            lambda _, record: self.parse(record), num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True).batch(len(positions))))
        labels = labels.numpy()
        return images.numpy(), (labels if len(labels) and (labels >= 0).all() else None)


def _records_in(path: str, compression: str) -> int:
    """Counts the records of one shard by walking its record headers (8-byte length, CRC,
    data, CRC); a file that ends inside a record raises. (TensorFlow's readers stop
    quietly at a cut-off last record, so counting with them cannot see truncation.)"""
    import gzip
    import struct

    with tf.io.gfile.GFile(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if compression else raw
        size = None if compression else raw.size()
        count = position = 0
        while True:
            header = stream.read(12)
            if not header:
                return count
            if len(header) < 12:
                raise DataError(f"{path} ends inside a record header: the shard is truncated; "
                                "write it again with python -m core.prepare")
            length = struct.unpack("<Q", header[:8])[0]
            position += 12 + length + 4
            if size is not None:
                if position > size:
                    raise DataError(f"{path} ends inside record {count + 1} ({size:,} of "
                                    f"{position:,} bytes): the shard is truncated; write it "
                                    "again with python -m core.prepare")
                raw.seek(position)
            elif len(stream.read(length + 4)) < length + 4:
                raise DataError(f"{path} ends inside record {count + 1}: the shard is truncated; "
                                "write it again with python -m core.prepare")
            count += 1


def _count_records(files: list[str], compression: str) -> list[int]:
    counts = []
    for path in files:
        try:
            counts.append(_records_in(path, compression))
        except (tf.errors.OpError, OSError, EOFError) as e:
            _refuse_if_permission(path, e)
            raise DataError(f"{path} is not a readable TFRecord file ({str(e).splitlines()[0]}): "
                            "write the shards again with python -m core.prepare") from None
    return counts


def _refuse_if_permission(path: str, error: Exception) -> None:
    """A shard this user may not read is not a bad shard: its line says so."""
    if isinstance(error, (tf.errors.PermissionDeniedError, PermissionError)):
        raise DataError(f"{path} is not readable (permission denied): fix its permissions") \
            from None


def open_tfrecord(data_dir: str, spec: str, split: str, image_size, channels,
                  resize: str, image_feature: str | None = None) -> TFRecordSource:
    """Finds, checks and counts one split's shards (`spec`: `split`, unsliced);
    `image_feature` is the feature that holds the image (default: found, `_image_feature`).

    Raises:
      DataError: no shards, truncated or unreadable shards, records without images.
      ConfigError: `spec` is a slice (`train[:90%]`).
    """
    if spec.replace(" ", "") != split:
        raise ConfigError(f"split {spec!r}: TFRecord splits cannot be sliced (records are "
                          "streamed in the order they were written, often class by class): "
                          f"name the whole split ({split}), or write the slices from the images "
                          "the shards came from, e.g. python -m core.prepare --dataset=folder "
                          "--splits=train[:90%],train[90%:]")
    files = shard_files(data_dir, split)
    compression = _compression(files[0])
    info = read_info(data_dir)
    known = {os.path.basename(s["file"]): s for s in (info or {}).get("shards", [])}
    if all(os.path.basename(f) in known for f in files):
        counts = []
        for path in files:
            shard = known[os.path.basename(path)]
            size = tf.io.gfile.stat(path).length
            if size != shard["bytes"]:
                raise DataError(f"{path} has {size:,} bytes, but {INFO_FILE} says {shard['bytes']:,}"
                                ": the shard is truncated or was rewritten; write it again with "
                                "python -m core.prepare")
            counts.append(int(shard["examples"]))
    else:
        start = time.monotonic()
        counts = _count_records(files, compression)
        logging.info("counted %d records in %d shards of %s in %.1f s (no %s beside them)",
                     sum(counts), len(files), split, time.monotonic() - start, INFO_FILE)
    first, image_key = None, None
    for path in files:  # every shard's first record must hold an image
        try:
            record = next(iter(tf.data.TFRecordDataset(path, compression_type=compression)), None)
        except tf.errors.OpError as e:
            _refuse_if_permission(path, e)
            raise DataError(f"{path} is not a readable TFRecord file ({e.message.splitlines()[0]})"
                            ": write the shards again with python -m core.prepare") from None
        if record is None:
            continue
        example = tf.train.Example.FromString(record.numpy())
        key, raw_shape = _image_feature(example, path, image_feature)
        if image_key not in (None, key):
            raise DataError(f"{path}: its images are in the feature {key}, those of {files[0]} "
                            f"in {image_key}: give every shard of a split the same features")
        if first is None:
            first, first_raw = example, raw_shape
        image_key = key
    if first is None or not sum(counts):
        raise DataError(f"the {split}-* shards in {data_dir} hold no examples")
    feature = first.features.feature
    # Model Garden's records label by image/class/label (absent: unlabelled); others may
    # by label. Labels that are not one int64 class id are not read.
    names = ("image/class/label",) if image_key == "image/encoded" else ("image/class/label",
                                                                         "label")
    label_key = next((k for k in names if k in feature
                      and feature[k].WhichOneof("kind") == "int64_list"
                      and len(feature[k].int64_list.value) == 1), None)
    if image_key == "image/encoded" and names[0] not in feature:
        label_key = names[0]  # in none of the first records, perhaps in later ones
    if image_key != "image/encoded":
        shaped_by = ", ".join(repr(k) for k in first_raw[0] if k) if first_raw else ""
        what = (f"the encoded files of the feature {image_key!r}" if first_raw is None else
                f"the uint8 pixels of the feature {image_key!r}, shaped by {shaped_by}")
        logging.info("%s: the images are %s (no image/encoded)%s", split, what,
                     f", the labels {label_key!r}" if label_key else "")
    unread = [k for k in names if k in feature and not label_key]
    if unread:  # class names as bytes, say: a vocabulary would need every record read
        kind = feature[unread[0]].WhichOneof("kind")
        held = (f"{len(feature[unread[0]].int64_list.value)} int64 values" if kind == "int64_list"
                else {"bytes_list": "bytes", "float_list": "floats"}.get(kind, "no values"))
        logging.info("%s: the feature %r holds %s, not one int64 class id: the examples are "
                     "read unlabelled (the latent-space figure is not drawn)", split,
                     unread[0], held)
    if first_raw is None:
        h, w, c, raw = _first_image_shape(first, files[0], image_key)
        size_keys = ("image/height", "image/width")
    else:
        (h, w, c), raw, size_keys = first_raw[1], True, first_raw[0][:2]
    size = tuple(image_size) if image_size else (h, w)
    shape = (info or {}).get("image_shape")  # core.prepare's: one shape for every record
    # PNGs that core.prepare wrote at the output size: decoded straight to it (no resize)
    exact = (info or {}).get("encoding") == "png" and shape == [h, w, c] and (h, w) == size
    decoding = Decoding(size, channels or (1 if c in (1, 2) else 3), resize, exact=exact)
    info_names = (info or {}).get("class_names", ())
    fixed = shape if raw else None
    return TFRecordSource(spec, files, counts, compression, decoding, class_names=info_names,
                          raw_channels=c if raw else None,
                          fixed_shape=fixed if fixed and list(fixed) == [h, w, c] else None,
                          image_key=image_key, label_key=label_key, size_keys=size_keys)


# The first bytes of the encoded files tapeloop decodes.
_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


# Features that give a raw image's height, width and channels, as scripts name them (TF 1's
# convert_to_records.py wrote height, width, depth and image_raw = the pixels' bytes).
_RAW_SIZE_FEATURES = (("height", "image_height", "rows"), ("width", "image_width", "cols"),
                      ("depth", "channels", "image_depth", "image_channels"))


def _image_feature(example, path: str,
                   given: str | None = None) -> tuple[str, tuple | None]:
    """(the feature of an Example that holds its image, None or for raw pixels ((height,
    width, channels features), (h, w, c)): the `given` one (--image_feature); else Model
    Garden's `image/encoded`; else the one bytes feature whose value is an encoded image file
    (`image`, as a TFDS dataset's records or many a user's own shards have it); else one of
    uint8 pixels, h x w x c bytes by its height, width and depth features
    (`_RAW_SIZE_FEATURES`), c 1 or 3 where no depth is given (float32 pixels, 4 bytes each,
    would pass for RGBA: those are refused)."""
    feature = example.features.feature
    keys = ", ".join(sorted(feature)) or "none"
    if given and (given not in feature or feature[given].WhichOneof("kind") != "bytes_list"
                  or len(feature[given].bytes_list.value) != 1):
        what = ("has no feature" if given not in feature else
                "has no single bytes value in the feature")
        raise DataError(f"{path}: each example {what} {given!r} to hold its image (its "
                        f"features: {keys}): give --image_feature one that holds an image")
    if given and feature[given].bytes_list.value[0].startswith(_SIGNATURES):
        return given, None
    if given == "image/encoded" or not given and "image/encoded" in feature:
        return "image/encoded", None
    found = [k for k in sorted(feature) if feature[k].WhichOneof("kind") == "bytes_list"
             and feature[k].bytes_list.value
             and feature[k].bytes_list.value[0].startswith(_SIGNATURES)]
    if len(found) == 1 and not given:
        return found[0], None
    if found and not given:
        raise DataError(f"{path}: its examples hold several encoded images ({', '.join(found)}) "
                        "and no image/encoded feature, which would say which to train on: "
                        f"name it, e.g. --image_feature={found[0]}")
    names = [next((k for k in options if k in feature
                   and feature[k].WhichOneof("kind") == "int64_list"
                   and feature[k].int64_list.value), None) for options in _RAW_SIZE_FEATURES]
    pixels = [given] if given else [
        k for k in sorted(feature) if feature[k].WhichOneof("kind") == "bytes_list"
        and len(feature[k].bytes_list.value) == 1]
    if names[0] and names[1] and len(pixels) == 1:
        h, w = (feature[k].int64_list.value[0] for k in names[:2])
        size = len(feature[pixels[0]].bytes_list.value[0])
        c = feature[names[2]].int64_list.value[0] if names[2] else size // max(h * w, 1)
        if h > 0 and w > 0 and h * w * c == size and (c in (1, 3) or names[2] and c in (2, 4)):
            return pixels[0], (tuple(names), (int(h), int(w), int(c)))
        raise DataError(f"{path}: its feature {pixels[0]} holds {size:,} bytes, not the "
                        f"{names[0]} x {names[1]} ({h} x {w}) x {names[2] or '1 or 3'} "
                        "bytes of uint8 pixels (float pixels?): " + (
                            "give --image_feature one that holds the image" if given else
                            "write the shards with python -m core.prepare"))
    if given:
        raise DataError(f"{path}: its feature {given!r} holds neither an encoded image (PNG, "
                        "JPEG, GIF, BMP) nor uint8 pixels shaped by height and width features "
                        f"(its features: {keys}): give --image_feature one that holds an image")
    raise DataError(f"{path}: its examples have no image/encoded feature, nor another that "
                    f"holds an encoded image (they have {keys}): name the one that does with "
                    "--image_feature, or write them with python -m core.prepare")


def _first_image_shape(example, path: str,
                       image_key: str = "image/encoded") -> tuple[int, int, int, bool]:
    """(height, width, channels, raw) of a shard set's first image: decoded, or for raw
    pixels (`image/format` "raw") read from its `image/height`, `image/width` and
    `image/channels`, whose product must be its byte count."""
    feature = example.features.feature
    encoded = feature[image_key].bytes_list.value[0]
    fmt = feature["image/format"].bytes_list.value[:1] \
        if image_key == "image/encoded" and "image/format" in feature else []
    if fmt and fmt[0].lower() == b"raw":
        shape = [feature[k].int64_list.value[:1] for k in
                 ("image/height", "image/width", "image/channels")]
        if not all(shape) or shape[0][0] * shape[1][0] * shape[2][0] != len(encoded):
            raise DataError(f"{path}: its raw images need image/height, image/width and "
                            f"image/channels whose product is the {len(encoded):,} bytes of "
                            "image/encoded: write them with python -m core.prepare")
        return int(shape[0][0]), int(shape[1][0]), int(shape[2][0]), True
    h, w, c = tf.io.decode_image(encoded, channels=0, expand_animations=False).shape
    return h, w, c, False


# -------------------------------------------------------------------- tfds
def tfds_builder(name: str, data_dir: str | None):
    """The TFDS builder of `name` (NAME or NAME/CONFIG) in `data_dir`, prepared (TFDS
    downloads it the first time).

    Raises:
      ConfigError: tensorflow-datasets is not installed.
      DataError: an unknown dataset, or one that cannot be prepared.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError("--dataset=tfds:... needs tensorflow-datasets: pip install -e '.[tfds]'"
                          ) from None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"--dataset=tfds:{name}: TFDS has no dataset {name.split('/')[0]!r} (and "
                        f"none is prepared in --data_dir={data_dir}): check the name against "
                        "https://www.tensorflow.org/datasets/catalog") from None
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds for a bad config name
        raise DataError(f"--dataset=tfds:{name}: {first_line(e)}") from None
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        logging.info("preparing tfds:%s in %s (TFDS downloads it once)", name, builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as e:  # noqa: BLE001 - network, disk, manual-download datasets...
            reason = first_line(e)
            raise DataError(f"--dataset=tfds:{name} could not be prepared ({reason}): run it once "
                            "where TFDS can download it, or pass --data_dir=FOLDER where it is "
                            "prepared") from None
    return builder


def open_tfds(name: str, data_dir: str | None, spec: str, image_size, channels,
              resize: str, image_feature: str | None = None) -> TFRecordSource:
    """A split of a TFDS dataset (`name` is NAME or NAME/CONFIG), with TFDS's split syntax.

    Prepares the dataset if it is not in `data_dir` yet (TFDS downloads it). Its
    TFRecord files are then read like ours (the same streaming, order and resume),
    with its Image feature `image_feature` (default: `image`, or its only one) and its
    `label` ClassLabel.

    Raises:
      ConfigError: tensorflow-datasets is not installed, or the split is unknown.
      DataError: an unknown dataset, one that cannot be prepared, or no image feature.
    """
    builder = tfds_builder(name, data_dir)  # first: it names a missing tensorflow-datasets
    import tensorflow_datasets as tfds

    info = builder.info
    try:
        split_info = info.splits[spec]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"split {spec!r} of tfds:{name}: {first_line(e, 150)} (its "
                          f"splits: {', '.join(info.splits)})") from None
    images = [k for k, f in info.features.items() if isinstance(f, tfds.features.Image)]
    if not images:
        raise DataError(f"tfds:{name} has no Image feature (its features: "
                        f"{', '.join(info.features)}): tapeloop trains on images")
    if image_feature and image_feature not in images:
        raise DataError(f"--image_feature={image_feature}: tfds:{name} has no Image feature of "
                        f"that name (its Image features: {', '.join(sorted(images))})")
    # The order of a prepared dataset's features is not theirs (oxford_iiit_pet read back
    # lists segmentation_mask before image): "the first" is no rule for several.
    chosen = image_feature or ("image" if "image" in images else
                               images[0] if len(images) == 1 else None)
    if chosen is None:
        raise DataError(f"tfds:{name} has several Image features ({', '.join(sorted(images))})"
                        f": name the one to train on, e.g. --image_feature={sorted(images)[0]}")
    if not image_feature and len(images) > 1:
        logging.info("tfds:%s: training on its Image feature %r (it also has %s: "
                     "--image_feature=NAME picks another)", name, chosen,
                     ", ".join(sorted(set(images) - {chosen})))
    images = [chosen]
    label = "label" if "label" in info.features and isinstance(
        info.features["label"], tfds.features.ClassLabel) else None
    if str(getattr(info, "file_format", "tfrecord")).lower().split(".")[-1] != "tfrecord":
        raise DataError(f"tfds:{name} is stored as {info.file_format}, not TFRecord: prepare it "
                        "with file_format=tfrecord (tfds build --file_format=tfrecord)")
    instructions = [fi for fi in split_info.file_instructions if fi.take]
    files = [fi.filename if os.path.isabs(fi.filename) or "://" in fi.filename
             else os.path.join(builder.data_dir, fi.filename) for fi in instructions]
    feature = info.features[images[0]]
    h, w, c = (feature.shape + (None,) * 3)[:3]
    if image_size is None and (h is None or w is None):
        first = next(iter(tf.data.TFRecordDataset(files[0]).take(1)))
        raw = tf.io.parse_single_example(first, {images[0]: tf.io.FixedLenFeature([], tf.string)})
        h, w = tf.io.extract_jpeg_shape(raw[images[0]]).numpy()[:2] if feature.encoding_format \
            == "jpeg" else tf.io.decode_image(raw[images[0]], expand_animations=False).shape[:2]
    size = tuple(image_size) if image_size else (int(h), int(w))
    decoding = Decoding(size, channels or (1 if c == 1 else 3), resize)
    names = info.features["label"].names if label else ()
    return TFRecordSource(f"tfds:{name} {spec}", files, [fi.take for fi in instructions], "",
                          decoding, skips=[fi.skip for fi in instructions],
                          image_key=images[0], label_key=label, class_names=names)
