"""The model registry: a `--model` name -> the settings that tell architectures apart.

Kept free of TensorFlow so that validating a config, and `train.py --help`, stay fast.
`layers.autoencoders.build_autoencoder` turns an entry into a model; every entry is a
configuration of the same blocks (`layers.blocks`), never a copy of code.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What distinguishes one registered architecture from another."""

    encoder_filters: tuple[int, ...]
    decoder_filters: tuple[int, ...]
    kernel_size: int
    down: str = "pool"  # a key of blocks.DOWN_BLOCKS
    up: str = "upsample"  # a key of blocks.UP_BLOCKS
    variational: bool = False  # a dense Gaussian latent between encoder and decoder
    family: str = "conv"  # conv: layers.blocks stages; resnet: layers.resnet
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
    "resnet": ModelSpec(
        encoder_filters=(32, 64, 64), decoder_filters=(64, 64, 32), kernel_size=3,
        family="resnet",
        description="residual autoencoder for natural images (latent diffusion's design): "
                    "stages of GroupNorm+SiLU residual blocks (--blocks_per_stage), stride-2 "
                    "down, a conv bottleneck of --latent_channels, mirrored decoder"),
}


# Models users bring: a name -> factory(image_shape) -> (encoder, decoder). `register` adds
# one; `--model=MODULE:FACTORY` names one without registering it.
FACTORIES: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
    """Makes `factory` available as `--model=name` (Config(model=name)) in this process.

    `factory(image_shape)`, with image_shape = (H, W, C), returns `(encoder, decoder)`: two
    `tf.keras.Model`s. The encoder maps images (N, H, W, C) in [0, 1] to a code of any
    shape; the decoder maps the code to logits (N, H, W, C). Registering a name again
    replaces the factory.
    """
    if not name or ":" in name or name in MODELS:
        raise ValueError(f"register({name!r}, ...): choose a name that is not empty, holds no "
                         f"':' and is not a built-in model ({', '.join(MODELS)})")
    if not callable(factory):
        raise TypeError(f"register({name!r}, {factory!r}): the factory must be callable, "
                        "factory(image_shape) -> (encoder, decoder)")
    FACTORIES[name] = factory


def is_user_model(name: str) -> bool:
    """A registered factory's name, or MODULE:FACTORY."""
    return name in FACTORIES or is_module_attr(name)


def is_module_attr(name: str) -> bool:
    """Whether `name` reads MODULE:ATTR (a factory, or a loss function: core.losses)."""
    module, sep, attr = name.partition(":")
    return bool(sep) and all(part.isidentifier() for part in module.split(".")) and \
        attr.isidentifier()


def import_module_attr(flag: str, name: str, signature: str) -> Callable:
    """The callable `name` = MODULE:ATTR names, MODULE imported from PYTHONPATH or the
    working directory (as `python -m` would find it).

    Args:
      flag: the flag, for messages ('--model', '--loss').
      signature: how ATTR must be defined, for the message when it is missing.
    Raises:
      ImportError: one line: the import failed, or MODULE has no callable ATTR.
    """
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ImportError(f"{flag}={name}: importing {module_name} failed ({type(e).__name__}: "
                          f"{e}): put {module_name.replace('.', '/')}.py in the working "
                          "directory or on PYTHONPATH, and fix what it raises") from e
    found = getattr(module, attr, None)
    if not callable(found):
        raise ImportError(f"{flag}={name}: {module_name} has no callable {attr!r}: define "
                          f"{attr}{signature} in {getattr(module, '__file__', module_name)}")
    return found
