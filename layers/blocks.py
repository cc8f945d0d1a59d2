"""Reusable convolutional blocks with one Keras contract.

Every block stores its constructor arguments, declares its sublayers in
`__init__` (they hold no weights until Keras builds them on the first call,
when the input shape is known), implements `call(inputs, training=None)`, and
returns its constructor arguments from `get_config`, so
`Block.from_config(block.get_config())` rebuilds it.

Down blocks halve H and W (rounding up); up blocks double them and, given a
`target_size`, crop the surplus so the decoder retraces the encoder's sizes
(28 -> 14 -> 7 -> 4 and back 4 -> 7 -> 14 -> 28): crops then happen on the
smallest maps, where they cost nothing, instead of on the full-size output.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

keras = tf.keras


def _crop_to(x, target_size):
    """Crops (B, H, W, C) to target (h, w), centred (an odd surplus loses its last row/column)."""
    if target_size is None:
        return x
    h, w = x.shape[1], x.shape[2]
    th, tw = target_size
    if (h, w) == (th, tw):
        return x
    top, left = (h - th) // 2, (w - tw) // 2
    return _crop(x, top, h - th - top, left, w - tw - left)


def _crop(x, top, bottom, left, right):
    """x[:, top:-bottom, left:-right, :], whose gradient is a zero padding: TensorFlow's
    StridedSliceGrad took 0.5 ms per step for the seed model's 8x8 -> 7x7 crop, a pad
    a tenth of that."""

    @tf.custom_gradient
    def crop(x):
        def grad(upstream):
            return tf.pad(upstream, [[0, 0], [top, bottom], [left, right], [0, 0]])

        return x[:, top:x.shape[1] - bottom, left:x.shape[2] - right, :], grad

    return crop(x)


# Activations that never decrease: they commute with max-pooling.
_MONOTONE = ("relu", "relu6", "elu", "selu", "leaky_relu", "sigmoid", "tanh", "softplus",
             "linear", None)


class _Block(keras.layers.Layer):
    """Shared storage of the common conv arguments."""

    def __init__(self, filters: int, kernel_size: int = 3, activation: str | None = "relu",
                 **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.activation = activation

    def _conv(self, **kwargs):
        kwargs.setdefault("activation", self.activation)
        return keras.layers.Conv2D(self.filters, self.kernel_size, padding="same",
                                   dtype=self.dtype_policy, **kwargs)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size,
                      activation=self.activation)
        return config


# Images per group in the images-as-channels layout (`to_image_groups`).
IMAGE_GROUP = 4


def onednn_convolutions() -> bool:
    """Whether oneDNN runs this process's convolutions, the only kernels the grouped
    layout was measured faster on: TensorFlow built with it (the x86 Linux wheels; not
    ARM or macOS builds), not turned off with TF_ENABLE_ONEDNN_OPTS=0, and no GPU
    (which would run the convolutions instead)."""
    import os

    from tensorflow.python.util import _pywrap_util_port  # how TensorFlow itself asks

    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("0", "false", "off"):
        return False
    return bool(_pywrap_util_port.IsMklEnabled()) and not tf.config.list_physical_devices("GPU")


def _xla_compiling() -> bool:
    """True while a function is traced for XLA (tf.function(jit_compile=True), Keras'
    jit_compile). XLA's CPU convolutions are not oneDNN's: grouped convolutions
    run several times slower there than plain ones."""
    from tensorflow.python.ops import control_flow_util  # how TensorFlow itself asks

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def to_image_groups(x, groups: int):
    """(B, H, W, C) -> (B/groups, H, W, groups*C): each run of `groups` consecutive
    images becomes the channels of one, channel index image*C + c.

    In this layout a convolution whose kernel is tiled `groups` times along its
    output axis is a grouped convolution computing every image with the same
    weights, and pooling, bias, activations, upsampling and crops act per
    channel, so per image, as before. A few-channel layer's kernels then write
    groups x more output channels per call: what oneDNN's CPU kernels, which
    compute 16 float32 channels per AVX-512 instruction, need
    (benchmarks/NOTES.md section 10).
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


@keras.utils.register_keras_serializable("tapeloop")
class ConvPool(_Block):
    """Conv2D ('same') then 2x2 max-pooling ('same'): halves H and W, rounding up.
    With pool=False, a plain 'same' convolution.

    `call_grouped` computes the same function on the images-as-channels layout
    (`to_image_groups`), with the same weights.
    """

    def __init__(self, filters, kernel_size=3, activation="relu", pool=True, **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.pool = bool(pool)
        # max-pool(f(x)) == f(max-pool(x)) for a non-decreasing f: applied after the
        # pool, the activation and its gradient touch 4x fewer values.
        self.act_after_pool = self.pool and activation in _MONOTONE
        self.conv = self._conv(name="conv", **({"activation": None} if self.act_after_pool else {}))
        self.pooling = (keras.layers.MaxPooling2D(2, padding="same", dtype=self.dtype_policy,
                                                  name="pool") if self.pool else None)
        self.act = keras.activations.get(activation)

    def call(self, inputs, training=None):
        x = self.conv(inputs)
        if self.pooling is None:
            return x
        x = self.pooling(x)
        return self.act(x) if self.act_after_pool else x

    def call_grouped(self, x, groups: int):
        """`call` on the images-as-channels layout: (B/g, H, W, g*C_in) -> (B/g, h, w, g*filters)."""
        dtype = self.compute_dtype
        kernel = _grouped_kernel(tf.cast(self.conv.kernel, dtype), groups)
        bias = tf.tile(tf.cast(self.conv.bias, dtype), [groups])
        y = tf.nn.conv2d(tf.cast(x, dtype), kernel, 1, "SAME")
        if self.act_after_pool:  # the bias commutes with the max as well
            return self.act(tf.nn.bias_add(tf.nn.max_pool2d(y, 2, 2, "SAME"), bias))
        y = self.act(tf.nn.bias_add(y, bias))  # the conv's own activation (linear for None)
        return tf.nn.max_pool2d(y, 2, 2, "SAME") if self.pool else y

    def get_config(self) -> dict:
        return {**super().get_config(), "pool": self.pool}


@keras.utils.register_keras_serializable("tapeloop")
class ConvStride(_Block):
    """Conv2D with stride 2 ('same'): halves H and W with learned downsampling."""

    def __init__(self, filters, kernel_size=3, activation="relu", **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.conv = self._conv(strides=2, name="conv")

    def call(self, inputs, training=None):
        return self.conv(inputs)


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


def _subpixel_taps(kernel_size: int) -> tuple[np.ndarray, int, int]:
    """How a 'same' convolution of an image upsampled 2x (nearest) reads the small image.

    Output pixel 2i+a of the upsampled conv reads upsampled pixel 2i+a+d-p for
    tap d (p = TensorFlow's 'same' padding before), which is small pixel
    i + floor((a+d-p)/2). Returns M (2 phases, n offsets, kernel_size taps) with
    M[a, o, d] = 1 where tap d of phase a reads offset lo + o, and the small
    image's padding (before, after) = (-lo, hi).
    """
    pad_before = (kernel_size - 1) // 2
    offsets = [[(a + d - pad_before) // 2 for d in range(kernel_size)] for a in (0, 1)]
    lo, hi = min(map(min, offsets)), max(map(max, offsets))
    taps = np.zeros((2, hi - lo + 1, kernel_size), np.float32)
    for a in (0, 1):
        for d, o in enumerate(offsets[a]):
            taps[a, o - lo, d] = 1.0
    return taps, -lo, hi


@keras.utils.register_keras_serializable("tapeloop")
class UpsampleConv(_Block):
    """2x nearest-neighbour upsampling, a centred crop to `target_size`, then Conv2D ('same').

    Exactly the layers UpSampling2D -> Cropping2D -> Conv2D, with the same kernel
    and bias. When no crop is needed it is computed without materialising the
    upsampled map ("sub-pixel" form): the kernel is folded into one for the
    small map with 4x the output channels, one per output phase, and
    depth_to_space interleaves them. Same function and gradients, about a third
    of the time on CPU for the decoder's last layer.
    """

    def __init__(self, filters, kernel_size=3, activation="relu", target_size=None, **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.target_size = tuple(int(s) for s in target_size) if target_size else None
        self.act = keras.activations.get(activation)

    def build(self, input_shape):
        cin = int(input_shape[-1])
        self.kernel = self.add_weight(
            name="kernel", shape=(self.kernel_size, self.kernel_size, cin, self.filters),
            initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        taps, self._pad_before, self._pad_after = _subpixel_taps(self.kernel_size)
        self._taps = taps  # numpy: becomes a constant of whichever graph calls us
        h, w = int(input_shape[1]), int(input_shape[2])
        self.fused = self.target_size is None or tuple(self.target_size) == (2 * h, 2 * w)

    def _folded_kernel(self):
        """The kernel for the small map: (o, o, C_in, 4*filters), one output channel per
        (output phase, filter), in the compute dtype."""
        taps = tf.constant(self._taps)  # (offset_h, offset_w, cin, phase_h, phase_w, cout)
        folded = tf.einsum("aoh,bpw,hwcf->opcabf", taps, taps, tf.cast(self.kernel, tf.float32))
        o = folded.shape[0]
        return tf.cast(tf.reshape(folded, (o, o, -1, 4 * self.filters)), self.compute_dtype)

    def call(self, inputs, training=None):
        return self._compute(tf.cast(inputs, self.compute_dtype), groups=1, ungroup=False)

    def call_grouped(self, x, groups: int, ungroup: bool = False):
        """`call` on the images-as-channels layout (`to_image_groups`): (B/g, h, w,
        g*C_in) -> (B/g, H, W, g*filters), or with `ungroup` (B, H, W, filters)."""
        return self._compute(tf.cast(x, self.compute_dtype), groups, ungroup)

    def _compute(self, x, groups, ungroup):
        dtype = self.compute_dtype
        if self.fused:
            folded = self._folded_kernel()
            o = folded.shape[0]
            if self._pad_before == self._pad_after == (o - 1) // 2:
                padding = "SAME"  # the oneDNN kernels take this form (k = 3, 4)
            else:
                pad = [self._pad_before, self._pad_after]
                x, padding = tf.pad(x, [[0, 0], pad, pad, [0, 0]]), "VALID"
            y = tf.nn.conv2d(x, _grouped_kernel(folded, groups), 1, padding)  # (B/g, h, w, g*4*filters)
            # The bias of each of the 4 phases, added on the small map: its gradient
            # is then a reduction over 4x fewer, 4x wider rows.
            y = tf.nn.bias_add(y, tf.tile(tf.cast(self.bias, dtype), [4 * groups]))
            # An element-wise activation commutes with the interleaving; before it,
            # TensorFlow fuses it into the convolution.
            y = self.act(y) if self.act is not None else y
            return _depth_to_space(y, self.filters, groups, ungroup)  # (B/g, 2h, 2w, g*filters)
        x = tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)
        x = _crop_to(x, self.target_size)
        y = tf.nn.conv2d(x, _grouped_kernel(tf.cast(self.kernel, dtype), groups), 1, "SAME")
        y = tf.nn.bias_add(y, tf.tile(tf.cast(self.bias, dtype), [groups]))
        y = self.act(y) if self.act is not None else y
        return from_image_groups(y, groups) if ungroup and groups > 1 else y

    def compute_output_shape(self, input_shape):
        size = self.target_size or (2 * input_shape[1], 2 * input_shape[2])
        return (input_shape[0], *size, self.filters)

    def get_config(self) -> dict:
        return {**super().get_config(), "target_size": self.target_size}


@keras.utils.register_keras_serializable("tapeloop")
class ConvTransposeUp(_Block):
    """Conv2DTranspose with stride 2 ('same'): doubles H and W with learned upsampling,
    then a centred crop to `target_size` if given."""

    def __init__(self, filters, kernel_size=3, activation="relu", target_size=None, **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.target_size = tuple(int(s) for s in target_size) if target_size else None
        self.conv = keras.layers.Conv2DTranspose(
            self.filters, self.kernel_size, strides=2, padding="same", activation=activation,
            dtype=self.dtype_policy, name="conv_transpose")

    def call(self, inputs, training=None):
        return _crop_to(self.conv(inputs), self.target_size)

    def get_config(self) -> dict:
        return {**super().get_config(), "target_size": self.target_size}


DOWN_BLOCKS = {"pool": ConvPool, "stride": ConvStride}
UP_BLOCKS = {"upsample": UpsampleConv, "transpose": ConvTransposeUp}
