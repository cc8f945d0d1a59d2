import numpy as np
import pytest
import tensorflow as tf

from layers import blocks

BLOCKS = [
    (blocks.ConvPool, dict(filters=8, kernel_size=4), (2, 14, 14, 8)),
    (blocks.ConvPool, dict(filters=3, kernel_size=3, pool=False), (2, 28, 28, 3)),
    (blocks.UpsampleConv, dict(filters=4, kernel_size=4), (2, 56, 56, 4)),
    (blocks.UpsampleConv, dict(filters=4, kernel_size=3, target_size=(55, 54)), (2, 55, 54, 4)),
    (blocks.ConvStride, dict(filters=5, kernel_size=3), (2, 14, 14, 5)),
    (blocks.ConvTransposeUp, dict(filters=6, kernel_size=3), (2, 56, 56, 6)),
    (blocks.ConvTransposeUp, dict(filters=6, kernel_size=3, target_size=(55, 55)), (2, 55, 55, 6)),
]


@pytest.mark.parametrize("cls,kwargs,expected", BLOCKS)
def test_block_output_shape(cls, kwargs, expected):
    out = cls(**kwargs)(tf.zeros((2, 28, 28, 1)))
    assert tuple(out.shape) == expected


@pytest.mark.parametrize("cls,kwargs,expected", BLOCKS)
def test_block_get_config_round_trip(cls, kwargs, expected):
    block = cls(**kwargs, name="b")
    x = tf.random.uniform((2, 28, 28, 1), seed=1)
    y = block(x)
    config = block.get_config()
    for key, value in kwargs.items():
        assert config[key] == value, key
    clone = cls.from_config(config)
    clone(x)
    clone.set_weights(block.get_weights())
    assert clone.get_config() == config
    np.testing.assert_allclose(clone(x).numpy(), y.numpy(), rtol=1e-6)


@pytest.mark.parametrize("cls,kwargs,expected", BLOCKS)
def test_block_gradient_reaches_every_weight(cls, kwargs, expected):
    block = cls(**kwargs)
    x = tf.random.uniform((2, 28, 28, 1), seed=2)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(block(x)))
    grads = tape.gradient(loss, block.trainable_variables)
    assert len(grads) == 2  # kernel and bias
    assert all(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in grads)


def test_blocks_are_the_keras_layers_they_name():
    """conv+pool is Conv2D -> MaxPooling2D and upsample+conv UpSampling2D -> Cropping2D ->
    Conv2D, with the same weights (the plain form; the faster ones: test_fast_forms.py)."""
    x = tf.random.normal((3, 4, 4, 3), seed=4)
    up = blocks.UpsampleConv(5, 4, "relu", target_size=(7, 7))
    _assert_same_function(up, tf.keras.Sequential([
        tf.keras.layers.UpSampling2D(2), tf.keras.layers.Cropping2D(((0, 1), (0, 1))),
        tf.keras.layers.Conv2D(5, 4, padding="same", activation="relu")]), x)
    pool = blocks.ConvPool(4, 3, "tanh")
    _assert_same_function(pool, tf.keras.Sequential([
        tf.keras.layers.Conv2D(4, 3, padding="same", activation="tanh"),
        tf.keras.layers.MaxPooling2D(2, padding="same")]), tf.random.normal((3, 9, 10, 2), seed=5))


def _assert_same_function(block, reference, x):
    """Same outputs, and the same gradients for the input and every weight."""
    block(x)
    reference(x)
    reference.set_weights(block.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y, y_ref = block(x), reference(x)
        w = tf.random.stateless_uniform(tf.shape(y), seed=[1, 2])
        loss, loss_ref = tf.reduce_sum(w * y), tf.reduce_sum(w * y_ref)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=1e-5)
    grads = tape.gradient(loss, [x, *block.trainable_variables])
    grads_ref = tape.gradient(loss_ref, [x, *reference.trainable_variables])
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
