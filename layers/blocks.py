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


# Images per group in ConvPool's "images as channels" form. A batch known not to divide
# by it is computed plain; an unknown one is padded.
_IMAGE_GROUP = 8


def _has_gpu() -> bool:
    """The forms were measured on oneDNN's CPU kernels only."""
    return bool(tf.config.list_physical_devices("GPU"))


def _xla_compiling() -> bool:
    """True while a function is traced for XLA (tf.function(jit_compile=True), Keras'
    jit_compile). XLA's CPU convolutions are not oneDNN's: the few-channel forms
    run several times slower there than the plain one."""
    from tensorflow.python.ops import control_flow_util  # how TensorFlow itself asks

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def _space_to_depth_taps(kernel_size: int) -> tuple[np.ndarray, int] | None:
    """How a stride-1 'same' convolution reads a space-to-depth (2x2 blocks) input.

    Output pixel 2i+a reads input pixel 2i+a+d-p for tap d (p = TensorFlow's
    'same' padding before): block i + (a+d-p)//2, phase (a+d-p)%2. Returns
    T (n offsets, 2 input phases, 2 output phases, kernel_size taps) with
    T[o, q, a, d] = 1 where tap d of output phase a reads offset o - lo, phase q,
    and n; or None when the block grid's padding is not what 'same' does for n.
    """
    pad_before = (kernel_size - 1) // 2
    reads = [[divmod(a + d - pad_before, 2) for d in range(kernel_size)] for a in (0, 1)]
    offsets = [o for row in reads for o, _ in row]
    lo, hi = min(offsets), max(offsets)
    n = hi - lo + 1
    if (-lo, hi) != ((n - 1) // 2, n - 1 - (n - 1) // 2):
        return None
    taps = np.zeros((n, 2, 2, kernel_size), np.float32)
    for a in (0, 1):
        for d, (o, q) in enumerate(reads[a]):
            taps[o - lo, q, a, d] = 1.0
    return taps, n


def _space_to_depth(x):
    """(B, H, W, C) -> (B, H/2, W/2, 4C), channels (phase_h, phase_w, C): the inverse of
    `_depth_to_space`, as reshape -> transpose -> reshape."""
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    x = tf.reshape(x, (-1, h // 2, 2, w // 2, 2, c))
    return tf.reshape(tf.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, h // 2, w // 2, 4 * c))


@keras.utils.register_keras_serializable("tapeloop")
class ConvPool(_Block):
    """Conv2D ('same') then 2x2 max-pooling ('same'): halves H and W, rounding up.
    With pool=False, a plain 'same' convolution.

    The weights are always the Conv2D's kernel and bias, but on a CPU in float32
    the block may compute the same function in a form that suits oneDNN's
    kernels better when the channels are few (benchmarks/NOTES.md section 9):

    - "images_as_channels" (1 input channel, <= 8 filters): groups of 8 images
      become the channels of one depthwise convolution, so the kernel's output
      runs 8x wider;
    - "space_to_depth" (kernel >= 4, <= 4 filters, <= 16 input channels): the
      convolution on the 2x2-block (space-to-depth) map, with the kernel folded
      to 4x the input and output channels, and its output put back in place;
    - "plain": Conv2D, then MaxPooling2D (GPUs, other precisions, odd sizes,
      and whenever XLA compiles the block).

    `form` says which one `build` chose.
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
        self.form = "plain"

    def build(self, input_shape):
        self.conv.build(input_shape)  # the weights, whichever form computes with them
        self.form = self._choose_form(input_shape)

    def _choose_form(self, input_shape) -> str:
        """Picks the form; for space_to_depth also keeps its taps (`_taps`, `_block_kernel`)."""
        h, w, cin = input_shape[1], input_shape[2], int(input_shape[3])
        if (not self.act_after_pool or self.compute_dtype != "float32" or h is None or w is None
                or h % 2 or w % 2 or _has_gpu()):
            return "plain"
        # Where each form measured faster on one core (benchmarks/NOTES.md section 9).
        if cin == 1 and self.filters <= 8:
            return "images_as_channels"
        taps = _space_to_depth_taps(self.kernel_size)
        if self.kernel_size >= 4 and self.filters <= 4 and cin <= 16 and taps is not None:
            self._taps, self._block_kernel = taps
            return "space_to_depth"
        return "plain"

    def call(self, inputs, training=None):
        if self.form != "plain" and _xla_compiling():
            x = self._conv_pool(inputs, plain=True)
        elif self.form == "images_as_channels":
            batch = inputs.shape[0]
            if batch is None:
                # Unknown when traced (Keras fit, serving signatures): pad the batch to a
                # multiple of the group and drop the padding's rows. A tf.cond between the
                # two forms measured slower than either (benchmarks/NOTES.md section 9).
                n = tf.shape(inputs)[0]
                padded = tf.pad(inputs, [[0, (-n) % _IMAGE_GROUP], [0, 0], [0, 0], [0, 0]])
                x = self._images_as_channels(padded)[:n]
            elif batch % _IMAGE_GROUP == 0:
                x = self._images_as_channels(inputs)
            else:
                x = self._conv_pool(inputs, plain=True)
        else:
            x = self._conv_pool(inputs)
        return self.act(x) if self.act_after_pool else x

    def _conv_pool(self, inputs, plain=False):
        if self.form == "space_to_depth" and not plain:
            x = self._space_to_depth_conv(inputs)
        else:
            x = self.conv(inputs)
        return x if self.pooling is None else self.pooling(x)

    def _space_to_depth_conv(self, inputs):
        """Conv2D (no activation: act_after_pool) on the 2x2-block map: n x n kernel,
        4C_in -> 4*filters channels, one per (output phase, filter); then back in place."""
        n, cin = self._block_kernel, inputs.shape[-1]
        taps = tf.constant(self._taps)
        kernel = tf.einsum("oqad,prbe,decf->opqrcabf", taps, taps,
                           tf.cast(self.conv.kernel, tf.float32))
        kernel = tf.reshape(kernel, (n, n, 4 * cin, 4 * self.filters))
        y = tf.nn.conv2d(_space_to_depth(inputs), kernel, 1, "SAME")
        y = _depth_to_space(y, self.filters)
        return tf.nn.bias_add(y, self.conv.bias)

    def _images_as_channels(self, inputs):
        """Conv2D + bias + 2x2 max-pool of 1-channel images, computed on groups of
        `_IMAGE_GROUP` images stacked as the channels of one depthwise convolution."""
        g, f = _IMAGE_GROUP, self.filters
        h, w = inputs.shape[1], inputs.shape[2]
        x = tf.transpose(tf.reshape(inputs, (-1, g, h, w)), (0, 2, 3, 1))  # (B/g, H, W, g)
        kernel = tf.tile(self.conv.kernel, [1, 1, g, 1])  # (k, k, g, f): the same per image
        y = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")  # (B/g, H, W, g*f)
        y = tf.nn.max_pool2d(y, 2, 2, "VALID")  # even H, W: 'same' pads nothing
        y = tf.nn.bias_add(y, tf.tile(self.conv.bias, [g]))  # commutes with the max
        y = tf.reshape(y, (-1, h // 2, w // 2, g, f))
        return tf.reshape(tf.transpose(y, (0, 3, 1, 2, 4)), (-1, h // 2, w // 2, f))

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


def _depth_to_space(x, channels):
    """tf.nn.depth_to_space(x, 2) as reshape -> transpose -> reshape: the same values in
    the same order; TensorFlow's DepthToSpace kernel (and its gradient, SpaceToDepth)
    is slower on CPU for these few channels (benchmarks/NOTES.md)."""
    h, w = x.shape[1], x.shape[2]
    x = tf.reshape(x, (-1, h, w, 2, 2, channels))  # (B, h, w, phase_h, phase_w, C)
    x = tf.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, h, phase_h, w, phase_w, C)
    return tf.reshape(x, (-1, 2 * h, 2 * w, channels))


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

    def call(self, inputs, training=None):
        kernel = tf.cast(self.kernel, self.compute_dtype)
        if self.fused:
            x = tf.cast(inputs, self.compute_dtype)
            # (offset_h, offset_w, cin, phase_h, phase_w, cout) -> phases as channels.
            taps = tf.constant(self._taps)
            folded = tf.einsum("aoh,bpw,hwcf->opcabf", taps, taps,
                               tf.cast(kernel, tf.float32))
            o = folded.shape[0]
            folded = tf.cast(tf.reshape(folded, (o, o, -1, 4 * self.filters)), self.compute_dtype)
            if self._pad_before == self._pad_after == (o - 1) // 2:
                padding = "SAME"  # the oneDNN kernels take this form (k = 3, 4)
            else:
                pad = [self._pad_before, self._pad_after]
                x, padding = tf.pad(x, [[0, 0], pad, pad, [0, 0]]), "VALID"
            y = tf.nn.conv2d(x, folded, 1, padding)  # (B, h, w, 4*filters)
            # The bias of each of the 4 phases, added on the small map: its gradient
            # is then a reduction over 4x fewer, 4x wider rows.
            y = tf.nn.bias_add(y, tf.tile(tf.cast(self.bias, self.compute_dtype), [4]))
            # An element-wise activation commutes with the interleaving; before it,
            # TensorFlow fuses it into the convolution.
            y = self.act(y) if self.act is not None else y
            return _depth_to_space(y, self.filters)  # (B, 2h, 2w, filters)
        else:
            x = tf.repeat(tf.repeat(tf.cast(inputs, self.compute_dtype), 2, axis=1), 2, axis=2)
            x = _crop_to(x, self.target_size)
            y = tf.nn.conv2d(x, kernel, 1, "SAME")
        y = tf.nn.bias_add(y, tf.cast(self.bias, self.compute_dtype))
        return self.act(y) if self.act is not None else y

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
