"""The blocks the registered models are made of, each written as the Keras layers it names.

Every block stores its constructor arguments, declares its sublayers in
`__init__` (they hold no weights until Keras builds them on the first call,
when the input shape is known), implements `call(inputs, training=None)`, and
returns its constructor arguments from `get_config`, so
`Block.from_config(block.get_config())` rebuilds it.

Down blocks halve H and W (rounding up); up blocks double them and, given a
`target_size`, crop the surplus so the decoder retraces the encoder's sizes
(28 -> 14 -> 7 -> 4 and back 4 -> 7 -> 14 -> 28): crops then happen on the
smallest maps, where they cost nothing, instead of on the full-size output.

This file says what the models compute. How fast it is computed is
`layers/fast_forms.py`'s business: the same functions in faster forms, chosen
once by the runner.
"""

from __future__ import annotations

import tensorflow as tf

keras = tf.keras


def crop_margins(size, target_size) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows and columns a centred crop of a (h, w) map to
    `target_size` removes (an odd surplus loses its last row/column)."""
    (h, w), (th, tw) = size, target_size
    top, left = (h - th) // 2, (w - tw) // 2
    return top, h - th - top, left, w - tw - left


def crop_to(x, target_size):
    """Crops (B, H, W, C) to target (h, w), centred."""
    if target_size is None:
        return x
    top, _, left, _ = crop_margins(x.shape[1:3], target_size)
    return x[:, top:top + target_size[0], left:left + target_size[1], :]


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


@keras.utils.register_keras_serializable("tapeloop")
class ConvPool(_Block):
    """Conv2D ('same') then 2x2 max-pooling ('same'): halves H and W, rounding up.
    With pool=False, a plain 'same' convolution."""

    def __init__(self, filters, kernel_size=3, activation="relu", pool=True, **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.pool = bool(pool)
        self.conv = self._conv(name="conv")
        self.pooling = (keras.layers.MaxPooling2D(2, padding="same", dtype=self.dtype_policy,
                                                  name="pool") if self.pool else None)

    def call(self, inputs, training=None):
        x = self.conv(inputs)
        return self.pooling(x) if self.pooling is not None else x

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


@keras.utils.register_keras_serializable("tapeloop")
class UpsampleConv(_Block):
    """2x nearest-neighbour upsampling, a centred crop to `target_size`, then Conv2D
    ('same'): UpSampling2D -> Cropping2D -> Conv2D."""

    def __init__(self, filters, kernel_size=3, activation="relu", target_size=None, **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.target_size = tuple(int(s) for s in target_size) if target_size else None
        self.upsample = keras.layers.UpSampling2D(2, dtype=self.dtype_policy, name="upsample")
        self.conv = self._conv(name="conv")

    def call(self, inputs, training=None):
        return self.conv(crop_to(self.upsample(inputs), self.target_size))

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
        return crop_to(self.conv(inputs), self.target_size)

    def get_config(self) -> dict:
        return {**super().get_config(), "target_size": self.target_size}


DOWN_BLOCKS = {"pool": ConvPool, "stride": ConvStride}
UP_BLOCKS = {"upsample": UpsampleConv, "transpose": ConvTransposeUp}
