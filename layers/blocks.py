"""Reusable convolutional blocks with one Keras contract.

Every block stores its constructor arguments, declares its sublayers in
`__init__` (they hold no weights until Keras builds them on the first call,
when the input shape is known), implements `call(inputs, training=None)` and returns its constructor
arguments from `get_config`, so `Block.from_config(block.get_config())`
rebuilds it.
"""

from __future__ import annotations

import tensorflow as tf

keras = tf.keras


class _Block(keras.layers.Layer):
    """Shared storage of the common conv arguments."""

    def __init__(
        self,
        filters: int,
        kernel_size: int = 3,
        activation: str | None = "relu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.activation = activation

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            activation=self.activation,
        )
        return config


@keras.utils.register_keras_serializable("tapeloop")
class ConvPool(_Block):
    """Conv2D ('same' padding) then 2x2 max-pooling ('same'): halves H and W, rounding up."""

    def __init__(self, filters, kernel_size=3, activation="relu", pool=True, **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.pool = bool(pool)
        self.conv = keras.layers.Conv2D(
            self.filters, self.kernel_size, padding="same", activation=activation,
            dtype=self.dtype_policy, name="conv")
        self.pooling = (
            keras.layers.MaxPooling2D(2, padding="same", dtype=self.dtype_policy, name="pool")
            if self.pool else None)

    def call(self, inputs, training=None):
        x = self.conv(inputs)
        return self.pooling(x) if self.pooling is not None else x

    def get_config(self) -> dict:
        return {**super().get_config(), "pool": self.pool}


@keras.utils.register_keras_serializable("tapeloop")
class ConvUpsample(_Block):
    """Conv2D ('same' padding) then 2x nearest-neighbour upsampling: doubles H and W."""

    def __init__(self, filters, kernel_size=3, activation="relu", upsample=True, **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.upsample = bool(upsample)
        self.conv = keras.layers.Conv2D(
            self.filters, self.kernel_size, padding="same", activation=activation,
            dtype=self.dtype_policy, name="conv")
        self.upsampling = (
            keras.layers.UpSampling2D(2, dtype=self.dtype_policy, name="upsample")
            if self.upsample else None)

    def call(self, inputs, training=None):
        x = self.conv(inputs)
        return self.upsampling(x) if self.upsampling is not None else x

    def get_config(self) -> dict:
        return {**super().get_config(), "upsample": self.upsample}


@keras.utils.register_keras_serializable("tapeloop")
class ConvStride(_Block):
    """Conv2D with stride 2 ('same'): halves H and W with learned downsampling."""

    def __init__(self, filters, kernel_size=3, activation="relu", **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.conv = keras.layers.Conv2D(
            self.filters, self.kernel_size, strides=2, padding="same", activation=activation,
            dtype=self.dtype_policy, name="conv")

    def call(self, inputs, training=None):
        return self.conv(inputs)


@keras.utils.register_keras_serializable("tapeloop")
class ConvTransposeUp(_Block):
    """Conv2DTranspose with stride 2 ('same'): doubles H and W with learned upsampling."""

    def __init__(self, filters, kernel_size=3, activation="relu", **kwargs):
        super().__init__(filters, kernel_size, activation, **kwargs)
        self.conv = keras.layers.Conv2DTranspose(
            self.filters, self.kernel_size, strides=2, padding="same", activation=activation,
            dtype=self.dtype_policy, name="conv_transpose")

    def call(self, inputs, training=None):
        return self.conv(inputs)


DOWN_BLOCKS = {"pool": ConvPool, "stride": ConvStride}
UP_BLOCKS = {"upsample": ConvUpsample, "transpose": ConvTransposeUp}
