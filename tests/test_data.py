import collections
import os

import numpy as np
import pytest
import tensorflow as tf

from core import data, fontdigits
from core.errors import ConfigError, DataError

SMALL = {"train": 600, "test": 200}


def test_parse_split_slices_like_tfds():
    sizes = data.SPLIT_SIZES
    assert data.parse_split("train", sizes) == ("train", slice(None, None))
    assert data.parse_split("test[:8000]", sizes) == ("test", slice(None, 8000))
    assert data.parse_split("test[8000:]", sizes) == ("test", slice(8000, None))
    assert data.parse_split("train[10%:20%]", sizes) == ("train", slice(6000, 12000))
    assert data.parse_split("test[-20%:]", sizes) == ("test", slice(-2000, None))
    with pytest.raises(ConfigError, match="unknown split 'validation'"):
        data.parse_split("validation", sizes)
    with pytest.raises(ConfigError, match="outside -100..100"):
        data.parse_split("train[:200%]", sizes)
    with pytest.raises(ConfigError, match="expected a name"):
        data.parse_split("train[::2]", sizes)


def test_mnist_splits_need_only_test_files(idx_dir):
    train = data.load_split("test[:8000]", "mnist", idx_dir)
    held_out = data.load_split("test[8000:]", "mnist", idx_dir)
    assert train.num_examples == 8000 and held_out.num_examples == 2000
    assert train.image_shape == (28, 28, 1)
    pct = data.load_split("test[:10%]", "mnist", idx_dir)
    np.testing.assert_array_equal(pct.images, train.images[:1000])


def test_missing_file_is_named(idx_dir):
    with pytest.raises(DataError, match=r"no train images: expected train-images-idx3-ubyte.gz"):
        data.load_split("train", "mnist", idx_dir)


def test_data_dir_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        data.load_split("test", "mnist", str(tmp_path / "nope"))


def test_offline_download_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "MNIST_NPZ_URL", "http://127.0.0.1:9/mnist.npz")  # discard port
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(DataError, match="--data_dir=FOLDER.*--dataset=fontdigits"):
        data._keras_fetch("mnist.npz", data.MNIST_NPZ_URL, str(tmp_path), None)


def test_npz_in_data_dir(idx_dir, tmp_path):
    from core import idx

    images, labels = idx.read_images_and_labels(
        os.path.join(idx_dir, "t10k-images-idx3-ubyte"),
        os.path.join(idx_dir, "t10k-labels-idx1-ubyte"), "mnist")
    np.savez(tmp_path / "mnist.npz", x_train=images[:50, ..., 0], y_train=labels[:50],
             x_test=images[50:80, ..., 0], y_test=labels[50:80])
    split = data.load_split("test", "mnist", str(tmp_path), verify=False)
    np.testing.assert_array_equal(split.images, images[50:80])
    with pytest.raises(DataError, match="SHA-256"):
        data.load_split("test", "mnist", str(tmp_path))  # not Keras' published file


def test_fontdigits_is_deterministic_for_a_seed():
    a = fontdigits.build(seed=3, sizes=SMALL)
    b = fontdigits.build(seed=3, sizes=SMALL)
    c = fontdigits.build(seed=4, sizes=SMALL)
    for split in SMALL:
        np.testing.assert_array_equal(a[split][0], b[split][0])
        np.testing.assert_array_equal(a[split][1], b[split][1])
        assert not np.array_equal(a[split][0], c[split][0])
    images, labels = a["train"]
    assert images.shape == (600, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [60] * 10  # balanced classes
    assert 20 < images.mean() < 80  # dark background, bright strokes, as MNIST
    assert not np.array_equal(a["train"][0][:200], a["test"][0])


def test_fontdigits_cache_returns_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPELOOP_CACHE_DIR", str(tmp_path))
    first = fontdigits.load(seed=5, sizes=SMALL)
    assert len(list(tmp_path.glob("fontdigits-*.npz"))) == 1
    second = fontdigits.load(seed=5, sizes=SMALL)
    np.testing.assert_array_equal(first["test"][0], second["test"][0])


def _take(ds, n):
    return [x.numpy() for x in ds.take(n)]


def test_train_batches_are_float_in_unit_range_and_static():
    images = np.arange(100 * 4, dtype=np.uint32).reshape(100, 2, 2, 1).astype(np.uint8)
    ds = data.train_dataset(images, 16, seed=0)
    assert ds.element_spec.shape.as_list() == [16, 2, 2, 1]
    batch = _take(ds, 1)[0]
    assert batch.dtype == np.float32 and 0.0 <= batch.min() and batch.max() <= 1.0


def _ids(n):
    """Images whose first pixel encodes their index (n <= 256)."""
    return np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)


def _index(batch):
    return np.rint(batch[:, 0, 0, 0] * 255).astype(int)


def test_each_epoch_is_a_permutation_and_differs_by_seed():
    n, b = 100, 10
    epoch = np.concatenate([_index(x) for x in _take(data.train_dataset(_ids(n), b, 7), 10)])
    assert sorted(epoch) == list(range(n))
    other = np.concatenate([_index(x) for x in _take(data.train_dataset(_ids(n), b, 8), 10)])
    assert not np.array_equal(epoch, other)


def test_resume_at_a_step_gives_the_same_batches():
    full = _take(data.train_dataset(_ids(100), 10, seed=1), 25)
    resumed = _take(data.train_dataset(_ids(100), 10, seed=1, start_step=13), 12)
    for a, b in zip(full[13:], resumed):
        np.testing.assert_array_equal(a, b)


class _Ctx:
    def __init__(self, replicas, pipelines, pipeline_id):
        self.num_replicas_in_sync = replicas
        self.num_input_pipelines = pipelines
        self.input_pipeline_id = pipeline_id


@pytest.mark.parametrize("replicas,pipelines", [(2, 1), (4, 1), (4, 2)])
def test_replica_slices_rebuild_the_global_batch(replicas, pipelines):
    b = 20
    global_batches = [_index(x) for x in _take(data.train_dataset(_ids(100), b, 3), 5)]
    per_pipeline = []
    for pid in range(pipelines):
        ctx = _Ctx(replicas, pipelines, pid)
        per_pipeline.append([_index(x) for x in
                             _take(data.train_dataset(_ids(100), b, 3, input_context=ctx),
                                   5 * replicas // pipelines)])
    local = replicas // pipelines
    for step in range(5):
        pieces = [per_pipeline[p][step * local + r] for p in range(pipelines) for r in range(local)]
        np.testing.assert_array_equal(np.concatenate(pieces), global_batches[step])


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_eval_covers_every_example_exactly_once(replicas):
    n = 103
    ds = data.eval_dataset(_ids(n), 16, _Ctx(replicas, 1, 0) if replicas > 1 else None)
    seen = collections.Counter()
    for images, targets, weights in ds:
        assert images is targets or np.array_equal(images.numpy(), targets.numpy())
        assert images.shape[0] == 16 // replicas
        for i, w in zip(_index(images.numpy()), weights.numpy()):
            if w:
                seen[int(i)] += 1
    assert seen == collections.Counter(range(n))


def test_epoch_permutation_same_under_xla():
    eager = data.epoch_permutation(1000, 5, 2).numpy()
    compiled = tf.function(lambda: data.epoch_permutation(1000, 5, 2), jit_compile=True)()
    np.testing.assert_array_equal(eager, compiled.numpy())


def test_noisy_eval_set_is_fixed_and_pairs_with_clean_targets():
    ids = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1) * 6
    noisy = data.noisy_copy(ids, 0.4, seed=1)
    np.testing.assert_array_equal(noisy, data.noisy_copy(ids, 0.4, seed=1))  # every evaluation
    assert not np.array_equal(noisy, data.noisy_copy(ids, 0.4, seed=2))
    assert noisy.min() >= 0 and noisy.max() <= 1
    for inputs, targets, _ in data.eval_dataset(ids, 8, noise_factor=0.4, seed=1):
        clean = np.rint(targets.numpy()[:, 0, 0, 0] * 255).astype(int) // 6
        np.testing.assert_array_equal(inputs.numpy(), noisy[clean])


def test_synthetic_slices_are_generated_alone_and_bounded():
    whole = data.load_split("train[:2500]", "synthetic", synthetic_shape=(4, 4, 1))
    part = data.load_split("train[990:1010]", "synthetic", synthetic_shape=(4, 4, 1))
    np.testing.assert_array_equal(part.images, whole.images[990:1010])  # the same rows
    assert part.labels is None  # no made-up labels
    big = data.load_split("train[-3:]", "synthetic", synthetic_shape=(300, 300, 1))
    assert big.images.shape == (3, 300, 300, 1)
    with pytest.raises(ConfigError, match=r"GiB, over the 2 GiB limit.*slice the split smaller"):
        data.load_split("train", "synthetic", synthetic_shape=(300, 300, 1))


def test_a_damaged_fontdigits_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPELOOP_CACHE_DIR", str(tmp_path / "cache"))
    first = fontdigits.load(seed=2, sizes=SMALL)
    (cache,) = (tmp_path / "cache").iterdir()
    for damage in (b"", cache.read_bytes()[:1000]):  # empty, truncated zip
        cache.write_bytes(damage)
        again = fontdigits.load(seed=2, sizes=SMALL)
        np.testing.assert_array_equal(again["test"][0], first["test"][0])
        assert cache.stat().st_size > 1000  # rewritten whole
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TAPELOOP_CACHE_DIR", str(blocker))  # unusable: built, not cached
    np.testing.assert_array_equal(fontdigits.load(seed=2, sizes=SMALL)["test"][0],
                                  first["test"][0])
    assert blocker.read_text() == "not a folder"


def test_class_names_follow_the_split(idx_dir):
    """The latent-space figure names its labels: the names stay with a split sliced,
    resized and decoded into memory."""
    from core import plots, shapes

    sliced = data.load_split("test[:50]", "shapes")
    assert sliced.class_names == shapes.CLASS_NAMES
    resized = data.open_split("test[:50]", "shapes", image_size=(32, 32)).source
    assert resized.image_shape == (32, 32, 3) and resized.class_names == shapes.CLASS_NAMES
    assert data.materialize(resized) is resized
    fashion = data.load_split("test", "fashion_mnist", idx_dir, verify=False)
    assert fashion.class_names[9] == "Ankle boot"
    assert data.load_split("test", "mnist", idx_dir).class_names == ()  # digits: the numbers
    assert plots.label_names(np.array([0, 2]), shapes.CLASS_NAMES) == [(0, "disc"), (2, "triangle")]
    assert plots.label_names(np.array([1, 5]), ("a", "b")) == [(1, "b"), (5, "5")]
