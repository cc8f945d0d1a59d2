"""A residual autoencoder for natural images: the design of modern image autoencoders
(the first stage of latent diffusion, "High-Resolution Image Synthesis with Latent
Diffusion Models", is the best-known one), at a size a CPU can train.

Encoder: a 3x3 conv to `filters[0]`; per stage, `blocks_per_stage` residual blocks
(GroupNorm, SiLU, 3x3 conv, twice, plus the input) at that stage's width, then a
stride-2 3x3 conv that halves H and W; then GroupNorm, SiLU and a 3x3 conv to
`latent_channels`: the code, (H / 2^stages, W / 2^stages, latent_channels).

Decoder, mirrored: a 3x3 conv from the code to `filters[0]`; per stage, residual
blocks, then 2x nearest upsampling and a 3x3 conv; then GroupNorm, SiLU and a 3x3
conv to the image's channels: the logits (float32).

Sides must divide by 2^stages (the runner checks it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

keras = tf.keras


def _groups(filters: int) -> int:
    """GroupNorm's groups: 32 in latent diffusion's wide layers; here at most 8, and a
    divisor of the channel count."""
    return math.gcd(int(filters), 8)


@keras.utils.register_keras_serializable("tapeloop")
class ResidualBlock(keras.layers.Layer):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv on the skip path when the
    width changes."""

    def __init__(self, filters: int, in_filters: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.in_filters = int(in_filters or filters)
        policy = self.dtype_policy
        self.norm1 = keras.layers.GroupNormalization(_groups(self.in_filters), dtype=policy,
                                                     name="norm1")
        self.conv1 = keras.layers.Conv2D(self.filters, 3, padding="same", dtype=policy,
                                         name="conv1")
        self.norm2 = keras.layers.GroupNormalization(_groups(self.filters), dtype=policy,
                                                     name="norm2")
        self.conv2 = keras.layers.Conv2D(self.filters, 3, padding="same", dtype=policy,
                                         name="conv2")
        self.skip = (keras.layers.Conv2D(self.filters, 1, dtype=policy, name="skip")
                     if self.in_filters != self.filters else None)

    def call(self, x):
        h = self.conv1(tf.nn.silu(self.norm1(x)))
        h = self.conv2(tf.nn.silu(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "in_filters": self.in_filters}


def _stages(filters, blocks_per_stage, policy, resample, out_channels, out_dtype, out_name):
    """The layers of either half: a 3x3 conv in; per stage, residual blocks then
    `resample(i, filters)` (down or up); GroupNorm, SiLU and a 3x3 conv out."""
    layers = [keras.layers.Conv2D(filters[0], 3, padding="same", dtype=policy, name="conv_in")]
    width = filters[0]
    for i, f in enumerate(filters):
        for j in range(blocks_per_stage):
            layers.append(ResidualBlock(f, width, dtype=policy, name=f"stage{i}_block{j}"))
            width = f
        layers += resample(i, f)
    return layers + [
        keras.layers.GroupNormalization(_groups(width), dtype=policy, name="norm_out"),
        keras.layers.Activation("silu", dtype=policy, name="silu_out"),
        keras.layers.Conv2D(out_channels, 3, padding="same", dtype=out_dtype, name=out_name)]


class _Stages(keras.Model):
    """Holds layers as attributes `layer0`, `layer1`, ...: TensorFlow checkpoints track
    attributes, not the lists Keras 3 wraps."""

    # How the stack computes: None, as its layers say; or faster forms of the same
    # function, chosen once by the runner (layers/fast_forms.py).
    forms = None

    def _set_layers(self, layers) -> None:
        self._num_layers = len(layers)
        for i, layer in enumerate(layers):
            setattr(self, f"layer{i}", layer)

    def call(self, x, training=None):
        layers = [getattr(self, f"layer{i}") for i in range(self._num_layers)]
        if self.forms is not None:
            return self.forms(layers, x)
        for layer in layers:
            x = layer(x)
        return x


@keras.utils.register_keras_serializable("tapeloop")
class ResnetEncoder(_Stages):
    """(B, H, W, C) -> (B, H / 2^stages, W / 2^stages, latent_channels)."""

    def __init__(self, filters: Sequence[int] = (32, 64, 64), blocks_per_stage: int = 1,
                 latent_channels: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.filters = tuple(int(f) for f in filters)
        self.blocks_per_stage = int(blocks_per_stage)
        self.latent_channels = int(latent_channels)
        policy = self.dtype_policy

        def down(i, f):
            return [keras.layers.Conv2D(f, 3, strides=2, padding="same", dtype=policy,
                                        name=f"stage{i}_down")]

        self._set_layers(_stages(self.filters, self.blocks_per_stage, policy, down,
                                 self.latent_channels, policy, "to_code"))

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters,
                "blocks_per_stage": self.blocks_per_stage,
                "latent_channels": self.latent_channels}


@keras.utils.register_keras_serializable("tapeloop")
class ResnetDecoder(_Stages):
    """(B, h, w, latent_channels) -> logits (B, h * 2^stages, w * 2^stages, channels), float32."""

    def __init__(self, filters: Sequence[int] = (64, 64, 32), blocks_per_stage: int = 1,
                 channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.filters = tuple(int(f) for f in filters)
        self.blocks_per_stage = int(blocks_per_stage)
        self.channels = int(channels)
        policy = self.dtype_policy

        def up(i, f):
            return [keras.layers.UpSampling2D(2, dtype=policy, name=f"stage{i}_upsample"),
                    keras.layers.Conv2D(f, 3, padding="same", dtype=policy, name=f"stage{i}_up")]

        self._set_layers(_stages(self.filters, self.blocks_per_stage, policy, up,
                                 self.channels, "float32", "logits"))

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters,
                "blocks_per_stage": self.blocks_per_stage, "channels": self.channels}
