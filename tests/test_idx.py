"""The IDX reader on real-format IDX files (the session's `idx_dir`) and on corrupted
gzip and plain copies of them."""

import gzip
import os

import numpy as np
import pytest

from core import idx
from core.errors import DataError

from conftest import IDX_IMAGES, IDX_LABELS, IDX_SEED

IMAGES = IDX_IMAGES + ".gz"
LABELS = IDX_LABELS + ".gz"


def test_reads_a_gzip_test_split(idx_dir, tmp_path):
    from core import fontdigits

    expected, expected_labels = fontdigits.build(seed=IDX_SEED, sizes={"test": 10_000})["test"]
    for name in (IDX_IMAGES, IDX_LABELS):
        raw = open(os.path.join(idx_dir, name), "rb").read()
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw, mtime=0))
    images, labels = idx.read_images_and_labels(
        str(tmp_path / IMAGES), str(tmp_path / LABELS), "mnist", verify=False)
    assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)
    np.testing.assert_array_equal(labels, expected_labels)
    assert labels.dtype == np.int64


@pytest.fixture
def copies(idx_dir, tmp_path):
    """Raw (uncompressed) bytes of both files, and a writer for corrupted copies."""
    raw = {gz: open(os.path.join(idx_dir, plain), "rb").read()
           for gz, plain in ((IMAGES, IDX_IMAGES), (LABELS, IDX_LABELS))}

    def write(name, data, compress=True):
        path = tmp_path / name
        path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
        return str(path)

    return raw, write


def _read_pair(images_path, labels_path):
    return idx.read_images_and_labels(images_path, labels_path, "mnist")


def test_truncated_gzip(copies, tmp_path):
    data = gzip.compress(copies[0][IMAGES], mtime=0)
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


def test_swapped_files_are_caught_by_magic(idx_dir):
    with pytest.raises(DataError, match="wrong magic"):
        _read_pair(os.path.join(idx_dir, IDX_LABELS), os.path.join(idx_dir, IDX_IMAGES))


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


def test_only_files_with_a_published_checksum_are_checked(copies, tmp_path):
    """A known name is compared with its published SHA-256 (these synthetic files differ);
    a name with no published digest is not compared. The real files' digests are checked
    where the real files are: benchmarks/quality.py reads them with verification on."""
    raw, write = copies
    path = write(IMAGES, raw[IMAGES])
    assert idx.sha256_of(path) != idx.SHA256["mnist"][IMAGES]
    with pytest.raises(DataError, match="differs from the published"):
        idx.verify_checksum(path, "mnist")
    unknown = tmp_path / "not-a-known-name.gz"
    unknown.write_bytes(open(path, "rb").read())
    idx.verify_checksum(str(unknown), "mnist")  # no published digest: nothing to compare
