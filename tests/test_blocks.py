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


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_upsample_conv_equals_upsampling_then_conv(kernel_size, activation):
    """The fused (sub-pixel) form computes exactly UpSampling2D -> Conv2D, gradients too."""
    x = tf.random.uniform((3, 7, 5, 4), seed=3)
    fused = blocks.UpsampleConv(6, kernel_size, activation)
    fused(x)
    assert fused.fused
    reference = tf.keras.Sequential([
        tf.keras.layers.UpSampling2D(2),
        tf.keras.layers.Conv2D(6, kernel_size, padding="same", activation=activation)])
    reference(x)
    reference.set_weights(fused.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_fused, y_ref = fused(x), reference(x)
        l_fused, l_ref = tf.reduce_sum(y_fused ** 2), tf.reduce_sum(y_ref ** 2)
    np.testing.assert_allclose(y_fused.numpy(), y_ref.numpy(), atol=1e-5)
    for a, b in zip(tape.gradient(l_fused, [x, *fused.trainable_variables]),
                    tape.gradient(l_ref, [x, *reference.trainable_variables])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def _assert_same_function(block, reference, x):
    """Same outputs, and the same gradients for the input and every weight."""
    block(x)
    reference(x)
    reference.set_weights(block.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y, y_ref = block(x), reference(x)
        # A weighted sum, so every output position has its own gradient.
        w = tf.random.stateless_uniform(tf.shape(y), seed=[1, 2])
        loss, loss_ref = tf.reduce_sum(w * y), tf.reduce_sum(w * y_ref)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=1e-5)
    grads = tape.gradient(loss, [x, *block.trainable_variables])
    grads_ref = tape.gradient(loss_ref, [x, *reference.trainable_variables])
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_upsample_conv_with_crop_equals_upsampling_crop_conv():
    """The crop's hand-written gradient (a zero padding) is the slice's gradient."""
    x = tf.random.uniform((2, 4, 4, 3), seed=4)
    block = blocks.UpsampleConv(5, 4, "relu", target_size=(7, 7))
    assert tuple(block(x).shape) == (2, 7, 7, 5) and not block.fused
    _assert_same_function(block, tf.keras.Sequential([
        tf.keras.layers.UpSampling2D(2), tf.keras.layers.Cropping2D(((0, 1), (0, 1))),
        tf.keras.layers.Conv2D(5, 4, padding="same", activation="relu")]), x)


@pytest.mark.parametrize("activation", ["relu", "tanh", None, "gelu"])
def test_conv_pool_equals_conv_then_max_pooling(activation):
    """ConvPool applies a non-decreasing activation after the pool (4x fewer values):
    the same function and gradients as Conv2D(activation) -> MaxPooling2D. A
    non-monotone one (gelu) stays before the pool."""
    x = tf.random.normal((3, 9, 10, 2), seed=5)
    block = blocks.ConvPool(4, 3, activation)
    block(x)
    assert block.act_after_pool == (activation != "gelu")
    _assert_same_function(block, tf.keras.Sequential([
        tf.keras.layers.Conv2D(4, 3, padding="same", activation=activation),
        tf.keras.layers.MaxPooling2D(2, padding="same")]), x)


def test_image_groups_round_trip():
    """Image i's channel c lands at channel (i % g) * C + c of grouped image i // g."""
    x = tf.reshape(tf.range(16 * 3 * 2 * 5, dtype=tf.float32), (16, 3, 2, 5))
    grouped = blocks.to_image_groups(x, 8)
    assert tuple(grouped.shape) == (2, 3, 2, 40)
    np.testing.assert_array_equal(grouped[1, 2, 0, 3 * 5 + 4], x[8 + 3, 2, 0, 4])
    np.testing.assert_array_equal(blocks.from_image_groups(grouped, 8), x)


# Blocks with a grouped form: (block, its input shape).
GROUPED = [
    (lambda: blocks.ConvPool(8, 4), (28, 28, 1)),  # the seed model's down0
    (lambda: blocks.ConvPool(4, 4), (14, 14, 8)),
    (lambda: blocks.ConvPool(4, 4), (7, 7, 4)),  # an odd size: 'same' pooling pads
    (lambda: blocks.ConvPool(3, 3, "gelu"), (6, 6, 2)),  # a non-monotone activation pools last
    (lambda: blocks.ConvPool(4, 4, pool=False), (4, 4, 4)),
    (lambda: blocks.UpsampleConv(4, 4, target_size=(7, 7)), (4, 4, 4)),  # upsample, crop, conv
    (lambda: blocks.UpsampleConv(8, 4), (7, 7, 4)),  # sub-pixel
    (lambda: blocks.UpsampleConv(2, 5, None), (5, 6, 3)),  # sub-pixel with explicit padding
]


@pytest.mark.parametrize("make,shape,ungroup", [(*g, False) for g in GROUPED] + [
    (make, shape, True) for make, shape in GROUPED[-3:]])  # the UpsampleConvs
def test_grouped_blocks_equal_the_ordinary_ones(make, shape, ungroup):
    """`call_grouped` on images as the channels of one is `call` on the images, values
    and gradients (input and weights); UpsampleConv can also ungroup its output."""
    g = blocks.IMAGE_GROUP
    x = tf.random.normal((16, *shape), seed=6)
    block = make()
    block(x)
    for v in block.trainable_variables:  # a nonzero bias catches where it is added
        v.assign(tf.random.normal(v.shape, seed=7))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_ref = block(x)
        if ungroup:
            y = block.call_grouped(blocks.to_image_groups(x, g), g, ungroup=True)
        else:
            y = blocks.from_image_groups(block.call_grouped(blocks.to_image_groups(x, g), g), g)
        w = tf.random.stateless_uniform(tf.shape(y), seed=[1, 2])
        loss, loss_ref = tf.reduce_sum(w * y), tf.reduce_sum(w * y_ref)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-5, atol=1e-5)
    sources = [x, *block.trainable_variables]
    for a, b in zip(tape.gradient(loss, sources), tape.gradient(loss_ref, sources)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
