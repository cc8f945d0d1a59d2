"""The residual autoencoder (`--model=resnet`): shapes, config round trip, every weight
trains, the bottleneck, replicas, and the image sizes it refuses."""

import re

import numpy as np
import pytest
import tensorflow as tf

import core
from conftest import random_images
from core import data, distribute
from core.config import Config
from core.errors import ConfigError
from core.trainer import Trainer
from layers import resnet
from layers.autoencoders import Autoencoder, build_autoencoder

SMALL = dict(encoder_filters=(8, 16), decoder_filters=(16, 8))


@pytest.mark.parametrize("shape, kw, code", [
    ((32, 32, 3), {}, (4, 4, 4)),
    ((32, 64, 3), dict(latent_channels=8), (4, 8, 8)),
    ((64, 48, 1), dict(blocks_per_stage=2, **SMALL), (16, 12, 4)),
])
def test_shapes_and_mirrored_stages(shape, kw, code):
    model = build_autoencoder("resnet", shape, **kw)
    x = random_images(2, shape)
    assert tuple(model.encode(x).shape) == (2, *code)
    assert tuple(model(x).shape) == (2, *shape) and model(x).dtype == tf.float32
    blocks = [layer for layer in model.encoder._flatten_layers()
              if isinstance(layer, resnet.ResidualBlock)]
    stages = len(kw.get("encoder_filters", (32, 64, 64)))
    assert len(blocks) == stages * kw.get("blocks_per_stage", 1)
    assert model.encoder.filters == tuple(reversed(model.decoder.filters))
    norms = [layer for layer in model._flatten_layers()
             if isinstance(layer, tf.keras.layers.GroupNormalization)]
    assert norms and all(layer.groups > 1 for layer in norms)


def test_get_config_round_trip():
    model = build_autoencoder("resnet", (32, 32, 3), blocks_per_stage=2, **SMALL)
    clone = Autoencoder.from_config(model.get_config())
    x = random_images(2, (32, 32, 3))
    clone(x)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert clone.encoder.get_config() == model.encoder.get_config() | {"name": "encoder"}


def test_one_gradient_step_changes_every_weight():
    model = build_autoencoder("resnet", (16, 16, 3), **SMALL)
    optimizer = tf.keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    x = random_images(4, (16, 16, 3))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(x, model(x, training=True)))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                  model.trainable_variables))
    assert len(before) == len(model.trainable_variables) > 20
    for var, old in zip(model.trainable_variables, before):
        assert not np.array_equal(var.numpy(), old), f"{var.path} did not change"


def test_output_depends_on_input_only_through_the_code():
    """No skip connection crosses the bottleneck: d out/d in = d out/d code @ d code/d in."""
    model = build_autoencoder("resnet", (8, 8, 1), latent_channels=2, **SMALL)
    x = random_images(1, (8, 8, 1))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        code = model.encode(x)
        y = model(x)
    total = tape.jacobian(y, x).numpy().reshape(64, 64)
    enc = tape.jacobian(code, x).numpy().reshape(-1, 64)
    with tf.GradientTape() as tape:
        tape.watch(code)
        out = model.decode_logits(code)
    dec = tape.jacobian(out, code).numpy().reshape(64, -1)
    np.testing.assert_allclose(total, dec @ enc, atol=1e-5 * np.abs(total).max())
    # Rank <= the code's 8 numbers: past the 8th, singular values are float32 rounding
    # (~2e-7 of the largest; oneDNN's sums reach that), where the 8th is ~4e-2 of it.
    singular = np.linalg.svd(total, compute_uv=False)
    assert enc.shape[0] == 8 and singular[8] < 1e-4 * singular[0]


@pytest.mark.parametrize("jit", [False, True])
def test_two_replicas_give_the_same_steps_as_one(jit):
    images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    results = []
    for replicas in (1, 2):
        strategy = (tf.distribute.get_strategy() if replicas == 1
                    else distribute.make_strategy("mirrored", replicas))
        tf.keras.utils.set_random_seed(3)
        with strategy.scope():
            model = build_autoencoder("resnet", (16, 16, 3), **SMALL)
            trainer = Trainer(model, strategy, 16, 3e-3, jit_compile=jit)
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: data.train_dataset(images, 16, 3, 0, ctx)))
        losses = [trainer.train_loop(iterator, 2) for _ in range(2)]
        results.append((losses, [v.numpy() for v in model.trainable_variables]))
    (one, w1), (two, w2) = results
    np.testing.assert_allclose(one, two, rtol=1e-5)
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_an_image_size_the_stages_cannot_halve_is_refused_then_trains(tmp_path):
    config = Config(model="resnet", dataset="fontdigits", train_split="train[:256]",
                    eval_split="test[:64]", model_dir=str(tmp_path / "run"),
                    train_steps=6, epochs=None, batch_size=16, eval_every=6, log_every=3,
                    steps_per_loop=3, **SMALL)
    with pytest.raises(ConfigError, match=re.escape(
            "--model=resnet halves the image 2 times; 30x30 does not divide by 4: use "
            "--image_size=32,32")):
        core.run(config.replace(image_size=(30, 30)))
    assert not (tmp_path / "run").exists()
    result = core.run(config.replace(image_size=(32, 32)))
    assert result["step"] == 6 and np.isfinite([h["loss"] for h in result["history"]]).all()
