"""The IDX reader on the real MNIST test files and on corrupted copies of them."""

import gzip
import os
import shutil

import numpy as np
import pytest

from core import idx
from core.errors import DataError

# MNIST's published test-set class counts.
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"


def test_reads_the_real_test_split(mnist_dir):
    images, labels = idx.read_images_and_labels(
        os.path.join(mnist_dir, IMAGES), os.path.join(mnist_dir, LABELS), "mnist")
    assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == TEST_LABEL_COUNTS
    assert images.max() == 255 and images.min() == 0


@pytest.fixture
def copies(mnist_dir, tmp_path):
    """Raw (decompressed) bytes of both files, and a writer for corrupted copies."""
    raw = {name: gzip.decompress(open(os.path.join(mnist_dir, name), "rb").read())
           for name in (IMAGES, LABELS)}

    def write(name, data, compress=True):
        path = tmp_path / name
        path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
        return str(path)

    return raw, write


def _read_pair(images_path, labels_path):
    return idx.read_images_and_labels(images_path, labels_path, "mnist")


def test_truncated_gzip(copies, mnist_dir, tmp_path):
    data = open(os.path.join(mnist_dir, IMAGES), "rb").read()
    path = tmp_path / IMAGES
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated"):
        idx.read_idx(str(path), idx.IMAGES_MAGIC)


def test_not_gzip(copies, tmp_path):
    path = tmp_path / IMAGES
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="not a valid gzip"):
        idx.read_idx(str(path), idx.IMAGES_MAGIC)


def test_empty_file(tmp_path):
    path = tmp_path / IMAGES
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        idx.read_idx(str(path), idx.IMAGES_MAGIC)


def test_wrong_magic(copies):
    raw, write = copies
    bad = b"\x00\x00\x08\x01" + raw[IMAGES][4:]  # says labels
    with pytest.raises(DataError, match=r"wrong magic number 0x00000801, expected 0x00000803"):
        idx.read_idx(write(IMAGES, bad), idx.IMAGES_MAGIC, (28, 28))


def test_swapped_files_are_caught_by_magic(mnist_dir):
    with pytest.raises(DataError, match="wrong magic"):
        _read_pair(os.path.join(mnist_dir, LABELS), os.path.join(mnist_dir, IMAGES))


def test_wrong_dimensions(copies):
    raw, write = copies
    data = raw[IMAGES]
    bad = data[:12] + (30).to_bytes(4, "big") + data[16:]  # 28 columns -> 30
    with pytest.raises(DataError, match=r"shape \(28, 30\), expected \(28, 28\)"):
        idx.read_idx(write(IMAGES, bad), idx.IMAGES_MAGIC, (28, 28))


def test_byte_count_mismatch(copies):
    raw, write = copies
    with pytest.raises(DataError, match="the file is truncated or corrupted"):
        idx.read_idx(write(IMAGES, raw[IMAGES][:-784]), idx.IMAGES_MAGIC, (28, 28))


def test_image_label_count_mismatch(copies):
    raw, write = copies
    data = raw[LABELS]
    bad = data[:4] + (9_999).to_bytes(4, "big") + data[8:-1]  # consistent, but one short
    with pytest.raises(DataError, match="holds 10000 images but .* holds 9999 labels"):
        _read_pair(write(IMAGES, raw[IMAGES]), write(LABELS, bad))


def test_checksum_mismatch(copies):
    raw, write = copies
    data = bytearray(raw[IMAGES])
    data[5000] ^= 0xFF  # one flipped pixel: structurally valid
    images_path = write(IMAGES, bytes(data))
    labels_path = write(LABELS, raw[LABELS])
    with pytest.raises(DataError, match="SHA-256 .* differs from the published"):
        _read_pair(images_path, labels_path)
    # The same file passes when the user opts out, and reads the flipped pixel.
    images, _ = idx.read_images_and_labels(images_path, labels_path, "mnist", verify=False)
    assert images.reshape(-1)[5000 - 16] == raw[IMAGES][5000] ^ 0xFF


def test_uncompressed_files_are_read_too(copies):
    raw, write = copies
    images = idx.read_idx(write("t10k-images-idx3-ubyte", raw[IMAGES], compress=False),
                          idx.IMAGES_MAGIC, (28, 28))
    assert images.shape == (10_000, 28, 28)


def test_label_out_of_range(copies):
    raw, write = copies
    bad = raw[LABELS][:8] + b"\x0c" + raw[LABELS][9:]
    with pytest.raises(DataError, match="label 12 is outside 0-9"):
        idx.read_images_and_labels(write(IMAGES, raw[IMAGES]), write(LABELS, bad), "mnist",
                                   verify=False)


def test_known_copy_passes_checksum(mnist_dir, tmp_path):
    for name in (IMAGES, LABELS):
        shutil.copy(os.path.join(mnist_dir, name), tmp_path / name)
        idx.verify_checksum(str(tmp_path / name), "mnist")  # no error
