"""Per-example reconstruction metrics. Images are float32 in [0, 1]."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def bce_from_logits(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy per example: the mean over pixels, (B,) float32.

    Equal to reduce_mean(sigmoid_cross_entropy_with_logits) over H, W, C, written
    max(x, 0) - x*z + log1p(exp(-|x|)) as that op does (stable for large |x|),
    which Grappler fuses into fewer kernels than tf.math.softplus. For evaluation
    and metrics; the training step uses `bce_sum_and_gradient`.
    """
    x = tf.cast(logits, tf.float32)
    z = tf.cast(targets, tf.float32)
    return tf.reduce_mean(tf.nn.relu(x) - x * z + tf.math.log1p(tf.exp(-tf.abs(x))), axis=[1, 2, 3])


# Blocks of at most this many values in [0.5, 1] multiply to >= 2**-120, a normal float32.
_MAX_LOG_BLOCK = 120


def _log_block(pixels: int) -> int:
    """The largest divisor of `pixels` that is <= _MAX_LOG_BLOCK."""
    return max(d for d in range(1, min(pixels, _MAX_LOG_BLOCK) + 1) if pixels % d == 0)


def bce_sum_and_gradient(targets: tf.Tensor, logits: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The per-pixel BCE summed over every pixel of the batch, and its gradient.

    For the training step, which hands the gradient to `tape.gradient` as the
    logits' output gradient, so nothing here is recorded on a tape. Per pixel the
    loss is softplus(x) - x z = relu(x) - x z + log1p(exp(-|x|)), and
    log1p(exp(-|x|)) = -log(sigmoid(|x|)) = -log(0.5 + |s - 0.5|) with s = sigmoid(x),
    which the gradient s - z needs anyway. The sum of those logs is taken as the log
    of products over blocks of <= 120 pixels (each factor is in [0.5, 1], so no
    product underflows): one log per block instead of a log1p and an exp per pixel,
    about half the loss's time on CPU (benchmarks/NOTES.md). Error: a few float32
    roundings per block, within 1e-5 of TensorFlow's loss.

    Returns (total, d total / d logits), float32; the static pixel count per
    example must be known.
    """
    x = tf.cast(logits, tf.float32)
    z = tf.cast(targets, tf.float32)
    s = tf.sigmoid(x)
    pixels = int(np.prod(x.shape[1:]))
    blocks = tf.reshape(0.5 + tf.abs(s - 0.5), [-1, _log_block(pixels)])
    log_term = tf.reduce_sum(tf.math.log(tf.reduce_prod(blocks, axis=1)))
    total = tf.reduce_sum(tf.nn.relu(x)) - tf.reduce_sum(x * z) - log_term
    return total, s - z


def mse(targets: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """Mean squared error per example, (B,)."""
    return tf.reduce_mean(tf.square(targets - images), axis=[1, 2, 3])


def psnr(targets: tf.Tensor, images: tf.Tensor, max_value: float = 1.0) -> tf.Tensor:
    """Peak signal-to-noise ratio in dB per example, (B,); capped at 100 dB for a
    perfect reconstruction instead of +inf."""
    err = tf.maximum(mse(targets, images), max_value**2 * 1e-10)
    return 10.0 * tf.math.log(max_value**2 / err) / tf.math.log(10.0)


def ssim(targets: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """Structural similarity per example (11x11 Gaussian window, sigma 1.5), (B,).

    Images smaller than the window get a window of their own size (down to 1x1), so
    the metric is defined for every image size; for 11x11 and up it is the standard one.
    """
    window = min(11, *targets.shape[1:3])
    return tf.image.ssim(targets, images, max_val=1.0, filter_size=window)


def reconstruction_metrics(targets: tf.Tensor, logits: tf.Tensor) -> dict[str, tf.Tensor]:
    """All eval metrics per example, from the model's logits."""
    images = tf.sigmoid(tf.cast(logits, tf.float32))
    return {
        "bce": bce_from_logits(targets, logits),
        "mse": mse(targets, images),
        "psnr": psnr(targets, images),
        "ssim": ssim(targets, images),
    }
