"""The contract of layers/fast_forms.py: every faster form computes what the plain
layers compute (values, and gradients to the input and every weight), only where it was
chosen, and the runner chooses, logs and records the forms once."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import core
from conftest import ROOT, random_images
from core.config import Config
from helpers import run_train, served
from layers import blocks, fast_forms
from layers.autoencoders import build_autoencoder

GROUP = fast_forms.IMAGE_GROUP
# Whether oneDNN computes bfloat16 convolutions on this CPU (it needs AVX-512; conftest.py
# turns oneDNN on). Where it does not, the bfloat16 forms' tests check that the runner does
# not choose them, and why: TensorFlow's own kernels run those convolutions.
ONEDNN_BFLOAT16 = fast_forms.onednn_convolutions("bfloat16")


def _bfloat16_forms_not_chosen():
    forms, why = fast_forms.choose(False, "mixed_bfloat16")
    assert forms.image_groups == 1 and not forms.few_filters_transposed
    assert why.startswith("oneDNN has no bfloat16 convolutions on this CPU")
    assert fast_forms.choose(False, "float32")[0].image_groups == GROUP


def _value_and_gradients(fn, x, variables):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        # A weighted sum, so every output position has its own gradient.
        loss = tf.reduce_sum(tf.random.stateless_uniform(tf.shape(y), seed=[1, 2]) * y)
    return y, tape.gradient(loss, [x, *variables])


def _assert_same(fast, plain, x, variables, tol=1e-5):
    y, grads = _value_and_gradients(fast, x, variables)
    y_ref, grads_ref = _value_and_gradients(plain, x, variables)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=tol, atol=tol)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def _built(block, shape, seed=7):
    """`block` built on inputs of `shape`, with random weights (a nonzero bias catches
    where it is added)."""
    block(tf.zeros(shape))
    for v in block.trainable_variables:
        v.assign(tf.random.normal(v.shape, seed=seed))
    return block


def _conv_inputs(fn, x) -> list[tuple]:
    """The input shapes of the forward Conv2Ds in fn's traced graph."""
    graph = tf.function(fn).get_concrete_function(x).graph
    return [tuple(op.inputs[0].shape) for op in graph.get_operations() if op.type == "Conv2D"]


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_subpixel_upsample_conv_is_the_plain_block(kernel_size, activation):
    """Sub-pixel: the convolution runs on the small map (4x fewer positions), and computes
    exactly UpSampling2D -> Conv2D."""
    x = tf.random.uniform((3, 7, 5, 4), seed=3)
    block = _built(blocks.UpsampleConv(6, kernel_size, activation), x.shape)
    fast = lambda x: fast_forms.upsample_conv(block, x)  # noqa: E731
    small = _conv_inputs(fast, x)  # the small map (padded by a row or two for some kernels)
    assert len(small) == 1 and small[0][1] <= 7 + 2 and small[0][2] <= 5 + 2
    assert [s[1:3] for s in _conv_inputs(block, x)] == [(14, 10)]
    _assert_same(fast, block, x, block.trainable_variables)


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5, (3, 2)])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_upsample_then_conv_by_phases_is_the_plain_pair(kernel_size, activation, use_bias):
    """Keras' UpSampling2D then a 'same' Conv2D (the resnet decoder's pairs): one
    convolution of the small map per output phase, each with only the taps its phase
    reads (4 of a 3x3 kernel's 9), computing exactly the pair."""
    x = tf.random.uniform((3, 7, 5, 4), seed=3)
    up = tf.keras.layers.UpSampling2D(2)
    conv = _built(tf.keras.layers.Conv2D(6, kernel_size, padding="same", activation=activation,
                                         use_bias=use_bias), (3, 14, 10, 4))
    fast = lambda x: fast_forms.upsample_then_conv(up, conv, x)  # noqa: E731
    graph = tf.function(fast).get_concrete_function(x).graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert len(convs) == 4 and all(op.inputs[0].shape[1] <= 7 + 2 for op in convs)
    kh, kw = conv.kernel_size
    taps = sum(op.inputs[1].shape[0] * op.inputs[1].shape[1] for op in convs)
    # Along an axis, the two phases read ceil(k / 2) and ceil((k + 1) / 2) small pixels.
    assert taps == (((kh + 1) // 2 + (kh + 2) // 2) * ((kw + 1) // 2 + (kw + 2) // 2))
    assert taps < 4 * kh * kw or kh * kw == 1
    _assert_same(fast, lambda x: conv(up(x)), x, conv.trainable_variables)
    unknown = tf.function(fast, input_signature=[tf.TensorSpec((None, None, None, 4))])
    np.testing.assert_allclose(unknown(x).numpy(), conv(up(x)).numpy(), atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, (3, 1)])
@pytest.mark.parametrize("activation", [None, "sigmoid"])
@pytest.mark.parametrize("filters,use_bias", [(1, True), (3, True), (4, False)])
def test_few_filter_conv_by_transpose_is_the_conv(kernel_size, activation, filters, use_bias):
    """A 'same' Conv2D with few filters from many channels (the resnet's logits and code)
    as a transposed convolution (Conv2DBackpropInput forward, no Conv2D), computing exactly
    the conv: values and gradients, with the batch or the image size unknown too."""
    x = tf.random.uniform((3, 7, 5, 16), seed=3)
    conv = _built(tf.keras.layers.Conv2D(filters, kernel_size, padding="same",
                                         activation=activation, use_bias=use_bias), x.shape)
    assert fast_forms._few_filter_conv(conv)  # noqa: SLF001 - the selector under test
    fast = lambda x: fast_forms.conv_by_transpose(conv, x)  # noqa: E731
    graph = tf.function(fast).get_concrete_function(x).graph
    types = [op.type for op in graph.get_operations()]
    assert "Conv2D" not in types and types.count("Conv2DBackpropInput") == 1
    _assert_same(fast, conv, x, conv.trainable_variables)
    for spec in ((None, 7, 5, 16), (None, None, None, 16)):
        unknown = tf.function(fast, input_signature=[tf.TensorSpec(spec)])
        assert unknown.get_concrete_function().output_shapes[-1] == filters
        np.testing.assert_allclose(unknown(x).numpy(), conv(x).numpy(), atol=1e-5)


def test_few_filter_conv_by_transpose_in_bfloat16():
    """In bfloat16 the transposed form is as close to float32 as the plain conv: outputs
    and gradients, the bias's too (a sum over 16,384 pixels of an upstream gradient of
    either sign, which TensorFlow's BiasAddGrad would take in bfloat16: 10-40% off)."""
    x = tf.random.uniform((16, 32, 32, 16), seed=3)
    upstream = tf.random.stateless_normal((16, 32, 32, 3), seed=[4, 4])
    reference = _built(tf.keras.layers.Conv2D(3, 3, padding="same"), x.shape)
    conv = tf.keras.layers.Conv2D(3, 3, padding="same", dtype="mixed_bfloat16")
    conv.build(x.shape)
    conv.set_weights(reference.get_weights())
    assert fast_forms.conv_by_transpose(conv, x).dtype == tf.bfloat16
    if not ONEDNN_BFLOAT16:  # measured only on oneDNN's kernels, so not chosen here
        _bfloat16_forms_not_chosen()
        return

    @tf.function  # as training traces it (eagerly, BiasAddGrad happens to sum well)
    def value_and_gradients(fn, layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(fn(x), tf.float32)
        return [y, *tape.gradient(y, [x, *layer.trainable_variables],
                                  output_gradients=upstream)]

    ref = value_and_gradients(reference, reference)
    plain = value_and_gradients(conv, conv)
    fast = value_and_gradients(lambda x: fast_forms.conv_by_transpose(conv, x), conv)
    for a, p, r in zip(fast, plain, ref):
        a, p, r = a.numpy(), p.numpy(), r.numpy()
        assert np.linalg.norm(a - r) <= max(1.5 * np.linalg.norm(p - r),
                                            2e-3 * np.linalg.norm(r))


def test_activation_after_the_pool_in_bfloat16_sums_the_bias_gradient_in_float32():
    """Added after the pool, the bias gradient is summed in float32: TensorFlow's
    BiasAddGrad in a traced graph sums bfloat16 in bfloat16 (12,544 values per channel
    here). Against float32, the form's is within 3%, and closer than the plain block's."""
    x = tf.random.uniform((64, 28, 28, 1), seed=3)
    upstream = tf.random.stateless_normal((64, 14, 14, 8), seed=[4, 4])
    reference = _built(blocks.ConvPool(8, 3, "relu"), x.shape)
    block = blocks.ConvPool(8, 3, "relu", dtype="mixed_bfloat16")
    block(x)
    block.set_weights(reference.get_weights())

    @tf.function
    def bias_gradient(fn, layer):
        with tf.GradientTape() as tape:
            y = tf.cast(fn(x), tf.float32)
        return tape.gradient(y, layer.conv.bias, output_gradients=upstream)

    ref = bias_gradient(reference, reference).numpy()
    plain = bias_gradient(block, block).numpy()
    fast = bias_gradient(lambda x: fast_forms.conv_pool(block, x), block).numpy()
    # bfloat16 inputs and activations leave ~1% (max-pool winners and ReLU masks that
    # flip); a bfloat16 sum would leave ~12% (and the plain block, whose bias gradient
    # TensorFlow's BiasAddGrad takes here too, is ~6-10% off).
    assert np.linalg.norm(fast - ref) <= 0.03 * np.linalg.norm(ref)
    assert np.linalg.norm(fast - ref) <= np.linalg.norm(plain - ref)


def test_few_filter_conv_is_only_what_was_measured():
    """Computed transposed: at most 4 filters from at least 16 channels, stride 1, 'same'
    with odd kernels (an even one pads 'same' on one side: the transpose would pad the
    other); every other conv as it is."""
    def conv(channels=16, filters=3, kernel=3, **kwargs):
        layer = tf.keras.layers.Conv2D(filters, kernel, **{"padding": "same", **kwargs})
        layer.build((None, 8, 8, channels))
        return layer

    assert fast_forms._few_filter_conv(conv())  # noqa: SLF001
    assert not fast_forms._few_filter_conv(tf.keras.layers.Conv2D(3, 3, padding="same"))
    for other in (conv(channels=8), conv(filters=8), conv(kernel=2), conv(kernel=(3, 4)),
                  conv(padding="valid"), conv(strides=2), conv(dilation_rate=2)):
        assert not fast_forms._few_filter_conv(other)  # noqa: SLF001


def test_crop_gradient_as_a_pad():
    """The crop's hand-written gradient (a zero padding) is the slice's; no StridedSliceGrad."""
    x = tf.random.normal((2, 8, 9, 3), seed=1)
    fast = lambda x: fast_forms.crop_to(x, (7, 6))  # noqa: E731
    _assert_same(fast, lambda x: blocks.crop_to(x, (7, 6)), x, [])

    def gradient_ops(crop):
        def grad(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = crop(x, (7, 6))
            return tape.gradient(y, x)
        graph = tf.function(grad).get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    assert "StridedSliceGrad" in gradient_ops(blocks.crop_to)
    assert "StridedSliceGrad" not in gradient_ops(fast_forms.crop_to)


@pytest.mark.parametrize("activation", ["relu", "tanh", None, "gelu"])
def test_activation_after_the_pool(activation):
    """A non-decreasing activation commutes with the max: applied after the pool, the same
    function. A non-monotone one (gelu) stays before it."""
    x = tf.random.normal((3, 9, 10, 2), seed=5)
    block = _built(blocks.ConvPool(4, 3, activation), x.shape)
    _assert_same(lambda x: fast_forms.conv_pool(block, x), block, x, block.trainable_variables)


def _pool_and_gradient(pool, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = pool(x)
    return y, tape.gradient(y, x, output_gradients=upstream)


@pytest.mark.parametrize("shape", [(3, 7, 9, 5), (2, 8, 6, 3), (2, 1, 1, 2), (2, 5, 4, 2)])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16])
def test_max_pool_by_reshape_is_max_pool_with_its_ties(shape, dtype):
    """The max-pool by reshape against TensorFlow's own, bit for bit, eager and under
    XLA: odd sides (padded), and many ties (small integers after a ReLU), whose gradient
    goes to each window's first maximum as TensorFlow's MaxPoolGrad sends it."""
    rng = np.random.default_rng(sum(shape))
    x = tf.cast(np.maximum(np.round(1.5 * rng.standard_normal(shape)), 0), dtype)
    out = [(s + 1) // 2 for s in shape[1:3]]
    upstream = tf.cast(rng.standard_normal((shape[0], *out, shape[3])), dtype)
    y_ref, dx_ref = _pool_and_gradient(lambda x: tf.nn.max_pool2d(x, 2, 2, "SAME"), x, upstream)
    tied = int(tf.reduce_sum(tf.cast(tf.nn.max_pool2d(x, 2, 2, "SAME") == 0, tf.int32)))
    assert shape[1] == 1 or tied > 0  # the test holds ties to break
    for run in (_pool_and_gradient, tf.function(_pool_and_gradient, jit_compile=True)):
        y, dx = run(fast_forms.max_pool, x, upstream)
        assert y.dtype == dx.dtype == dtype
        np.testing.assert_array_equal(y.numpy(), y_ref.numpy())
        np.testing.assert_array_equal(dx.numpy(), dx_ref.numpy())


def test_max_pool_by_reshape_has_no_scatter_for_xla():
    """Its gradient holds no MaxPoolGrad for TensorFlow to trace and no select-and-scatter
    for XLA, the op XLA refuses under op determinism (and max_pool2d's has both)."""
    x = tf.random.normal((2, 7, 8, 3), seed=1)

    def gradient(pool):
        return tf.function(lambda x: _pool_and_gradient(pool, x, None)[1], jit_compile=True)

    ours, theirs = gradient(fast_forms.max_pool), gradient(lambda x: tf.nn.max_pool2d(
        x, 2, 2, "SAME"))
    ops = {op.type for op in ours.get_concrete_function(x).graph.get_operations()}
    assert "MaxPoolGrad" not in ops and "MaxPool" not in ops
    assert "select-and-scatter" not in ours.experimental_get_compiler_ir(x)(stage="hlo")
    assert "select-and-scatter" in theirs.experimental_get_compiler_ir(x)(stage="hlo")


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_conv_pool_with_the_max_pool_by_reshape_is_the_block(activation):
    """ConvPool with the deterministic pool, the activation after it (relu) or before it
    (gelu, not monotone), is the block as its layers say."""
    x = tf.random.normal((3, 9, 10, 2), seed=5)
    block = _built(blocks.ConvPool(4, 3, activation), x.shape)
    _assert_same(lambda x: fast_forms.conv_pool(block, x, deterministic_pool=True), block, x,
                 block.trainable_variables)


@pytest.mark.parametrize("crop_grad_as_pad", [True, False])
def test_transposed_up_block_crops_with_a_pad_gradient(crop_grad_as_pad):
    x = tf.random.normal((2, 4, 4, 3), seed=2)
    block = _built(blocks.ConvTransposeUp(5, 3, target_size=(7, 7)), x.shape)
    forms = fast_forms.Forms(crop_grad_as_pad=crop_grad_as_pad)
    _assert_same(lambda x: forms([block], x), block, x, block.trainable_variables)


def test_transposed_up_block_in_bfloat16_sums_the_bias_gradient_in_float32():
    """Keras' Conv2DTranspose adds its bias with a BiasAdd, whose gradient TensorFlow's CPU
    kernel sums in bfloat16 (8,192 values per channel here, of an upstream gradient with
    a mean, as a BCE's is): the plain block's is more than half off. In the forms it is
    within 3% of float32, with every other gradient as close as the plain block's."""
    x = tf.random.uniform((32, 8, 8, 16), seed=3)
    upstream = 0.5 + tf.random.stateless_normal((32, 16, 16, 8), seed=[4, 4])
    reference = _built(blocks.ConvTransposeUp(8, 3), x.shape)
    block = blocks.ConvTransposeUp(8, 3, dtype="mixed_bfloat16")
    block(x)
    block.set_weights(reference.get_weights())
    forms = fast_forms.Forms()

    @tf.function  # as training traces it: every variable's gradient at once
    def gradients(fn, layer):
        with tf.GradientTape() as tape:
            y = tf.cast(fn(x), tf.float32)
        return tape.gradient(y, layer.trainable_variables, output_gradients=upstream)

    ref, plain = gradients(reference, reference), gradients(block, block)
    fast = gradients(lambda x: forms([block], x), block)
    names = [v.name for v in block.trainable_variables]
    for name, a, p, r in zip(names, fast, plain, ref):
        a, p, r = a.numpy(), p.numpy(), r.numpy()
        if name == "bias":
            assert np.linalg.norm(p - r) > 0.5 * np.linalg.norm(r)
            assert np.linalg.norm(a - r) <= 0.03 * np.linalg.norm(r)
        else:
            assert np.linalg.norm(a - r) <= max(1.5 * np.linalg.norm(p - r),
                                                2e-3 * np.linalg.norm(r))


def test_image_groups_round_trip():
    """Image i's channel c lands at channel (i % g) * C + c of grouped image i // g."""
    x = tf.reshape(tf.range(16 * 3 * 2 * 5, dtype=tf.float32), (16, 3, 2, 5))
    grouped = fast_forms.to_image_groups(x, 8)
    assert tuple(grouped.shape) == (2, 3, 2, 40)
    np.testing.assert_array_equal(grouped[1, 2, 0, 3 * 5 + 4], x[8 + 3, 2, 0, 4])
    np.testing.assert_array_equal(fast_forms.from_image_groups(grouped, 8), x)


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


def _grouped_call(block, g, ungroup):
    def call(x):
        grouped = fast_forms.to_image_groups(x, g)
        if isinstance(block, blocks.UpsampleConv):
            y = fast_forms.upsample_conv(block, grouped, g, ungroup=ungroup)
        else:
            y = fast_forms.conv_pool(block, grouped, g)
        return y if ungroup else fast_forms.from_image_groups(y, g)
    return call


@pytest.mark.parametrize("make,shape,ungroup", [(*g, False) for g in GROUPED] + [
    (make, shape, True) for make, shape in GROUPED[-3:]])  # the UpsampleConvs
def test_grouped_blocks_are_the_plain_ones(make, shape, ungroup):
    """A block on images as the channels of one is the plain block on the images, values
    and gradients; UpsampleConv can also ungroup its output."""
    x = tf.random.normal((16, *shape), seed=6)
    block = _built(make(), x.shape)
    _assert_same(_grouped_call(block, GROUP, ungroup), block, x, block.trainable_variables)


def _grouped_convs(fn, x) -> int:
    """Convolutions in fn's traced graph whose input has more channels than their kernel
    reads: grouped ones, which only the images-as-channels layout makes."""
    graph = fn.get_concrete_function(x).graph
    return sum(1 for op in graph.get_operations() if op.type == "Conv2D"
               and op.inputs[0].shape[-1] != op.inputs[1].shape[2])


def _model_fn(model):
    return lambda x: _value_and_gradients(model, x, model.trainable_variables)


@pytest.mark.parametrize("name", ["seed", "keras_blog", "denoiser", "vae"])
@pytest.mark.parametrize("batch", [16, 13])
def test_models_in_fast_forms_compute_the_plain_function(name, batch):
    """Every registered conv model, in the forms with images as channels, against its plain
    layers: the same outputs and gradients, batch size known when traced (13 does not
    divide into groups and stays ordinary) and unknown (padded to whole groups). Only the
    few-filter models (seed, keras_blog) are grouped: the others have wide or strided
    blocks."""
    model = build_autoencoder(name)
    x = random_images(batch)
    y_ref, grads_ref = _value_and_gradients(model, x, model.trainable_variables)
    plain_convs = _grouped_convs(tf.function(_model_fn(model)), x)
    assert plain_convs == 0
    assert fast_forms.install(model, fast_forms.Forms(image_groups=GROUP))
    known = tf.function(_model_fn(model))
    unknown = tf.function(_model_fn(model), input_signature=[tf.TensorSpec((None, 28, 28, 1))])
    grouped = name in ("seed", "keras_blog")
    convs = 7  # 3 encoder blocks, 3 decoder blocks, the logits
    assert _grouped_convs(known, x) == (convs if grouped and batch % GROUP == 0 else 0)
    assert _grouped_convs(unknown, x) == (convs if grouped else 0)
    for y, grads in (known(x), unknown(x), _value_and_gradients(model, x,
                                                                model.trainable_variables)):
        np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, grads_ref):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,channels", [(8, 32), (4, 4), (1, 3)])
def test_group_norm_silu_by_hand_is_the_plain_pair(groups, channels):
    """GroupNorm then SiLU with its hand-written gradient, against Keras' layer and
    tf.nn.silu differentiated by the tape: values, and gradients to the input, gamma and
    beta; inputs far from zero mean (the two-pass variance), batch known and unknown."""
    norm = keras_norm = tf.keras.layers.GroupNormalization(groups)
    x = 3.0 + 2.0 * tf.random.stateless_normal((3, 8, 6, channels), seed=[4, 2])
    _built(keras_norm, x.shape)
    fast = lambda t: fast_forms.norm_silu(norm, t)  # noqa: E731
    _assert_same(fast, lambda t: tf.nn.silu(norm(t)), x, norm.trainable_variables)
    unknown = tf.function(fast, input_signature=[tf.TensorSpec((None, 8, 6, channels))])
    np.testing.assert_allclose(unknown(x).numpy(), tf.nn.silu(norm(x)).numpy(), atol=1e-5)


def _resnet_with_norms_moved(precision):
    model = build_autoencoder("resnet", (16, 24, 3), precision,
                              encoder_filters=(8, 16), decoder_filters=(16, 16))
    model(random_images(1, (16, 24, 3)))
    for v in model.trainable_variables:  # gamma and beta away from 1 and 0
        if "gamma" in v.path or "beta" in v.path:
            v.assign(v + tf.random.stateless_normal(v.shape, seed=[3, 3]) * 0.3)
    return model


def test_resnet_in_fast_forms_computes_the_plain_function():
    """The resnet with its GroupNorm+SiLU pairs by hand (in its residual blocks and before
    each half's last conv), its upsample+conv pairs by phases and its few-filter convs
    (the code, 16 -> 4, and the logits, 16 -> 3) transposed, against its plain layers:
    outputs and every gradient."""
    model = _resnet_with_norms_moved("float32")
    x = random_images(5, (16, 24, 3))
    y_ref, grads_ref = _value_and_gradients(model, x, model.trainable_variables)

    def ops(op_type):  # Keras' GroupNorm computes its statistics with Mean ops; the form sums
        graph = tf.function(_model_fn(model)).get_concrete_function(x).graph
        return sum(op.type == op_type for op in graph.get_operations())

    assert ops("Mean") == 2 * 10  # mean and variance of 10 GroupNorms
    convs = ops("Conv2D")
    assert fast_forms.install(model, fast_forms.Forms(few_filters_transposed=True))
    assert ops("Mean") == 0
    assert ops("Conv2D") == convs + 2 * 3  # each of 2 upsample+conv pairs: 4 phases
    # Forward, the code's and the logits' convs are transposed ones (and backward, their
    # gradients to the input are Conv2Ds in turn: the count above is unchanged by them).
    forward = [op.type for op in tf.function(model).get_concrete_function(x).graph
               .get_operations()]
    assert forward.count("Conv2DBackpropInput") == 2
    y, grads = _value_and_gradients(model, x, model.trainable_variables)
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads_ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)


def test_resnet_in_fast_forms_in_bfloat16():
    """In bfloat16 the hand-written pair computes SiLU in float32 before rounding, Keras'
    layers after, and the phases' kernels sum taps before rounding: against the float32
    model with the same weights, the forms are as close as the plain bfloat16 layers,
    outputs and all gradients together. Each gradient's error is within twice the plain
    layers', 1% of its size, or the plain layers' largest rounding error (a conv bias
    feeding a GroupNorm, or the last GroupNorm's gamma, has a gradient near zero: a sum
    that cancels in float32 and is all rounding in bfloat16, for both forms alike)."""
    reference = _resnet_with_norms_moved("float32")
    model = build_autoencoder("resnet", (16, 24, 3), "mixed_bfloat16",
                              encoder_filters=(8, 16), decoder_filters=(16, 16))
    x = random_images(5, (16, 24, 3))
    model(x)
    model.set_weights(reference.get_weights())
    y_ref, grads_ref = _value_and_gradients(reference, x, reference.trainable_variables)
    y_plain, grads_plain = _value_and_gradients(model, x, model.trainable_variables)
    assert fast_forms.install(model, fast_forms.Forms(few_filters_transposed=True)
                              ).few_filters_transposed
    y, grads = _value_and_gradients(model, x, model.trainable_variables)

    def err(a, b):
        return float(np.linalg.norm(a.numpy() - b.numpy()))

    def total(gradients):
        return float(np.sqrt(sum(err(g, r) ** 2 for g, r in zip(gradients, grads_ref))))

    assert err(y, y_ref) <= 1.5 * err(y_plain, y_ref)
    assert total(grads) <= 1.5 * total(grads_plain)
    noise = max(err(p, r) for p, r in zip(grads_plain, grads_ref))
    for a, p, r in zip(grads, grads_plain, grads_ref):
        assert err(a, r) <= max(2 * err(p, r), 0.01 * float(np.linalg.norm(r.numpy())), noise)


def test_image_groups_in_bfloat16():
    """The grouped layout computes the bfloat16 model too: against the float32 model with
    the same weights, outputs to 5% of their range (bfloat16 keeps 8 bits through seven
    layers), every gradient in the same direction
    (a weight's gradient sums 12,544 bfloat16 products: compare directions; the plain
    bfloat16 layers land within 0.95 of float32 too)."""
    reference = build_autoencoder("seed")
    model = build_autoencoder("seed", precision="mixed_bfloat16")
    model.set_weights(reference.get_weights())
    x = random_images(16)
    y_ref, grads_ref = _value_and_gradients(reference, x, reference.trainable_variables)
    fast_forms.install(model, fast_forms.Forms(image_groups=GROUP))
    assert _grouped_convs(tf.function(_model_fn(model)), x) == 7
    if not ONEDNN_BFLOAT16:  # TensorFlow's own kernels: no grouped gradient, so not chosen
        with pytest.raises(tf.errors.InvalidArgumentError, match="grouped convolutions"):
            _value_and_gradients(model, x, model.trainable_variables)
        _bfloat16_forms_not_chosen()
        return
    y, grads = _value_and_gradients(model, x, model.trainable_variables)
    scale = float(tf.reduce_max(tf.abs(y_ref)))
    np.testing.assert_allclose(y.numpy(), y_ref.numpy(), atol=0.05 * scale)
    for a, b in zip(grads[1:], grads_ref[1:]):
        a, b = a.numpy().ravel(), b.numpy().ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.95


def test_choose_groups_only_where_measured_faster(monkeypatch):
    """Images as channels: float32 and bfloat16 on oneDNN's CPU kernels, without XLA.
    Ordinary: GPUs (oneDNN does not run the convolutions), float16, XLA, oneDNN off."""
    def groups(*args, **kwargs):
        return fast_forms.choose(*args, **kwargs)[0].image_groups

    assert fast_forms.onednn_convolutions()  # the x86 Linux wheel, no GPU: oneDNN runs them
    assert groups(False, "float32") == groups(False, "mixed_bfloat16", onednn=True) == GROUP
    assert groups(False, "mixed_bfloat16") == (GROUP if ONEDNN_BFLOAT16 else 1)
    assert groups(False, "mixed_float16") == 1
    assert groups(True, "float32") == 1
    assert groups(False, "float32", onednn=False) == 1  # a GPU
    assert fast_forms.choose(True, "float32")[1].startswith("XLA compiles the step")
    # The few-filter convs transposed: chosen with the layout, and never exported.
    for args, on in (((False, "float32"), True), ((False, "mixed_bfloat16", True), True),
                     ((False, "mixed_bfloat16"), ONEDNN_BFLOAT16),
                     ((False, "mixed_float16"), False), ((True, "float32"), False)):
        assert fast_forms.choose(*args)[0].few_filters_transposed == on
    assert not fast_forms.choose(False, "float32", onednn=False)[0].few_filters_transposed
    assert not fast_forms.portable(fast_forms.choose(False, "float32")[0]).few_filters_transposed
    for forms, _ in (fast_forms.choose(True, "float32"), fast_forms.choose(False, "float32")):
        assert forms.act_after_pool and forms.subpixel and forms.crop_grad_as_pad
    # The max-pool by reshape: only where XLA compiles under op determinism, never exported.
    for args, on in (((True, "float32", None, True), True), ((False, "float32", None, True), False),
                     ((True, "mixed_bfloat16", False, True), True), ((True, "float32"), False)):
        assert fast_forms.choose(*args)[0].deterministic_pool == on
    assert fast_forms.choose(True, "float32", None, True)[0].image_groups == 1
    assert not fast_forms.portable(fast_forms.choose(True, "float32", None, True)[0]
                                   ).deterministic_pool
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert not fast_forms.onednn_convolutions() and groups(False, "float32") == 1


def test_xla_compiles_the_ordinary_layout():
    """What choose gives under XLA computes the seed model's function inside jit_compile."""
    model = build_autoencoder("seed")
    x = random_images(16)
    y_ref = model(x)
    forms, _ = fast_forms.choose(True, "float32")
    fast_forms.install(model, forms)
    compiled = tf.function(lambda x: model(x), jit_compile=True)
    assert _grouped_convs(compiled, x) == 0
    np.testing.assert_allclose(compiled(x).numpy(), y_ref.numpy(), rtol=1e-5, atol=1e-5)


def test_with_onednn_off_the_runner_keeps_the_ordinary_layout(tmp_path):
    """A process that starts with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0, as on builds
    without it) trains in the ordinary layout, says why in its log and records it."""
    model_dir = tmp_path / "run"
    proc = run_train("--dataset=fontdigits", "--train_split=train[:256]",
                     "--eval_split=test[:64]", f"--model_dir={model_dir}", "--train_steps=2",
                     "--batch_size=32", env={"TF_ENABLE_ONEDNN_OPTS": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.load(open(model_dir / "config.json"))
    assert saved["resolved_forms"].endswith("ordinary layout")
    assert "computation forms: " in proc.stderr and "oneDNN does not run" in proc.stderr


def test_train_py_turns_onednn_on_unless_told_otherwise(tmp_path):
    """train.py sets TF_ENABLE_ONEDNN_OPTS=1 where it is unset (TensorFlow would leave
    oneDNN off on an AVX2-only CPU): a process started without the variable trains in
    the images-as-channels layout on any x86 host."""
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    model_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--dataset=fontdigits", "--train_split=train[:256]",
         "--eval_split=test[:64]", f"--model_dir={model_dir}", "--train_steps=2",
         "--batch_size=32"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "oneDNN runs the convolutions, without XLA, in float32" in proc.stderr
    saved = json.load(open(model_dir / "config.json"))
    assert saved["resolved_forms"].endswith(f"images-as-channels groups of {GROUP}")


def test_the_runner_records_the_forms_and_exports_the_portable_ones(tmp_path):
    """A CPU run trains with images as channels (config.json says so); its SavedModel has
    no grouped convolution, and reconstructs what the run's model reconstructs."""
    model_dir = str(tmp_path / "run")
    config = Config(dataset="fontdigits", train_split="train[:256]", eval_split="test[:64]",
                    model_dir=model_dir, train_steps=2, epochs=None, batch_size=32, mode="train")
    core.run(config)
    saved = json.load(open(os.path.join(model_dir, "config.json")))
    assert saved["resolved_forms"] == fast_forms.Forms(image_groups=GROUP,
                                                       norm_act=False).describe()
    exported = core.run(Config(mode="export", model_dir=model_dir), given={"mode", "model_dir"})
    loaded = tf.saved_model.load(exported["export_dir"])
    x = random_images(8)
    reconstruct = loaded.signatures["reconstruct"]
    graph = reconstruct.graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    for f in graph._functions.values():  # noqa: SLF001 - the signature's nested functions
        convs += [op for op in f.graph.get_operations() if op.type == "Conv2D"]
    assert convs and all(op.inputs[0].shape[-1] == op.inputs[1].shape[2] for op in convs)
    evaluated = core.run(Config(mode="eval", model_dir=model_dir), given={"mode", "model_dir"})
    assert np.isfinite(evaluated["bce"])
    assert tuple(reconstruct(images=x)["images"].shape) == (8, 28, 28, 1)


def test_a_resnet_run_records_the_forms_its_layers_have(tmp_path):
    """The resnet trains with its GroupNorm+SiLU pairs by hand, its upsample+conv pairs by
    phases and its code's conv (16 -> 4) transposed, and nothing else (it has no blocks
    for the other forms: the log and config.json say only what runs), and its export,
    which holds the hand-written pair, loads and reconstructs in plain TensorFlow."""
    model_dir = tmp_path / "run"
    proc = run_train("--dataset=shapes", "--image_size=32,32", "--model=resnet",
                     "--encoder_filters=8,16", "--decoder_filters=16,8",
                     "--train_split=train[:128]", "--eval_split=test[:32]",
                     f"--model_dir={model_dir}", "--train_steps=2", "--batch_size=16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.load(open(model_dir / "config.json"))
    assert saved["resolved_forms"] == ("sub-pixel upsample+conv, GroupNorm+SiLU by hand, "
                                       "few-filter convs transposed, ordinary layout")
    assert ("computation forms: sub-pixel upsample+conv, GroupNorm+SiLU by hand, few-filter "
            "convs transposed, ordinary layout (the model's layers "
            "have no images-as-channels form)") in proc.stderr
    exported = core.run(Config(mode="export", model_dir=str(model_dir)),
                        given={"mode", "model_dir"})
    loaded = tf.saved_model.load(exported["export_dir"])
    x = random_images(4, (32, 32, 3))
    out = loaded.signatures["reconstruct"](images=x)["images"]
    assert out.shape == (4, 32, 32, 3) and np.isfinite(out.numpy()).all()
    # GroupNorm's scales and offsets restored as TF Serving restores them.
    np.testing.assert_allclose(served(exported["export_dir"], "reconstruct", images=np.asarray(x))["images"],
                               out.numpy(), atol=1e-6)
