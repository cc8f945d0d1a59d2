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


# (input channels, size, filters, kernel, batch) -> the form ConvPool computes in.
FORMS = [
    (1, 28, 8, 4, 16, "images_as_channels"),  # the seed model's down0
    (1, 12, 8, 3, 3, "images_as_channels"),  # batch not a multiple of 8: Conv2D inside
    (8, 14, 4, 4, 5, "space_to_depth"),  # the seed model's down1
    (3, 10, 4, 5, 2, "space_to_depth"),
    (2, 12, 3, 6, 2, "space_to_depth"),  # an even kernel wider than 4
    (1, 28, 16, 3, 8, "plain"),  # wide enough for Conv2D
    (8, 14, 8, 4, 2, "plain"),
    (8, 14, 4, 3, 2, "plain"),  # a 3x3 kernel would read 4x the values on the block map
    (8, 7, 4, 4, 2, "plain"),  # odd size
]


@pytest.mark.parametrize("cin,size,filters,kernel_size,batch,form", FORMS)
def test_conv_pool_forms_equal_conv_then_max_pooling(cin, size, filters, kernel_size, batch, form):
    """Every form ConvPool computes in is Conv2D -> MaxPooling2D, values and gradients,
    with a batch size known when traced and unknown (padded to a multiple of 8)."""
    x = tf.random.normal((batch, size, size, cin), seed=6)
    block = blocks.ConvPool(filters, kernel_size, "relu")
    block(x)
    assert block.form == form
    block.conv.bias.assign(tf.random.normal(block.conv.bias.shape, seed=7))  # catches its placement
    reference = tf.keras.Sequential([
        tf.keras.layers.Conv2D(filters, kernel_size, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(2, padding="same")])
    _assert_same_function(block, reference, x)
    unknown_batch = tf.function(block, input_signature=[tf.TensorSpec((None, size, size, cin))])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y, y_ref = unknown_batch(x), reference(x)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=1e-5)
    for a, b in zip(tape.gradient(y, [x, *block.trainable_variables]),
                    tape.gradient(y_ref, [x, *reference.trainable_variables])):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_conv_pool_forms_only_on_cpu_in_float32(monkeypatch):
    """GPUs and other precisions get the plain Conv2D -> MaxPooling2D: the forms were
    measured faster only for oneDNN's float32 kernels."""
    x = tf.zeros((8, 28, 28, 1))
    bf16 = blocks.ConvPool(8, 4, dtype="mixed_bfloat16")
    bf16(x)
    assert bf16.form == "plain"
    monkeypatch.setattr(blocks, "_has_gpu", lambda: True)
    on_gpu = blocks.ConvPool(8, 4)
    on_gpu(x)
    assert on_gpu.form == "plain"
    monkeypatch.setattr(blocks, "_has_gpu", lambda: False)
    on_cpu = blocks.ConvPool(8, 4)
    on_cpu(x)
    assert on_cpu.form == "images_as_channels"


def _conv_op_types(fn, x):
    return {op.type for op in fn.get_concrete_function(x).graph.get_operations() if "Conv" in op.type}


def test_conv_pool_forms_stay_plain_under_xla():
    """XLA's CPU convolutions are not oneDNN's: traced for XLA (here nested in an outer
    tf.function, as the Trainer does), the block computes Conv2D -> MaxPooling2D."""
    x = tf.random.uniform((16, 28, 28, 1), seed=8)
    block = blocks.ConvPool(8, 4)
    block(x)
    assert block.form == "images_as_channels"
    assert _conv_op_types(tf.function(block), x) == {"DepthwiseConv2dNative"}
    compiled = tf.function(block, jit_compile=True)
    assert _conv_op_types(compiled, x) == {"Conv2D"}
    np.testing.assert_allclose(tf.function(lambda x: compiled(x))(x).numpy(), block(x).numpy(),
                               atol=1e-5)
