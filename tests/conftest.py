"""Shared test setup.

The test process splits the CPU into 4 logical devices before TensorFlow
starts, so MirroredStrategy over 1, 2 or 4 replicas runs in-process.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from core import distribute  # noqa: E402

NUM_TEST_CPUS = 4
distribute.setup_logical_cpus(NUM_TEST_CPUS)

MNIST_DIR = os.path.join(ROOT, "..", "shared", "data", "mnist")


@pytest.fixture(scope="session")
def mnist_dir():
    if not os.path.isdir(MNIST_DIR):
        pytest.skip(f"real MNIST files not found at {MNIST_DIR} (see ../shared/data/mnist)")
    return MNIST_DIR


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """fontdigits caches go to a per-session folder, so tests never see a stale cache."""
    path = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("TAPELOOP_CACHE_DIR")
    os.environ["TAPELOOP_CACHE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("TAPELOOP_CACHE_DIR", None)
    else:
        os.environ["TAPELOOP_CACHE_DIR"] = old


def random_images(n=16, shape=(28, 28, 1), seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, *shape)), tf.float32)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same Python, NumPy and TensorFlow seeds: weights built
    without an explicit seed are the same in every run, so tolerances hold every time."""
    tf.keras.utils.set_random_seed(1234)
