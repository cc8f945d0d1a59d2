"""Per-example reconstruction metrics. Images are float32 in [0, 1]."""

from __future__ import annotations

import tensorflow as tf


@tf.custom_gradient
def _bce_per_example(targets, logits):
    # softplus(x) - x*z, written max(x, 0) - x*z + log1p(exp(-|x|)) as in
    # sigmoid_cross_entropy_with_logits (stable for large |x|): the same value,
    # and about half the time of tf.math.softplus on CPU (benchmarks/NOTES.md).
    pixels = tf.cast(tf.reduce_prod(tf.shape(logits)[1:]), tf.float32)
    loss = tf.reduce_mean(tf.nn.relu(logits) - logits * targets
                          + tf.math.log1p(tf.exp(-tf.abs(logits))), axis=[1, 2, 3])

    def grad(upstream):  # upstream: (B,)
        # d/dx [softplus(x) - x z] = sigmoid(x) - z: 3 passes, where automatic
        # differentiation of the formula above takes about 8.
        scale = tf.reshape(upstream / pixels, [-1, 1, 1, 1])
        return None, (tf.sigmoid(logits) - targets) * scale

    return loss, grad


def bce_from_logits(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy per example: the mean over pixels, (B,) float32.

    Equal to reduce_mean(sigmoid_cross_entropy_with_logits) over H, W, C, with a
    hand-written gradient; it is the training loss, so it sits on the hot path.
    """
    return _bce_per_example(tf.cast(targets, tf.float32), tf.cast(logits, tf.float32))


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
