"""Random augmentation of a training batch, inside the compiled step (`--augment`).

Each draw is a function of (seed, step, replica), like the denoising noise, so a resumed
run augments every batch as an uninterrupted run would, whatever the input pipeline
(arrays on the device, folders, shards). Only ops with XLA and GPU kernels for the
batch's dtype: a reverse and a select for the flip, gathers of float32 rows and columns
for the crop (`tf.image.crop_and_resize` has no XLA kernel; `GatherV2` no uint8 GPU one).
The target is the augmented image: the autoencoder learns to reproduce what it is shown.
The draws are made for a replica's batch and applied shard by shard (`Trainer`), so the
work runs on every core of the CPU recipe and the update is the same for any split.
"""

from __future__ import annotations

import tensorflow as tf

CROP_MIN_SIDE = 0.8  # crop: a box of 80-100% of each side, so a zoom of 1-1.25x


def draws(n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """The uniform draws of `n` images, (n, 4): the flip's, then the crop's side, top and
    left. Drawn for a replica's whole batch, then split with it, so each image's draws are
    the same however the batch is split into shards and micro-batches."""
    return tf.random.stateless_uniform([n, 4], seed=seed, alg="philox")


def flip(images: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Each image mirrored left-right where its draw `u` (N,) is below 1/2. Any dtype."""
    mirror = tf.reshape(u < 0.5, [-1, 1, 1, 1])
    return tf.where(mirror, tf.reverse(images, axis=[2]), images)


def _resample(images: tf.Tensor, start: tf.Tensor, size: tf.Tensor, axis: int) -> tf.Tensor:
    """Along `axis` (1: rows, 2: columns), each image's span [start, start + size) (in
    pixels, per image: (N,)) resampled linearly to the axis' full length."""
    length = images.shape[axis]
    # Pixel centres of the output, mapped into the span: (N, length).
    positions = start[:, None] + (tf.range(length, dtype=tf.float32)[None] + 0.5) * (
        size[:, None] / length) - 0.5
    positions = tf.clip_by_value(positions, 0.0, length - 1.0)
    low = tf.minimum(tf.cast(tf.floor(positions), tf.int32), length - 2)
    weight = positions - tf.cast(low, tf.float32)  # of the pixel after `low`
    a = tf.gather(images, low, axis=axis, batch_dims=1)
    b = tf.gather(images, low + 1, axis=axis, batch_dims=1)
    shape = [-1, length, 1, 1] if axis == 1 else [-1, 1, length, 1]
    weight = tf.reshape(weight, shape)
    return a + (b - a) * weight


def crop(images: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """Each image's box of `CROP_MIN_SIDE`-100% of each side (its aspect kept), placed by
    its draws `u` (N, 3) (side, top, left), resized back to the full size (bilinear).
    (N, H, W, C) -> float32."""
    images = tf.cast(images, tf.float32)
    height, width = images.shape[1], images.shape[2]
    side = CROP_MIN_SIDE + (1.0 - CROP_MIN_SIDE) * u[:, 0]  # (N,) fraction of each side
    rows, cols = side * height, side * width
    top, left = u[:, 1] * (height - rows), u[:, 2] * (width - cols)
    return _resample(_resample(images, top, rows, axis=1), left, cols, axis=2)


def apply(images: tf.Tensor, kinds: tuple[str, ...], u: tf.Tensor) -> tf.Tensor:
    """`images` with each of `kinds` applied (flip, then crop), by their `draws`."""
    if "flip" in kinds:
        images = flip(images, u[:, 0])
    if "crop" in kinds:
        images = crop(images, u[:, 1:])
    return images


def augment(images: tf.Tensor, kinds: tuple[str, ...], seed: tf.Tensor) -> tf.Tensor:
    """`apply` with the draws of `seed`, for a whole batch."""
    return apply(images, kinds, draws(tf.shape(images)[0], seed))
