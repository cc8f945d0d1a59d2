import numpy as np
import pytest
import tensorflow as tf

from core import metrics
from core.trainer import Trainer
from layers.autoencoders import build_autoencoder
from conftest import random_images


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


@pytest.mark.parametrize("shape", [(4, 6, 5, 2), (3, 28, 28, 1), (2, 127, 1, 1)])
def test_bce_sum_and_gradient_match_tensorflows(shape):
    """The training loss's hand-made sum (logs of products over blocks: 60, 112 and, for a
    prime pixel count, 1 pixel per block) and gradient, against TensorFlow's."""
    rng = np.random.default_rng(1)
    targets = tf.constant(rng.random(shape), tf.float32)
    logits = tf.constant(rng.normal(0, 30, shape), tf.float32)  # many saturated sigmoids
    with tf.GradientTape() as tape:
        tape.watch(logits)
        ref = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits))
    total, grad = metrics.bce_sum_and_gradient(targets, logits)
    np.testing.assert_allclose(total.numpy(), ref.numpy(), rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), tape.gradient(ref, logits).numpy(), rtol=1e-5, atol=1e-7)


def test_bce_sum_is_exact_for_small_logits():
    """Near x = 0 every factor of the blocks is near 1/2 (products down to 2^-112): no
    underflow, and the log term itself (not only the large relu and x*z terms) is right."""
    logits = tf.constant(np.random.default_rng(2).normal(0, 0.1, (8, 28, 28, 1)), tf.float32)
    targets = tf.zeros_like(logits) + 0.5
    total, _ = metrics.bce_sum_and_gradient(targets, logits)
    ref = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits))
    np.testing.assert_allclose(total.numpy(), ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize("model_name,precision", [("seed", "float32"), ("vae", "float32"),
                                                  ("seed", "mixed_bfloat16"),
                                                  ("seed", "mixed_float16")])
def test_training_step_loss_and_gradients(model_name, precision):
    """Trainer.forward_backward (hand-made loss gradient, handed to the tape) against the
    plain way: TensorFlow's BCE, averaged per example, plus the model's extra term (the
    VAE's KL), compute_average_loss, the loss scale for mixed_float16, one tape."""
    tf.keras.utils.set_random_seed(3)
    model = build_autoencoder(model_name, precision=precision)
    trainer = Trainer(model, tf.distribute.get_strategy(), 32, 1e-3, precision=precision)
    images = random_images(16)
    seed = tf.constant([4, 5], tf.int64)
    loss, grads = trainer.forward_backward(images, images, seed)
    with tf.GradientTape() as tape:
        logits, extra, _ = model.forward(images, training=True, seed=seed)
        per_example = _reference_bce(images, tf.cast(logits, tf.float32)) + extra
        ref_loss = tf.nn.compute_average_loss(per_example, global_batch_size=32)
        scaled = trainer.optimizer.scale_loss(ref_loss)
    ref_grads = tape.gradient(scaled, model.trainable_variables)
    np.testing.assert_allclose(loss.numpy(), ref_loss.numpy(), rtol=1e-5)
    # Relative to the largest gradient of the variable: summation orders differ.
    tol = dict(rtol=1e-4, atol=1e-5) if precision == "float32" else dict(rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        scale = max(float(tf.reduce_max(tf.abs(r))), 1e-12)
        np.testing.assert_allclose(g.numpy() / scale, r.numpy() / scale, **tol)


def test_mse_psnr_ssim_values():
    a = tf.zeros((2, 8, 8, 1))
    b = tf.fill((2, 8, 8, 1), 0.1)
    np.testing.assert_allclose(metrics.mse(a, b).numpy(), [0.01, 0.01], rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(a, b).numpy(), [20.0, 20.0], rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(a, a).numpy(), [100.0, 100.0], rtol=1e-4)  # not inf
    x = tf.random.uniform((2, 16, 16, 1), seed=1)
    np.testing.assert_allclose(metrics.ssim(x, x).numpy(), [1.0, 1.0], rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (2, 64, 48, 3), (2, 8, 9, 1), (2, 11, 30, 3)])
def test_ssim_equals_tensorflows(shape):
    """The separable (matmul) SSIM is tf.image.ssim's value, also for rectangular images,
    colour, and images smaller than the 11x11 window (a window of their size)."""
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    y = np.clip(x + 0.2 * rng.standard_normal(shape).astype(np.float32), 0, 1)
    window = min(11, shape[1], shape[2])
    ref = tf.image.ssim(tf.constant(x), tf.constant(y), max_val=1.0, filter_size=window)
    np.testing.assert_allclose(metrics.ssim(tf.constant(x), tf.constant(y)).numpy(), ref.numpy(),
                               atol=2e-6)
    # Its gradient too (the ssim loss trains through it).
    xt, yt = tf.constant(x), tf.Variable(y)
    with tf.GradientTape(persistent=True) as tape:
        ours = tf.reduce_sum(metrics.ssim(xt, yt))
        theirs = tf.reduce_sum(tf.image.ssim(xt, yt, max_val=1.0, filter_size=window))
    np.testing.assert_allclose(tape.gradient(ours, yt).numpy(), tape.gradient(theirs, yt).numpy(),
                               atol=1e-6)
