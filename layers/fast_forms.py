"""Faster forms of the same functions: the one room where speed tricks live.

The models in `layers/` compute what their layers say (`layers/blocks.py`). Given
`Forms`, an `Encoder` or `Decoder` computes the same function (same weights, the
same outputs and gradients up to float rounding) in faster forms:

- act_after_pool: conv+pool applies a non-decreasing activation after the 2x2
  max-pool instead of before it (they commute): 4x fewer values to activate.
- subpixel: upsample+conv without a crop is computed on the small map, and the
  output phases interleaved: no upsampled map, fewer FLOPs. The tutorial's few-channel
  blocks fold the kernel into one convolution with 4x the output channels (one per
  phase); the resnet's UpSampling2D + Conv2D pairs (16-64 channels) run one
  convolution per phase, each with only the taps its phase reads (2x2 of a 3x3 kernel:
  2.25x fewer FLOPs; benchmarks/NOTES.md section 17).
- crop_grad_as_pad: a centred crop's gradient is a zero padding, instead of
  TensorFlow's StridedSliceGrad (0.5 ms per step for the seed model's 8x8 -> 7x7
  crop; a pad takes a tenth of that).
- norm_act: GroupNorm followed by SiLU (the resnet's pairs) as one function with a
  hand-written gradient: the gradient in a dozen element-wise passes over the
  activations instead of the tape's ~30 (benchmarks/NOTES.md section 15).
- few_filters_transposed: a 'same' Conv2D of stride 1 with few filters from many
  channels (the resnet's logits, 32 -> 3, and its code, 64 -> 4) as the transposed
  convolution of its kernel flipped, with its two channel axes swapped: the same sums,
  whose backward passes are then those of a convolution with few *input* channels,
  which oneDNN runs far faster than few output channels (1.3-1.4x forward and backward
  together, benchmarks/NOTES.md section 18). Only on oneDNN's CPU kernels, without XLA,
  in float32 or bfloat16, where it was measured.
- deterministic_pool: the 2x2 max-pool as a reshape and a max, with max-pool's gradient
  (to each window's first maximum, as TensorFlow's MaxPoolGrad sends it) written as
  element-wise ops and reductions. XLA has no deterministic form of max-pool's own
  gradient (select-and-scatter), so with op determinism it refuses to compile it; this
  form lets `--deterministic` keep XLA. Only there (benchmarks/NOTES.md section 20): XLA
  on this CPU runs it 1.33x faster than its own max-pool too, but the step without XLA
  is faster still, and on GPUs it is unmeasured.
- image_groups: groups of 4 images become the channels of one and every convolution
  a grouped one with the same kernel (`to_image_groups`), so the few-channel layers
  write 4x more output channels per call: what oneDNN's CPU kernels need
  (benchmarks/NOTES.md section 10). Only where it was measured faster: oneDNN running
  the convolutions, no XLA, float32 or bfloat16, and stacks whose blocks have
  <= 16 filters.

The runner chooses the forms once (`choose`: from the device, XLA, precision and
oneDNN), logs the choice, records it in config.json and `install`s it. Models never
inspect their environment while they are traced. `tests/test_fast_forms.py` is this
seam's contract: each form against the plain layers, values and gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow as tf

from layers import blocks, resnet

keras = tf.keras

# Images per group in the images-as-channels layout.
IMAGE_GROUP = 4
# The widest block, and the compute dtypes, the layout was measured faster for
# (benchmarks/NOTES.md section 10).
GROUPED_MAX_FILTERS = 16
GROUPED_DTYPES = ("float32", "bfloat16")
# The convolutions computed transposed (`_few_filter_conv`): at most this many filters
# from at least this many channels, where oneDNN ran them faster in both dtypes above.
TRANSPOSED_MAX_FILTERS = 4
TRANSPOSED_MIN_CHANNELS = 16
# Activations that never decrease: they commute with max-pooling.
MONOTONE = ("relu", "relu6", "elu", "selu", "leaky_relu", "sigmoid", "tanh", "softplus",
            "linear", None)


def onednn_convolutions(dtype: str = "float32") -> bool:
    """Whether oneDNN runs this process's convolutions in `dtype`, the only kernels the
    grouped layout was measured faster on (and the only CPU kernels with a grouped
    convolution's gradient): TensorFlow built with it (the x86 Linux wheels; not ARM or
    macOS builds), and on (by default only on CPUs with AVX-512 VNNI or BF16 or AMX;
    elsewhere with TF_ENABLE_ONEDNN_OPTS=1; never with =0); `dtype` one oneDNN computes
    on this CPU (bfloat16 needs AVX-512: elsewhere TensorFlow's own kernels run it); and
    no GPU (which would run the convolutions instead)."""
    from tensorflow.python.util import _pywrap_util_port, _pywrap_utils  # how TensorFlow asks

    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false", "off"):
        return False
    return (bool(_pywrap_util_port.IsMklEnabled())
            and bool(_pywrap_utils.IsDataTypeSupportedByOneDNNOnThisCPU(
                tf.as_dtype(dtype).as_datatype_enum))
            and not tf.config.list_physical_devices("GPU"))


@dataclasses.dataclass(frozen=True)
class Forms:
    """Which faster forms a stack computes in; `Forms()` is every form that is faster on
    any device, in the ordinary layout."""

    act_after_pool: bool = True
    subpixel: bool = True
    crop_grad_as_pad: bool = True
    norm_act: bool = True
    few_filters_transposed: bool = False  # faster on oneDNN's kernels only
    deterministic_pool: bool = False  # only where XLA runs with op determinism
    image_groups: int = 1  # images per group; 1: the ordinary layout

    def describe(self) -> str:
        names = [name for name, on in (("activation after the pool", self.act_after_pool),
                                       ("sub-pixel upsample+conv", self.subpixel),
                                       ("crop gradient as a pad", self.crop_grad_as_pad),
                                       ("GroupNorm+SiLU by hand", self.norm_act),
                                       ("few-filter convs transposed",
                                        self.few_filters_transposed),
                                       ("max-pool by reshape (deterministic under XLA)",
                                        self.deterministic_pool)) if on]
        names.append(f"images-as-channels groups of {self.image_groups}"
                     if self.image_groups > 1 else "ordinary layout")
        return ", ".join(names)

    def __call__(self, layers, inputs):
        """`layers` (a stack's blocks, in order) applied to `inputs`, in these forms."""
        if not all(layer.built for layer in layers):  # the first call builds them
            return _plain(layers, inputs)
        groups = self._groups(layers, inputs)
        if groups > 1:
            return self._grouped(layers, inputs, groups)
        x, i = inputs, 0
        while i < len(layers):
            layer, after = layers[i], (layers[i + 1] if i + 1 < len(layers) else None)
            with tf.name_scope(layer.name):
                if self.norm_act and _norm_then_silu(layer, after):
                    x, i = norm_silu(layer, x), i + 2
                    continue
                if self.subpixel and _upsample_then_conv(layer, after):
                    x, i = upsample_then_conv(layer, after, x), i + 2
                    continue
                x = self._one(layer, x)
            i += 1
        return x

    def _one(self, layer, x, groups=1, ungroup=False):
        if isinstance(layer, resnet.ResidualBlock) and self.norm_act:
            return residual_block(layer, x)
        if isinstance(layer, blocks.ConvPool):
            return conv_pool(layer, x, groups, self.act_after_pool, self.deterministic_pool)
        if isinstance(layer, blocks.UpsampleConv):
            return upsample_conv(layer, x, groups, ungroup, self.subpixel, self.crop_grad_as_pad)
        if isinstance(layer, blocks.ConvTransposeUp):
            y = conv_transpose(layer.conv, x)
            return (crop_to(y, layer.target_size) if self.crop_grad_as_pad
                    else blocks.crop_to(y, layer.target_size))
        if self.few_filters_transposed and groups == 1 and _few_filter_conv(layer):
            return conv_by_transpose(layer, x)
        return layer(x)

    def _groups(self, layers, inputs) -> int:
        """self.image_groups where every block has a grouped form and few filters, the
        dtype was measured, and the batch divides into groups (an unknown one, as Keras
        fit's mirrored step and serving signatures trace, is padded); 1 otherwise."""
        batch, g = inputs.shape[0], self.image_groups
        ok = (g > 1 and None not in inputs.shape[1:] and (batch is None or batch % g == 0)
              and all(isinstance(layer, (blocks.ConvPool, blocks.UpsampleConv))
                      and layer.filters <= GROUPED_MAX_FILTERS for layer in layers)
              and layers[0].compute_dtype in GROUPED_DTYPES)
        return g if ok else 1

    def _grouped(self, layers, inputs, groups):
        """`layers` on the images-as-channels layout; the result in the ordinary layout
        (a last UpsampleConv's interleave ungroups it at no extra cost)."""
        n = tf.shape(inputs)[0]
        x = inputs
        if inputs.shape[0] is None:  # pad to whole groups; the padding's rows are dropped
            x = tf.pad(x, [[0, (-n) % groups]] + [[0, 0]] * (len(x.shape) - 1))
        x = to_image_groups(x, groups)
        ungroup_last = isinstance(layers[-1], blocks.UpsampleConv)
        for i, layer in enumerate(layers):
            with tf.name_scope(layer.name):
                x = self._one(layer, x, groups, ungroup=ungroup_last and i == len(layers) - 1)
        if not ungroup_last:
            x = from_image_groups(x, groups)
        return x if inputs.shape[0] is not None else x[:n]


def _norm_then_silu(layer, after) -> bool:
    """A GroupNormalization over the last axis, with scale and offset, then SiLU."""
    return (isinstance(layer, keras.layers.GroupNormalization) and layer.axis in (-1, 3)
            and layer.scale and layer.center and isinstance(after, keras.layers.Activation)
            and keras.activations.serialize(after.activation) in ("silu", "swish"))


def _upsample_then_conv(layer, after) -> bool:
    """Keras' 2x nearest UpSampling2D, then a 'same' Conv2D of stride 1 (the resnet
    decoder's pairs)."""
    return (isinstance(layer, keras.layers.UpSampling2D) and tuple(layer.size) == (2, 2)
            and layer.interpolation == "nearest" and layer.data_format == "channels_last"
            and type(after) is keras.layers.Conv2D and after.padding == "same"
            and tuple(after.strides) == (1, 1) and tuple(after.dilation_rate) == (1, 1)
            and after.groups == 1 and after.data_format == "channels_last")


def _few_filter_conv(layer) -> bool:
    """A 'same' Conv2D of stride 1 with an odd kernel (so 'same' pads alike on both
    sides), few filters and many input channels."""
    return (type(layer) is keras.layers.Conv2D and layer.built and layer.padding == "same"
            and tuple(layer.strides) == (1, 1) and tuple(layer.dilation_rate) == (1, 1)
            and layer.groups == 1 and layer.data_format == "channels_last"
            and all(k % 2 == 1 for k in layer.kernel_size)
            and layer.filters <= TRANSPOSED_MAX_FILTERS
            and layer.kernel.shape[2] >= TRANSPOSED_MIN_CHANNELS)


def _plain(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def choose(jit_compile: bool, precision: str, onednn: bool | None = None,
           deterministic: bool = False) -> tuple[Forms, str]:
    """The forms for a run, and why: every device-neutral form; the max-pool by reshape
    where XLA compiles the step under op determinism (`deterministic`), which refuses
    max-pool's own gradient; and the few-filter convs transposed and the
    images-as-channels layout where oneDNN runs the convolutions
    (`onednn_convolutions()` unless given), XLA does not compile them (its CPU
    convolutions are not oneDNN's: grouped ones run several times slower there) and the
    compute dtype is float32 or bfloat16 (`precision`: a Keras dtype policy name) and,
    unless `onednn` is given, one oneDNN computes on this CPU."""
    dtype = keras.DTypePolicy(precision).compute_dtype
    if jit_compile and deterministic:
        return (Forms(deterministic_pool=True),
                "--deterministic with XLA, which has no deterministic form of max-pool's gradient")
    if not (onednn_convolutions() if onednn is None else onednn):
        why = "oneDNN does not run the convolutions (a GPU, or oneDNN off or absent)"
    elif jit_compile:
        why = "XLA compiles the step, and its CPU convolutions are not oneDNN's"
    elif dtype not in GROUPED_DTYPES:
        why = f"{dtype} was not measured"
    elif onednn is None and not onednn_convolutions(dtype):
        why = (f"oneDNN has no {dtype} convolutions on this CPU, which lacks AVX-512, and "
               "TensorFlow's own have no grouped convolution gradient")
    else:
        return (Forms(few_filters_transposed=True, image_groups=IMAGE_GROUP),
                f"oneDNN runs the convolutions, without XLA, in {dtype}")
    return Forms(), why


def portable(forms: Forms | None) -> Forms | None:
    """`forms` for a graph that may run on any device (an exported SavedModel): without
    the few-filter convs transposed and the images-as-channels layout, which are faster
    only on oneDNN's CPU kernels, nor the max-pool by reshape, which only a deterministic
    XLA step needs."""
    return None if forms is None else dataclasses.replace(
        forms, few_filters_transposed=False, image_groups=1, deterministic_pool=False)


def install(model, forms: Forms | None) -> Forms | None:
    """Makes `model`'s encoder and decoder compute in `forms` (None: as their layers
    say), before anything traces them. Returns the forms that apply to its layers (the
    others turned off, so the log and config.json say what runs), or None for a model
    without such stacks: your own models are left as they are."""
    stacks = [stack for stack in (getattr(model, "encoder", None), getattr(model, "decoder", None))
              if hasattr(stack, "forms")]
    if not stacks:
        return None
    if forms is not None:
        every = [layer for stack in stacks for layer in stack._flatten_layers(include_self=False)]
        kinds = tuple({type(layer) for layer in every})

        def has(*types):
            return any(issubclass(k, types) for k in kinds)

        def groupable(stack):  # what `_groups` asks of a stack's layers, but the batch
            layers = [*getattr(stack, "blocks", []), *filter(None, [getattr(stack, "to_logits",
                                                                            None)])]
            return bool(layers) and all(
                isinstance(b, (blocks.ConvPool, blocks.UpsampleConv))
                and b.filters <= GROUPED_MAX_FILTERS for b in layers)

        grouped = any(groupable(stack) for stack in stacks)
        forms = dataclasses.replace(
            forms, act_after_pool=forms.act_after_pool and has(blocks.ConvPool),
            deterministic_pool=forms.deterministic_pool and any(
                isinstance(layer, blocks.ConvPool) and layer.pool for layer in every),
            subpixel=forms.subpixel and has(blocks.UpsampleConv, keras.layers.UpSampling2D),
            crop_grad_as_pad=forms.crop_grad_as_pad and has(blocks.UpsampleConv,
                                                            blocks.ConvTransposeUp),
            norm_act=forms.norm_act and has(keras.layers.GroupNormalization),
            few_filters_transposed=forms.few_filters_transposed and any(
                _few_filter_conv(layer) for layer in every),
            image_groups=forms.image_groups if grouped else 1)
    for stack in stacks:
        stack.forms = forms
    return forms


# ---------------------------------------------------------------- the forms, block by block


def conv_pool(block, x, groups=1, act_after_pool=True, deterministic_pool=False):
    """`block` (a ConvPool) on x, in the images-as-channels layout when groups > 1:
    (B/g, H, W, g*C_in) -> (B/g, h, w, g*filters)."""
    after = act_after_pool and block.pool and block.activation in MONOTONE
    if groups == 1 and not after and not (deterministic_pool and block.pool):
        return block(x)
    pool = max_pool if deterministic_pool else (lambda y: tf.nn.max_pool2d(y, 2, 2, "SAME"))
    dtype = block.compute_dtype
    kernel = _grouped_kernel(tf.cast(block.conv.kernel, dtype), groups)
    bias = tf.tile(tf.cast(block.conv.bias, dtype), [groups])
    act = keras.activations.get(block.activation)
    y = tf.nn.conv2d(tf.cast(x, dtype), kernel, 1, "SAME")
    if after:  # the bias commutes with the max as well (its gradient summed in float32:
        # oneDNN fuses only a bias right after the conv)
        return act(_bias_add(pool(y), bias))
    y = act(tf.nn.bias_add(y, bias))
    return pool(y) if block.pool else y


def max_pool(x):
    """tf.nn.max_pool2d(x, 2, 2, "SAME") as a reshape and a max over each window, with
    max-pool's gradient (all of it to the window's first maximum in row-major order, as
    TensorFlow's MaxPoolGrad kernels send it; XLA's select-and-scatter breaks some ties
    otherwise) from comparisons and reductions: no scatter, so XLA compiles it under op
    determinism."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    if None in (h, w, c):  # a graph traced for any image size: TensorFlow's pool
        return tf.nn.max_pool2d(x, 2, 2, "SAME")
    if h % 2 or w % 2:  # 'same' pads the bottom and right edges; the padding never wins
        x = tf.pad(x, [[0, 0], [0, h % 2], [0, w % 2], [0, 0]],
                   constant_values=float("-inf"))
        h, w = h + h % 2, w + w % 2
    # Each window's 4 positions in row-major order, in x's dtype (exact up to 4).
    order = tf.reshape(tf.constant([0, 1, 2, 3], x.dtype), (1, 1, 2, 1, 2, 1))

    @tf.custom_gradient
    def pool(x):
        windows = tf.reshape(x, (-1, h // 2, 2, w // 2, 2, c))
        y = tf.reduce_max(windows, (2, 4), keepdims=True)

        def grad(dy):
            first = tf.reduce_min(tf.where(windows == y, order, tf.constant(4, x.dtype)), (2, 4),
                                  keepdims=True)
            dx = tf.where(order == first, tf.reshape(dy, tf.shape(y)), tf.zeros((), dy.dtype))
            return tf.reshape(dx, tf.shape(x))

        return tf.squeeze(y, (2, 4)), grad

    return pool(x)


def upsample_conv(block, x, groups=1, ungroup=False, subpixel=True, crop_grad_as_pad=True):
    """`block` (an UpsampleConv) on x, in the images-as-channels layout when groups > 1:
    (B/g, h, w, g*C_in) -> (B/g, H, W, g*filters), or with `ungroup` (B, H, W, filters).

    Sub-pixel where no crop is needed: the kernel folded for the small map (4x the
    output channels, one per output phase), then the phases interleaved.
    """
    dtype = block.compute_dtype
    x = tf.cast(x, dtype)
    h, w = x.shape[1], x.shape[2]
    uncropped = block.target_size is None or tuple(block.target_size) == (2 * h, 2 * w)
    act = keras.activations.get(block.activation)
    bias = tf.cast(block.conv.bias, dtype)
    if subpixel and uncropped:
        taps, pad_before, pad_after = _subpixel_taps(block.kernel_size)
        folded = _folded_kernel(block.conv.kernel, taps, block.filters, dtype)
        o = folded.shape[0]
        if pad_before == pad_after == (o - 1) // 2:
            padding = "SAME"  # the oneDNN kernels take this form (k = 3, 4)
        else:
            pad = [pad_before, pad_after]
            x, padding = tf.pad(x, [[0, 0], pad, pad, [0, 0]]), "VALID"
        y = tf.nn.conv2d(x, _grouped_kernel(folded, groups), 1, padding)  # (B/g, h, w, g*4*f)
        # The bias of each of the 4 phases, added on the small map: its gradient is then
        # a reduction over 4x fewer, 4x wider rows.
        y = tf.nn.bias_add(y, tf.tile(bias, [4 * groups]))
        # An element-wise activation commutes with the interleaving; before it,
        # TensorFlow fuses it into the convolution.
        return _depth_to_space(act(y), block.filters, groups, ungroup)
    if groups == 1 and not crop_grad_as_pad:
        return block(x)
    x = tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)
    x = (crop_to if crop_grad_as_pad else blocks.crop_to)(x, block.target_size)
    kernel = _grouped_kernel(tf.cast(block.conv.kernel, dtype), groups)
    y = act(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), tf.tile(bias, [groups])))
    return from_image_groups(y, groups) if ungroup and groups > 1 else y


def upsample_then_conv(upsample, conv, x):
    """conv(upsample(x)) for a 2x nearest `upsample` and a 'same' `conv`
    (`_upsample_then_conv`): one convolution of the small map per output phase (a, b),
    each with the taps of `conv`'s kernel summed into the (few) small-map pixels its
    phase reads (2x2 for a 3x3 kernel), then the phases interleaved."""
    if None in x.shape[1:3]:  # a graph traced for any image size: as the layers say
        return conv(upsample(x))
    dtype = conv.compute_dtype
    x = tf.cast(x, dtype)
    (kh, kw), h, w, f = conv.kernel_size, x.shape[1], x.shape[2], conv.filters
    rows, cols = _phase_taps(kh), _phase_taps(kw)
    kernel = tf.cast(conv.kernel, tf.float32)
    act = keras.activations.get(conv.activation)
    phases = []
    for taps_h, pad_h in rows:
        for taps_w, pad_w in cols:
            k = tf.einsum("oh,pw,hwcf->opcf", taps_h, taps_w, kernel)
            if pad_h == _same_pad(taps_h.shape[0]) and pad_w == _same_pad(taps_w.shape[0]):
                y = tf.nn.conv2d(x, tf.cast(k, dtype), 1, "SAME")
            else:
                y = tf.nn.conv2d(tf.pad(x, [[0, 0], list(pad_h), list(pad_w), [0, 0]]),
                                 tf.cast(k, dtype), 1, "VALID")
            if conv.use_bias:
                y = tf.nn.bias_add(y, tf.cast(conv.bias, dtype))
            phases.append(act(y))  # element-wise: commutes with the interleaving
    y = tf.stack([tf.stack(phases[:2], 3), tf.stack(phases[2:], 3)], 2)  # (B, h, a, w, b, f)
    return tf.reshape(y, (-1, 2 * h, 2 * w, f))


def conv_by_transpose(conv, x):
    """conv(x) for a Conv2D with few filters (`_few_filter_conv`), as the transposed
    convolution of its kernel flipped and with its channel axes swapped: a 'same'
    correlation with the flipped kernel is the original convolution. Its gradient to x is
    then a forward convolution, and to the kernel the weight gradient of a convolution
    with few input channels: both run near oneDNN's peak, where a conv writing 3 channels
    runs ~5x below it."""
    dtype = conv.compute_dtype
    x = tf.cast(x, dtype)
    kernel = tf.transpose(tf.reverse(tf.cast(conv.kernel, dtype), [0, 1]), (0, 1, 3, 2))
    shape = (tf.concat([tf.shape(x)[:3], [conv.filters]], 0) if None in x.shape
             else [*x.shape[:3], conv.filters])
    y = tf.nn.conv2d_transpose(x, kernel, shape, 1, "SAME")
    y.set_shape([*x.shape[:3], conv.filters])
    if conv.use_bias:
        y = _bias_add(y, tf.cast(conv.bias, dtype))
    return keras.activations.get(conv.activation)(y)


def conv_transpose(conv, x):
    """conv(x) for a Keras Conv2DTranspose (channels last), its bias added by `_bias_add`:
    Keras adds it with a BiasAdd, whose gradient TensorFlow's CPU kernel sums in bfloat16
    (90-98% off for the VAE's and denoiser's up blocks in mixed_bfloat16). No faster, no
    slower: the same ops in float32."""
    dtype = conv.compute_dtype
    y = keras.ops.conv_transpose(
        tf.cast(x, dtype), tf.cast(conv.kernel, dtype), strides=conv.strides,
        padding=conv.padding, output_padding=conv.output_padding,
        data_format=conv.data_format, dilation_rate=conv.dilation_rate)
    if conv.use_bias:
        y = _bias_add(y, tf.cast(conv.bias, dtype))
    return keras.activations.get(conv.activation)(y)


def _bias_add(y, bias):
    """tf.nn.bias_add, whose bias gradient sums in float32 when y is narrower: for a bias
    not right after a conv (the activation after the pool, a transposed conv). In a traced
    graph TensorFlow's BiasAddGrad sums bfloat16 in bfloat16, 4-17% off over 6-65k values
    per channel of either sign, up to 40% for one channel, and a sum with a mean stalls
    (512 for 65,536 ones; benchmarks/NOTES.md section 18). A bias right after a conv is
    fused by oneDNN, which sums its gradient in float32 with the kernel's."""
    if y.dtype == tf.float32:
        return tf.nn.bias_add(y, bias)

    @tf.custom_gradient
    def add(y, bias):
        def grad(g):
            return g, tf.cast(tf.reduce_sum(tf.cast(g, tf.float32), (0, 1, 2)), bias.dtype)
        return tf.nn.bias_add(y, bias), grad

    return add(y, bias)


def residual_block(block, x):
    """`block` (a resnet.ResidualBlock) on x, its GroupNorm+SiLU pairs by hand."""
    h = block.conv1(norm_silu(block.norm1, x))
    h = block.conv2(norm_silu(block.norm2, h))
    return h + (block.skip(x) if block.skip is not None else x)


def norm_silu(norm, x):
    """silu(norm(x)) for a GroupNormalization `norm`, with a hand-written gradient.

    Forward as Keras computes it (float32 statistics, two passes: mean, then the mean
    squared difference), folded into one scale and one offset per (image, channel).
    Backward, with g = dL/dz, s = sigmoid(y), y = x * a + b:
      dy = g * (s + y * s * (1 - s))
      dbeta = sum dy, dgamma = sum dy * xhat   (per channel, from per-(image, channel)
      sums of dy and dy * x)
      dx = a * dy + c1 * x + c2               (c1, c2 per (image, group))
    """
    if None in x.shape[1:]:  # a graph traced for any image size: as the layers say
        return tf.nn.silu(norm(x))
    groups, eps = int(norm.groups), float(norm.epsilon)
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    k = c // groups
    count = float(h * w * k)

    def per_group(sums):  # (B, C) sums over H and W -> (B, G, 1) means over each group
        return tf.reduce_sum(tf.reshape(sums, (-1, groups, k)), -1, keepdims=True) / count

    def per_channel(t):  # (B, G, 1) or (B, G, K) -> (B, 1, 1, C)
        return tf.reshape(t * tf.ones((1, 1, k)), (-1, 1, 1, c))

    @tf.custom_gradient
    def fn(x, gamma, beta):
        # Sums over H and W first (contiguous rows), then over each group's channels.
        mean = per_group(tf.reduce_sum(x, (1, 2)))  # (B, G, 1)
        var = per_group(tf.reduce_sum(tf.math.squared_difference(x, per_channel(mean)), (1, 2)))
        rstd = tf.math.rsqrt(var + eps)
        scale = rstd * tf.reshape(gamma, (1, groups, k))  # (B, G, K)
        offset = tf.reshape(beta, (1, groups, k)) - mean * scale
        y = x * per_channel(scale) + per_channel(offset)
        s = tf.sigmoid(y)
        z = y * s

        def grad(g):
            g = tf.cast(g, tf.float32)
            dy = g * (s + z * (1.0 - s))
            s1 = tf.reshape(tf.reduce_sum(dy, (1, 2)), (-1, groups, k))  # sum dy
            s2 = tf.reshape(tf.reduce_sum(dy * x, (1, 2)), (-1, groups, k))  # sum dy * x
            m, r = mean, rstd
            sx = (s2 - m * s1) * r  # sum dy * xhat
            gk = tf.reshape(gamma, (1, groups, k))
            m1 = tf.reduce_sum(gk * s1, -1, keepdims=True) / count  # mean of dxhat
            m2 = tf.reduce_sum(gk * sx, -1, keepdims=True) / count  # mean of dxhat * xhat
            c1 = -r * r * m2
            c2 = -r * m1 - m * c1
            dx = dy * per_channel(r * gk) + (x * per_channel(c1) + per_channel(c2))
            return dx, tf.reshape(tf.reduce_sum(sx, 0), (c,)), tf.reshape(
                tf.reduce_sum(s1, 0), (c,))

        return z, grad

    z = fn(tf.cast(x, tf.float32), tf.cast(norm.gamma, tf.float32),
           tf.cast(norm.beta, tf.float32))
    return tf.cast(z, norm.compute_dtype)


def crop_to(x, target_size):
    """`blocks.crop_to` (a centred crop), whose gradient is a zero padding."""
    if target_size is None or tuple(x.shape[1:3]) == tuple(target_size):
        return x
    top, bottom, left, right = blocks.crop_margins(x.shape[1:3], target_size)

    @tf.custom_gradient
    def crop(x):
        def grad(upstream):
            return tf.pad(upstream, [[0, 0], [top, bottom], [left, right], [0, 0]])

        return blocks.crop_to(x, target_size), grad

    return crop(x)


# ---------------------------------------------------------------- the images-as-channels layout


def to_image_groups(x, groups: int):
    """(B, H, W, C) -> (B/groups, H, W, groups*C): each run of `groups` consecutive
    images becomes the channels of one, channel index image*C + c.

    In this layout a convolution whose kernel is tiled `groups` times along its output
    axis is a grouped convolution computing every image with the same weights, and
    pooling, bias, activations, upsampling and crops act per channel, so per image.
    """
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    x = tf.transpose(tf.reshape(x, (-1, groups, h, w, c)), (0, 2, 3, 1, 4))
    return tf.reshape(x, (-1, h, w, groups * c))


def from_image_groups(x, groups: int):
    """The inverse of `to_image_groups`: (B/groups, H, W, groups*C) -> (B, H, W, C)."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3] // groups
    x = tf.transpose(tf.reshape(x, (-1, h, w, groups, c)), (0, 3, 1, 2, 4))
    return tf.reshape(x, (-1, h, w, c))


def _grouped_kernel(kernel, groups: int):
    """(k, k, C_in, C_out) -> (k, k, C_in, groups*C_out): with an input of groups*C_in
    channels, tf.nn.conv2d computes a grouped convolution, each image with `kernel`."""
    return kernel if groups == 1 else tf.tile(kernel, [1, 1, 1, groups])


# ---------------------------------------------------------------- the sub-pixel upsample+conv


@functools.cache
def _subpixel_taps(kernel_size: int) -> tuple[np.ndarray, int, int]:
    """How a 'same' convolution of an image upsampled 2x (nearest) reads the small image.

    Output pixel 2i+a of the upsampled conv reads upsampled pixel 2i+a+d-p for tap d
    (p = TensorFlow's 'same' padding before), which is small pixel
    i + floor((a+d-p)/2). Returns M (2 phases, n offsets, kernel_size taps) with
    M[a, o, d] = 1 where tap d of phase a reads offset lo + o, and the small image's
    padding (before, after) = (-lo, hi).
    """
    pad_before = (kernel_size - 1) // 2
    offsets = [[(a + d - pad_before) // 2 for d in range(kernel_size)] for a in (0, 1)]
    lo, hi = min(map(min, offsets)), max(map(max, offsets))
    taps = np.zeros((2, hi - lo + 1, kernel_size), np.float32)
    for a in (0, 1):
        for d, o in enumerate(offsets[a]):
            taps[a, o - lo, d] = 1.0
    return taps, -lo, hi


@functools.cache
def _phase_taps(kernel_size: int) -> tuple[tuple[np.ndarray, tuple[int, int]], ...]:
    """Per output phase a (0, 1) of a 2x upsample then a 'same' conv along one axis:
    (the (offsets, taps) matrix of the small-map pixels the phase reads, the small map's
    padding (before, after)); `_subpixel_taps` restricted to each phase's own offsets."""
    taps, pad_before, _ = _subpixel_taps(kernel_size)
    phases = []
    for a in (0, 1):
        used = np.flatnonzero(taps[a].any(axis=1))  # offsets lo + used[0] ... lo + used[-1]
        lo, hi = int(used[0]) - pad_before, int(used[-1]) - pad_before
        phases.append((taps[a, used[0]:used[-1] + 1], (-lo, hi)))  # lo <= 0 <= hi
    return tuple(phases)


def _same_pad(n: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding of a kernel of n taps at stride 1."""
    return ((n - 1) // 2, n - 1 - (n - 1) // 2)


def _folded_kernel(kernel, taps, filters: int, dtype):
    """The kernel for the small map: (o, o, C_in, 4*filters), one output channel per
    (output phase, filter)."""
    taps = tf.constant(taps)  # (phase, offset, tap)
    folded = tf.einsum("aoh,bpw,hwcf->opcabf", taps, taps, tf.cast(kernel, tf.float32))
    o = folded.shape[0]
    return tf.cast(tf.reshape(folded, (o, o, -1, 4 * filters)), dtype)


def _depth_to_space(x, channels, groups=1, ungroup=False):
    """tf.nn.depth_to_space(x, 2) as reshape -> transpose -> reshape: the same values in
    the same order; TensorFlow's DepthToSpace kernel (and its gradient, SpaceToDepth)
    is slower on CPU for these few channels (benchmarks/NOTES.md).

    With groups > 1, x is in the images-as-channels layout, (B/g, h, w, g*4*channels)
    with channels (image, phase_h, phase_w, c); the result is in that layout too, or
    with `ungroup`, in the ordinary one: the same one transpose either way.
    """
    h, w = x.shape[1], x.shape[2]
    if groups == 1:
        x = tf.reshape(x, (-1, h, w, 2, 2, channels))  # (B, h, w, phase_h, phase_w, C)
        x = tf.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, h, phase_h, w, phase_w, C)
        return tf.reshape(x, (-1, 2 * h, 2 * w, channels))
    x = tf.reshape(x, (-1, h, w, groups, 2, 2, channels))
    if ungroup:
        x = tf.transpose(x, (0, 3, 1, 4, 2, 5, 6))  # (B/g, g, h, phase_h, w, phase_w, C)
        return tf.reshape(x, (-1, 2 * h, 2 * w, channels))
    x = tf.transpose(x, (0, 1, 4, 2, 5, 3, 6))  # (B/g, h, phase_h, w, phase_w, g, C)
    return tf.reshape(x, (-1, 2 * h, 2 * w, groups * channels))
