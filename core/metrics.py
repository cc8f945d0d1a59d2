"""Per-example reconstruction metrics. Images are float32 in [0, 1]."""

from __future__ import annotations

import tensorflow as tf


def bce_from_logits(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy per example: the mean over pixels, (B,) float32."""
    per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(targets, tf.float32), logits=tf.cast(logits, tf.float32))
    return tf.reduce_mean(per_pixel, axis=[1, 2, 3])


def mse(targets: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """Mean squared error per example, (B,)."""
    return tf.reduce_mean(tf.square(targets - images), axis=[1, 2, 3])


def psnr(targets: tf.Tensor, images: tf.Tensor, max_value: float = 1.0) -> tf.Tensor:
    """Peak signal-to-noise ratio in dB per example, (B,); capped at 100 dB for a
    perfect reconstruction instead of +inf."""
    err = tf.maximum(mse(targets, images), max_value**2 * 1e-10)
    return 10.0 * tf.math.log(max_value**2 / err) / tf.math.log(10.0)


def ssim(targets: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """Structural similarity per example (11x11 Gaussian window, sigma 1.5), (B,)."""
    return tf.image.ssim(targets, images, max_val=1.0)


def reconstruction_metrics(targets: tf.Tensor, logits: tf.Tensor) -> dict[str, tf.Tensor]:
    """All eval metrics per example, from the model's logits."""
    images = tf.sigmoid(tf.cast(logits, tf.float32))
    return {
        "bce": bce_from_logits(targets, logits),
        "mse": mse(targets, images),
        "psnr": psnr(targets, images),
        "ssim": ssim(targets, images),
    }
