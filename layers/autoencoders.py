"""Encoder, Decoder and Autoencoder as subclassed Keras models, and the registry.

The registry maps a `--model` name to keyword arguments of `build_autoencoder`.
Every entry is a configuration of the same blocks (`layers.blocks`), never a
copy of code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import tensorflow as tf

from layers import blocks

keras = tf.keras


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What distinguishes one registered architecture from another."""

    encoder_filters: tuple[int, ...]
    decoder_filters: tuple[int, ...]
    kernel_size: int
    down: str = "pool"  # a key of blocks.DOWN_BLOCKS
    up: str = "upsample"  # a key of blocks.UP_BLOCKS
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "seed": ModelSpec(
        encoder_filters=(8, 4, 4), decoder_filters=(4, 4, 8), kernel_size=4,
        description="the tutorial's model: Conv 8-4-4 (4x4) + max-pooling to 4x4x4; "
                    "decoder Conv 4, then (upsample, Conv) 4, 8 and 1, from the code only"),
    "keras_blog": ModelSpec(
        encoder_filters=(16, 8, 8), decoder_filters=(8, 8, 16), kernel_size=3,
        description="'Building Autoencoders in Keras' conv model: 16-8-8 (3x3), 4x4x8 bottleneck"),
    "denoiser": ModelSpec(
        encoder_filters=(32, 32), decoder_filters=(32, 32), kernel_size=3, up="transpose",
        description="keras.io denoising example: Conv 32-32 + pooling to 7x7x32, "
                    "two stride-2 Conv2DTranspose back up"),
}


def downsampled_size(size: int, times: int) -> int:
    """Size after `times` 'same'-padded halvings (each rounds up)."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


@keras.utils.register_keras_serializable("tapeloop")
class Encoder(keras.Model):
    """Stack of down-sampling blocks: (B, H, W, C) -> (B, ceil(H/2^n), ceil(W/2^n), filters[-1])."""

    def __init__(self, filters: Sequence[int] = (8, 4, 4), kernel_size: int = 4,
                 down: str = "pool", activation: str = "relu", **kwargs):
        super().__init__(**kwargs)
        if down not in blocks.DOWN_BLOCKS:
            raise ValueError(f"down={down!r}: expected one of {sorted(blocks.DOWN_BLOCKS)}")
        self.filters = tuple(int(f) for f in filters)
        self.kernel_size = int(kernel_size)
        self.down = down
        self.activation = activation
        block = blocks.DOWN_BLOCKS[down]
        self.blocks = [
            block(f, self.kernel_size, activation, dtype=self.dtype_policy, name=f"down{i}")
            for i, f in enumerate(self.filters)
        ]

    def call(self, inputs, training=None):
        x = inputs
        for block in self.blocks:
            x = block(x, training=training)  # each halves H and W, rounding up
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "down": self.down, "activation": self.activation}


@keras.utils.register_keras_serializable("tapeloop")
class Decoder(keras.Model):
    """From the code back to the image, retracing the encoder's sizes in reverse, and
    returning logits (float32, also under mixed precision, so the loss and the
    sigmoid stay numerically safe).

    up='upsample' (the tutorial's decoder): conv, then (2x upsample, conv) per
      stage, the last conv linear with `channels` filters: the logits.
    up='transpose': one stride-2 Conv2DTranspose per stage, then a 'same' conv
      to `channels` logits (the keras.io denoiser).
    """

    def __init__(self, filters: Sequence[int] = (4, 4, 8), kernel_size: int = 4,
                 output_shape: Sequence[int] = (28, 28, 1), up: str = "upsample",
                 activation: str = "relu", **kwargs):
        super().__init__(**kwargs)
        if up not in blocks.UP_BLOCKS:
            raise ValueError(f"up={up!r}: expected one of {sorted(blocks.UP_BLOCKS)}")
        self.filters = tuple(int(f) for f in filters)
        self.kernel_size = int(kernel_size)
        self.image_shape = tuple(int(d) for d in output_shape)
        self.up = up
        self.activation = activation
        height, width, channels = self.image_shape
        n = len(self.filters)
        # sizes[j]: the encoder's size after j halvings; stage i of n restores sizes[n - i].
        sizes = [(downsampled_size(height, j), downsampled_size(width, j)) for j in range(n + 1)]
        k, act, policy = self.kernel_size, activation, self.dtype_policy
        if up == "upsample":
            self.blocks = [blocks.ConvPool(self.filters[0], k, act, pool=False, dtype=policy,
                                           name="up0")]
            self.blocks += [
                blocks.UpsampleConv(f, k, act, target_size=sizes[n - i], dtype=policy, name=f"up{i}")
                for i, f in enumerate(self.filters[1:], start=1)]
            self.to_logits = blocks.UpsampleConv(channels, k, None, target_size=sizes[0],
                                                 dtype="float32", name="logits")
        else:
            self.blocks = [
                blocks.ConvTransposeUp(f, k, act, target_size=sizes[n - 1 - i], dtype=policy,
                                       name=f"up{i}")
                for i, f in enumerate(self.filters)]
            self.to_logits = keras.layers.Conv2D(channels, k, padding="same", dtype="float32",
                                                 name="logits")

    def call(self, inputs, training=None):
        x = inputs
        for block in self.blocks:
            x = block(x, training=training)  # (B, 7, 7, 4), (B, 14, 14, 8) for the seed model
        return self.to_logits(x)  # (B, H, W, C), float32 logits

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "output_shape": self.image_shape, "up": self.up, "activation": self.activation}


@keras.utils.register_keras_serializable("tapeloop")
class Autoencoder(keras.Model):
    """Encoder and decoder. `call` returns logits; the decoder sees only the code."""

    def __init__(self, encoder: Encoder, decoder: Decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder

    def call(self, inputs, training=None):
        return self.decoder(self.encoder(inputs, training=training), training=training)

    def encode(self, images, training=None):
        """Images in [0, 1], (B, H, W, C) -> code (B, h, w, c)."""
        return self.encoder(images, training=training)

    def decode(self, code, training=None):
        """Code -> images in [0, 1] (float32)."""
        return tf.sigmoid(self.decoder(code, training=training))

    def reconstruct(self, images, training=None):
        """Images -> reconstructed images in [0, 1] (float32)."""
        return tf.sigmoid(self(images, training=training))

    def get_config(self) -> dict:
        return {**super().get_config(),
                "encoder": keras.utils.serialize_keras_object(self.encoder),
                "decoder": keras.utils.serialize_keras_object(self.decoder)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = keras.utils.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.utils.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder, decoder, **config)


def build_autoencoder(
    name: str = "seed",
    input_shape: Sequence[int] = (28, 28, 1),
    precision: str = "float32",
    encoder_filters: Sequence[int] | None = None,
    decoder_filters: Sequence[int] | None = None,
    kernel_size: int | None = None,
) -> Autoencoder:
    """Builds the registered model `name`, with weights, for images of `input_shape`.

    Args:
      name: a key of `MODELS`.
      input_shape: (H, W, C) of the images.
      precision: a Keras dtype policy name: float32, mixed_float16 or mixed_bfloat16.
      encoder_filters, decoder_filters, kernel_size: override the registered values.

    Raises:
      KeyError: unknown `name`.
    """
    spec = MODELS[name]
    enc_filters = tuple(encoder_filters or spec.encoder_filters)
    dec_filters = tuple(decoder_filters or spec.decoder_filters)
    if len(enc_filters) != len(dec_filters):
        raise ValueError(
            f"encoder has {len(enc_filters)} stages and decoder {len(dec_filters)}: "
            "give both the same number of filters")
    kernel = kernel_size or spec.kernel_size
    policy = keras.DTypePolicy(precision)
    model = Autoencoder(
        Encoder(enc_filters, kernel, spec.down, dtype=policy, name="encoder"),
        Decoder(dec_filters, kernel, input_shape, spec.up, dtype=policy, name="decoder"),
        dtype=policy, name=name)
    model(tf.zeros((1, *input_shape)))  # creates the weights
    return model
