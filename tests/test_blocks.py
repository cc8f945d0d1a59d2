import numpy as np
import pytest
import tensorflow as tf

from layers import blocks

BLOCKS = [
    (blocks.ConvPool, dict(filters=8, kernel_size=4), (2, 14, 14, 8)),
    (blocks.ConvPool, dict(filters=3, kernel_size=3, pool=False), (2, 28, 28, 3)),
    (blocks.ConvUpsample, dict(filters=4, kernel_size=4), (2, 56, 56, 4)),
    (blocks.ConvStride, dict(filters=5, kernel_size=3), (2, 14, 14, 5)),
    (blocks.ConvTransposeUp, dict(filters=6, kernel_size=3), (2, 56, 56, 6)),
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
        assert config[key] == value
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
