"""The model registry: a `--model` name -> the settings that tell architectures apart.

Kept free of TensorFlow so that validating a config, and `train.py --help`, stay fast.
`layers.autoencoders.build_autoencoder` turns an entry into a model; every entry is a
configuration of the same blocks (`layers.blocks`), never a copy of code.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What distinguishes one registered architecture from another."""

    encoder_filters: tuple[int, ...]
    decoder_filters: tuple[int, ...]
    kernel_size: int
    down: str = "pool"  # a key of blocks.DOWN_BLOCKS
    up: str = "upsample"  # a key of blocks.UP_BLOCKS
    variational: bool = False  # a dense Gaussian latent between encoder and decoder
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
    "vae": ModelSpec(
        encoder_filters=(32, 64), decoder_filters=(64, 32), kernel_size=3, down="stride",
        up="transpose", variational=True,
        description="convolutional VAE: stride-2 Conv 32-64, a dense Gaussian latent "
                    "(--latent_dim), Conv2DTranspose 64-32 back up"),
}
