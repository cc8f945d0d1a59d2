"""Reading the IDX files of MNIST and Fashion-MNIST, with every check a corrupted
file can fail: gzip integrity, magic number, dimensions, byte count, label range,
and the published SHA-256 of the known files.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib

import numpy as np

from core.errors import DataError

# Published SHA-256 of the original gzip files.
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        # Keras' single-file copy (keras.datasets.mnist).
        "mnist.npz": "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def _gfile(path: str):
    """The file opened for reading through tf.io.gfile (local, gs://, ...)."""
    import tensorflow as tf  # only once a file is read: importing this module stays cheap

    return tf.io.gfile.GFile(path, "rb")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with _gfile(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: str, dataset: str) -> None:
    """Raises DataError if `path` is a known file of `dataset` whose SHA-256 differs."""
    expected = SHA256.get(dataset, {}).get(os.path.basename(path))
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise DataError(
            f"{path}: SHA-256 {actual[:12]}... differs from the published {expected[:12]}... "
            "(corrupted or a different file): download it again, or pass --noverify_checksums "
            "if you re-packed it yourself")


def _read_bytes(path: str) -> bytes:
    try:
        with _gfile(path) as f:
            raw = f.read()
    except Exception as e:  # noqa: BLE001 - OSError locally, tf.errors.OpError remotely
        reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
        raise DataError(f"{path}: cannot be read ({reason}): check the path and permissions") from None
    if not raw:
        raise DataError(f"{path}: the file is empty: download it again")
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except EOFError:
            raise DataError(f"{path}: the gzip stream is truncated: download the file again") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file ({e}): download the file again") from None
    return raw


def read_idx(path: str, magic: int, item_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Parses an uncompressed or gzip IDX file of unsigned bytes.

    Args:
      path: the file; '.gz' files are decompressed.
      magic: IMAGES_MAGIC or LABELS_MAGIC: what the file must hold.
      item_shape: if given, the dimensions after the first that the file must have.

    Returns:
      uint8 array of the dimensions in the header.

    Raises:
      DataError: naming the file and what is wrong with it.
    """
    raw = _read_bytes(path)
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x} for IDX {kind}: "
            "is this the right file?")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if item_shape is not None and dims[1:] != tuple(item_shape):
        raise DataError(
            f"{path}: {kind} of shape {dims[1:]}, expected {tuple(item_shape)}: "
            "is this the right dataset?")
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: header says {dims} = {expected} bytes of data, the file has "
            f"{len(raw) - header}: the file is truncated or corrupted, download it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_images_and_labels(images_path: str, labels_path: str, dataset: str,
                           verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split: (N, 28, 28, 1) uint8 images and (N,) int64 labels in 0-9."""
    images = read_idx(images_path, IMAGES_MAGIC, (28, 28))
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels: the two files are from different splits or corrupted")
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {labels.max()} is outside 0-9: file corrupted")
    if verify:
        verify_checksum(images_path, dataset)
        verify_checksum(labels_path, dataset)
    return images[..., None], labels.astype(np.int64)
