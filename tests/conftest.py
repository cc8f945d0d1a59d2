"""Shared test setup.

The test process splits the CPU into 4 logical devices before TensorFlow
starts, so MirroredStrategy over 1, 2 or 4 replicas runs in-process.

The suite needs nothing outside the repo: `idx_dir` is a folder of real-format IDX
files (MNIST's test-split names and layout) that the session writes, holding
digits the fontdigits generator draws with another seed than the built-in dataset.
Checks that need the real MNIST digits live in benchmarks/, which take --data_dir.

oneDNN runs the convolutions in every test process (TF_ENABLE_ONEDNN_OPTS=1, before
TensorFlow starts, inherited by the processes the tests start): the seam's oneDNN-only
forms (images as channels, few-filter convs transposed) are tested for real on any x86
host. TensorFlow's x86 wheels turn oneDNN on by themselves only on CPUs with AVX-512
VNNI/BF16 or AMX; on an AVX2-only CPU they leave it off, and a grouped convolution has no
gradient without it. The tests of oneDNN off set TF_ENABLE_ONEDNN_OPTS=0 themselves.
"""

import contextlib
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import distribute  # noqa: E402

NUM_TEST_CPUS = 4
distribute.setup_logical_cpus(NUM_TEST_CPUS)

IDX_IMAGES, IDX_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
IDX_SEED = 7  # not the built-in fontdigits' seed (0): other images than --dataset=fontdigits


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 0x0000080<ndim>, big-endian uint32 dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory):
    """A --data_dir for --dataset=mnist: 10,000 28x28 digit images and labels as MNIST's
    uncompressed test-split IDX files (no published checksum applies to them)."""
    from core import fontdigits

    folder = tmp_path_factory.mktemp("idx")
    images, labels = fontdigits.build(seed=IDX_SEED, sizes={"test": 10_000})["test"]
    (folder / IDX_IMAGES).write_bytes(idx_bytes(images[..., 0]))
    (folder / IDX_LABELS).write_bytes(idx_bytes(labels.astype(np.uint8)))
    return str(folder)


def _session_folder_in_env(tmp_path_factory, variable, name):
    """Sets `variable` to a new folder of this session's for the session, then restores it."""
    path = str(tmp_path_factory.mktemp(name))
    old = os.environ.get(variable)
    os.environ[variable] = path
    yield path
    if old is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = old


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """fontdigits caches go to a per-session folder, so tests never see a stale cache."""
    yield from _session_folder_in_env(tmp_path_factory, "TAPELOOP_CACHE_DIR", "cache")


@pytest.fixture(scope="session", autouse=True)
def _tmpdir_of_the_processes(tmp_path_factory):
    """The processes the tests start put their temporary files (AutoGraph's converted
    functions, a non-chief worker's dir, the fork server's socket) in this session's
    folder. A process a test kills (SIGKILL, a timeout) cannot remove its own, and pytest
    keeps only the last three sessions' folders, so they do not pile up in /tmp. The
    tests that check what a process leaves give it a TMPDIR of their own."""
    yield from _session_folder_in_env(tmp_path_factory, "TMPDIR", "tmp")


@contextlib.contextmanager
def tmpfs(folder, options):
    """A real file system (tmpfs, `options` as mount's -o: size=2m, ro, ...) mounted on
    the existing `folder` while this runs. Root writes anywhere file modes say no; a
    read-only mount stops even root."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr}"
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with tmpfs(disk, "size=2m"):
        yield disk


def fill(disk, leave_kb):
    """Fills `disk` up to `leave_kb` KB free."""
    st = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(bytes(st.f_bavail * st.f_frsize - leave_kb * 1024))


def random_images(n=16, shape=(28, 28, 1), seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, *shape)), tf.float32)


@pytest.fixture(autouse=True)
def _no_determinism_left_over():
    """Op determinism is process-wide: a --deterministic run must not leave it on for the
    next test in this worker (with it, XLA refuses a max-pool's gradient)."""
    yield
    from tensorflow.python.framework import config as tf_config  # not exported

    tf_config.disable_op_determinism()


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same Python, NumPy and TensorFlow seeds: weights built
    without an explicit seed are the same in every run, so tolerances hold every time."""
    tf.keras.utils.set_random_seed(1234)
