"""Every registered model trains (its loss falls); denoising noise and the denoiser."""

import numpy as np
import pytest
import tensorflow as tf

import core
from core import data, metrics
from core.config import Config
from core.trainer import Trainer
from layers.autoencoders import MODELS, build_autoencoder


def _config(tmp_path, idx_dir, **kw):
    base = dict(dataset="mnist", data_dir=idx_dir, train_split="test[:2048]",
                eval_split="test[9000:9500]", model_dir=str(tmp_path), batch_size=64,
                train_steps=48, epochs=None, log_every=8, eval_every=48, strategy="default",
                learning_rate=3e-3)
    base.update(kw)
    return Config(**base)


@pytest.mark.parametrize("name", sorted(n for n in MODELS if MODELS[n].family == "conv"))
def test_short_run_loss_falls(tmp_path, idx_dir, name):
    result = core.run(_config(tmp_path, idx_dir, model=name))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.85 * losses[0], losses


def test_noise_is_fixed_across_evaluations_and_fresh_across_steps(idx_dir):
    images = data.to_float(data.load_split("test[:64]", "mnist", idx_dir).images)
    strategy = tf.distribute.get_strategy()
    trainer = Trainer(build_autoencoder("seed"), strategy, 64, 1e-3, noise_factor=0.4, seed=5)

    @tf.function
    def noisy_at(step):
        trainer.step.assign(step)
        return strategy.run(lambda: trainer.corrupt(images, trainer.step_seed(1)))

    first, second, again = noisy_at(1).numpy(), noisy_at(2).numpy(), noisy_at(1).numpy()
    assert not np.allclose(first, second)  # a new draw every training step
    np.testing.assert_array_equal(first, again)  # a function of (seed, step): resumable
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert 0.2 < np.std(first - images.numpy()) < 0.45  # noise of about 0.4, clipped
    raw = data.load_split("test[:64]", "mnist", idx_dir).images
    np.testing.assert_array_equal(data.noisy_copy(raw, 0.4, 5), data.noisy_copy(raw, 0.4, 5))


def test_denoiser_beats_the_identity(tmp_path, idx_dir):
    config = _config(tmp_path, idx_dir, model="denoiser", noise_factor=0.4, train_steps=120,
                     eval_every=120, train_split="test[:4096]")
    core.run(config)
    results = core.run(config.replace(mode="eval"))
    held_out = data.load_split("test[9000:9500]", "mnist", idx_dir).images
    noisy = data.noisy_copy(held_out, 0.4, config.seed)
    clean = data.to_float(held_out)
    eps = 1e-7
    identity_logits = tf.math.log(np.clip(noisy, eps, 1 - eps) / (1 - np.clip(noisy, eps, 1 - eps)))
    identity = float(tf.reduce_mean(metrics.bce_from_logits(clean, identity_logits)))
    identity_mse = float(np.mean((noisy - clean.numpy()) ** 2))
    assert results["bce"] < identity and results["mse"] < identity_mse, (results, identity)
