"""--augment: the flip and the crop, their draws per step, XLA, and a resume that repeats them."""

import numpy as np
import pytest
import tensorflow as tf

from core import augment
from core.config import Config
from core.errors import ConfigError
from helpers import event_tags, graph_nodes, run_train
from layers.autoencoders import build_autoencoder

SEED = tf.constant([7, 11], tf.int64)


def _images(n=64, h=12, w=16, c=3, seed=0):
    return tf.constant(np.random.default_rng(seed).random((n, h, w, c)), tf.float32)


def _flip(x, seed):
    return augment.augment(x, ("flip",), seed)


def _crop(x, seed):
    return augment.augment(x, ("crop",), seed)


def test_flip_mirrors_about_half_the_images_and_leaves_the_others():
    x = _images()
    y = _flip(x, SEED).numpy()
    mirrored = [np.array_equal(y[i], x[i, :, ::-1].numpy()) for i in range(64)]
    kept = [np.array_equal(y[i], x[i].numpy()) for i in range(64)]
    assert all(m != k for m, k in zip(mirrored, kept))  # each image one or the other
    assert 20 <= sum(mirrored) <= 44
    assert np.array_equal(_flip(x, SEED), y)  # a function of the seed
    other = _flip(x, SEED + 1).numpy()
    assert not np.array_equal(other, y)


def test_resample_is_exact_on_a_ramp_and_the_identity_on_the_whole_span():
    x = _images(n=2)
    whole = augment._resample(x, tf.zeros([2]), tf.fill([2], 16.0), axis=2)
    np.testing.assert_allclose(whole, x, atol=1e-6)
    # Bilinear sampling of a linear function is exact: columns 4-12 of a ramp, stretched.
    ramp = tf.tile(tf.range(16, dtype=tf.float32)[None, None, :, None], [2, 3, 1, 1])
    out = augment._resample(ramp, tf.constant([4.0, 2.0]), tf.constant([8.0, 12.0]), axis=2)
    j = np.arange(16)
    np.testing.assert_allclose(out[0, 0, :, 0], 4 + (j + 0.5) * 0.5 - 0.5, atol=1e-5)
    np.testing.assert_allclose(out[1, 0, :, 0], 2 + (j + 0.5) * 0.75 - 0.5, atol=1e-5)


def test_crop_zooms_into_each_image_by_its_own_box():
    x = _images()
    y = _crop(x, SEED).numpy()
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0 and y.max() <= 1  # interpolation stays in the images' range
    changed = [not np.allclose(y[i], x[i], atol=1e-3) for i in range(64)]
    assert sum(changed) >= 60  # a box of exactly the whole image has probability 0
    assert np.array_equal(_crop(x, SEED), y)


@pytest.mark.parametrize("kinds", [("flip",), ("crop",), ("flip", "crop")])
def test_xla_compiles_it_and_draws_the_same_each_time(kinds):
    """(XLA's stateless RNG gives other numbers than TensorFlow's kernels for one seed, so a
    run's draws are its own with or without XLA, as the denoising noise's are.)"""
    x = _images(n=64)
    step = tf.function(lambda x: augment.augment(x, kinds, SEED), jit_compile=True)
    y = step(x).numpy()
    assert np.array_equal(step(x).numpy(), y)
    if kinds == ("flip",):
        mirrored = sum(np.array_equal(y[i], x[i, :, ::-1].numpy()) for i in range(64))
        kept = sum(np.array_equal(y[i], x[i].numpy()) for i in range(64))
        assert mirrored + kept == 64 and 20 <= mirrored <= 44
    else:
        assert y.min() >= 0 and y.max() <= 1 and not np.allclose(y, x.numpy(), atol=1e-3)


def test_bad_augment_values_are_one_line():
    with pytest.raises(ConfigError, match=r"^--augment=flip,rotate: 'rotate' is unknown: "
                                          r"choose from flip, crop"):
        Config(augment="flip,rotate")
    with pytest.raises(ConfigError, match="names an augmentation twice"):
        Config(augment="flip,flip")
    assert Config(augment=" flip , crop").augmentations == ("flip", "crop")


def _weights(checkpoint):
    model = build_autoencoder("seed")
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial()
    return {v.path: v.numpy() for v in model.weights}


def test_an_augmented_run_trains_and_resumes_exactly(tmp_path):
    """The augmentation is in the traced step (TensorBoard's graph shows it), and a run
    stopped at step 6 and resumed ends with an uninterrupted run's weights."""
    def flags(model_dir, steps):  # subprocesses: --deterministic is process-wide
        return ["--dataset=synthetic", "--synthetic_shape=28,28,1", "--train_split=train[:512]",
                "--eval_split=test[:64]", f"--train_steps={steps}", "--batch_size=32",
                "--steps_per_loop=3", "--eval_every=6", "--augment=flip,crop",
                "--deterministic", "--seed=5", f"--model_dir={model_dir}"]

    for model_dir, steps in ((tmp_path / "whole", 12), (tmp_path / "cut", 6),
                             (tmp_path / "cut", 12)):
        proc = run_train(*flags(model_dir, steps))
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "augmentation of each training batch" in proc.stderr and "(step 6)" in proc.stderr
    nodes, _ = graph_nodes(str(tmp_path / "whole" / "train"))
    assert {"ReverseV2", "GatherV2"} <= set(nodes.values())
    assert [s for s, _ in event_tags(str(tmp_path / "whole" / "train"))["augmented"]] == [0]
    a = _weights(str(tmp_path / "whole" / "ckpt-12"))
    b = _weights(str(tmp_path / "cut" / "ckpt-12"))
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6
    # Not augmented: other weights, and no flip in the step.
    proc = run_train(*[f for f in flags(tmp_path / "plain", 12) if f != "--augment=flip,crop"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = _weights(str(tmp_path / "plain" / "ckpt-12"))
    assert max(float(np.max(np.abs(a[k] - c[k]))) for k in a) > 1e-4
    nodes, _ = graph_nodes(str(tmp_path / "plain" / "train"))
    assert "ReverseV2" not in set(nodes.values())
    assert "augmented" not in event_tags(str(tmp_path / "plain" / "train"))


def test_the_draws_do_not_depend_on_how_the_batch_is_split():
    """Batch shards and micro-batches give the unsplit step's update, augmented too: each
    image's draws are made for the whole batch (and the flip and crop run per shard)."""
    from core.trainer import Trainer

    images = _images(n=16, h=28, w=28, c=1)
    results = []
    for shards, accum in ((1, 1), (2, 1), (2, 2)):
        tf.keras.utils.set_random_seed(0)
        trainer = Trainer(build_autoencoder("seed"), tf.distribute.get_strategy(), 16, 1e-3,
                          batch_shards=shards, accum_steps=accum, augment=("flip", "crop"),
                          noise_factor=0.2, eager=True)
        loss, grads = trainer.replica_forward_backward(images, tf.constant([[1, 2], [3, 4],
                                                                            [5, 6]], tf.int64))
        results.append((float(loss), [g.numpy() for g in grads]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for g, e in zip(grads, results[0][1]):
            np.testing.assert_allclose(g, e, rtol=1e-3, atol=1e-6)
