import numpy as np
import tensorflow as tf

from core import metrics


def _reference_bce(targets, logits):
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits), axis=[1, 2, 3])


def test_bce_and_its_gradient_match_tensorflows():
    rng = np.random.default_rng(0)
    targets = tf.constant(rng.random((4, 6, 5, 2)), tf.float32)
    logits = tf.constant(rng.normal(0, 30, (4, 6, 5, 2)), tf.float32)  # large |x| too
    weights = tf.constant([0.5, 1.0, 2.0, -1.0])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = metrics.bce_from_logits(targets, logits)
        ref = _reference_bce(targets, logits)
        l_ours, l_ref = tf.reduce_sum(ours * weights), tf.reduce_sum(ref * weights)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(l_ours, logits).numpy(),
                               tape.gradient(l_ref, logits).numpy(), rtol=1e-5, atol=1e-8)
    assert np.isfinite(ours.numpy()).all()


def test_mse_psnr_ssim_values():
    a = tf.zeros((2, 8, 8, 1))
    b = tf.fill((2, 8, 8, 1), 0.1)
    np.testing.assert_allclose(metrics.mse(a, b).numpy(), [0.01, 0.01], rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(a, b).numpy(), [20.0, 20.0], rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(a, a).numpy(), [100.0, 100.0], rtol=1e-4)  # not inf
    x = tf.random.uniform((2, 16, 16, 1), seed=1)
    np.testing.assert_allclose(metrics.ssim(x, x).numpy(), [1.0, 1.0], rtol=1e-5)
