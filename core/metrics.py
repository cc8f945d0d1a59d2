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


def _gaussian_band(size: int, window: int, sigma: float = 1.5) -> np.ndarray:
    """The (size - window + 1, size) matrix whose row i is the normalised 1-D Gaussian
    over positions i .. i + window - 1: a VALID 1-D Gaussian filter as a matmul."""
    coords = np.arange(window, dtype=np.float64) - (window - 1) / 2.0
    g = np.exp(-0.5 * coords**2 / sigma**2)
    band = np.zeros((size - window + 1, size), np.float32)
    for i in range(size - window + 1):
        band[i, i:i + window] = g / g.sum()
    return band


def ssim(targets: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """Structural similarity per example (11x11 Gaussian window, sigma 1.5), (B,): the
    mean over channels of tf.image.ssim's value (max_val 1, k1 0.01, k2 0.03).

    Images smaller than the window get a window of their own size (down to 1x1), so
    the metric is defined for every image size; for 11x11 and up it is the standard one.

    The Gaussian window is the outer product of two 1-D ones, so the four local means
    SSIM needs are two matmuls with banded matrices (rows, then columns), not
    tf.image.ssim's 11x11 depthwise convolution. On this CPU (benchmarks/ssim_forms.py):
    ~3x faster for the value of 2,000 28x28 images and ~10x with its gradient; at 64x64x3
    the value takes about as long and the gradient is ~1.6x faster. Equal to
    tf.image.ssim within 2e-6, its gradient within 1e-6 (tested).
    """
    _, height, width, channels = targets.shape
    window = min(11, height, width)
    x, y = tf.cast(targets, tf.float32), tf.cast(images, tf.float32)
    maps = tf.stack([x, y, x * y, tf.square(x) + tf.square(y)])       # [4, B, H, W, C]
    maps = tf.transpose(maps, [0, 1, 4, 2, 3])                         # [4, B, C, H, W]
    rows = tf.constant(_gaussian_band(width, window))                  # [W', W]
    cols = tf.constant(_gaussian_band(height, window))                 # [H', H]
    out_w = width - window + 1
    t = tf.matmul(tf.reshape(maps, [-1, width]), rows, transpose_b=True)
    t = tf.transpose(tf.reshape(t, [-1, height, out_w]), [0, 2, 1])   # [4BC, W', H]
    t = tf.matmul(tf.reshape(t, [-1, height]), cols, transpose_b=True)
    mean_x, mean_y, mean_xy, mean_sq = tf.unstack(tf.reshape(t, [4, -1, channels, out_w *
                                                                  (height - window + 1)]))
    c1, c2 = 0.01**2, 0.03**2
    num0 = 2.0 * mean_x * mean_y
    den0 = tf.square(mean_x) + tf.square(mean_y)
    luminance = (num0 + c1) / (den0 + c1)
    contrast_structure = (2.0 * mean_xy - num0 + c2) / (mean_sq - den0 + c2)
    return tf.reduce_mean(luminance * contrast_structure, axis=[1, 2])


def reconstruction_metrics(targets: tf.Tensor, logits: tf.Tensor) -> dict[str, tf.Tensor]:
    """All eval metrics per example, from the model's logits."""
    images = tf.sigmoid(tf.cast(logits, tf.float32))
    return {
        "bce": bce_from_logits(targets, logits),
        "mse": mse(targets, images),
        "psnr": psnr(targets, images),
        "ssim": ssim(targets, images),
    }
