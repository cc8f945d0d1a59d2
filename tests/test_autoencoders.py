import numpy as np
import pytest
import tensorflow as tf

from conftest import random_images
from layers.autoencoders import MODELS, Autoencoder, build_autoencoder


def test_seed_model_is_the_tutorials_encoder():
    model = build_autoencoder("seed")
    convs = [b.conv for b in model.encoder.blocks]
    assert [c.filters for c in convs] == [8, 4, 4]
    assert all(tuple(c.kernel_size) == (4, 4) for c in convs)
    assert all(b.pool for b in model.encoder.blocks)
    code = model.encode(tf.zeros((3, 28, 28, 1)))
    assert tuple(code.shape) == (3, 4, 4, 4)  # the 64-number bottleneck
    assert tuple(model(tf.zeros((3, 28, 28, 1))).shape) == (3, 28, 28, 1)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 20, 3), (9, 13, 1)])
def test_shapes_and_symmetry(name, shape):
    model = build_autoencoder(name, input_shape=shape)
    x = random_images(2, shape)
    code = model.encode(x)
    assert tuple(model(x).shape) == (2, *shape)
    assert tuple(model.decode(code).shape) == (2, *shape)
    # The decoder mirrors the encoder: as many stages, and its last up-block's
    # width equals the first down-block's.
    assert len(model.encoder.blocks) == len(model.decoder.blocks)
    recon = model.reconstruct(x).numpy()
    assert recon.min() >= 0.0 and recon.max() <= 1.0


def _jacobians(model, x, bypass=None):
    """(total, decoder, encoder) Jacobians, flattened to matrices, at one example."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        code = model.encode(x)
        y = model(x) + (bypass(x) if bypass else 0.0)
    total = tape.jacobian(y, x).numpy()
    enc = tape.jacobian(code, x).numpy()
    with tf.GradientTape() as tape:
        tape.watch(code)
        out = model.decoder(code)
    dec = tape.jacobian(out, code).numpy()
    n_in, n_code = x.shape.num_elements(), code.shape.num_elements()
    return total.reshape(-1, n_in), dec.reshape(-1, n_code), enc.reshape(n_code, n_in)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_depends_on_input_only_through_the_code(name):
    """d(output)/d(input) = d(output)/d(code) @ d(code)/d(input): every path from the
    input to the output runs through the code. A bypass (the tutorial's bug) adds a
    term and breaks the equality; where the code is smaller than the image, the
    Jacobian's rank is also at most the code size."""
    model = build_autoencoder(name, input_shape=(12, 12, 1))
    x = random_images(1, (12, 12, 1))
    total, dec, enc = _jacobians(model, x)
    np.testing.assert_allclose(total, dec @ enc, atol=1e-5 * np.abs(total).max())
    if enc.shape[0] < enc.shape[1]:
        assert np.linalg.matrix_rank(total, tol=1e-6 * np.abs(total).max()) <= enc.shape[0]
    np.testing.assert_allclose(model.decode(model.encode(x)).numpy(),
                               model.reconstruct(x).numpy(), atol=1e-6)


def test_bottleneck_test_catches_the_tutorial_bug():
    """The same checks on the tutorial's wiring (a decoder conv on the input) fail."""
    model = build_autoencoder("seed", input_shape=(12, 12, 1))
    leak = tf.keras.layers.Conv2D(1, 3, padding="same")
    x = random_images(1, (12, 12, 1))
    total, dec, enc = _jacobians(model, x, bypass=leak)
    assert np.abs(total - dec @ enc).max() > 1e-3 * np.abs(total).max()
    assert np.linalg.matrix_rank(total, tol=1e-6 * np.abs(total).max()) > enc.shape[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_get_config_round_trip(name):
    model = build_autoencoder(name)
    config = model.get_config()
    clone = Autoencoder.from_config(config)
    x = random_images(2)
    clone(x)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert clone.encoder.get_config()["filters"] == model.encoder.get_config()["filters"]
    assert clone.decoder.get_config() == model.decoder.get_config() | {
        "name": clone.decoder.name}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_gradient_step_changes_every_weight(name):
    model = build_autoencoder(name)
    optimizer = tf.keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    x = random_images(8)
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(x, logits))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                  model.trainable_variables))
    for var, old in zip(model.trainable_variables, before):
        assert not np.array_equal(var.numpy(), old), f"{var.path} did not change"


def test_overrides_and_mixed_precision():
    model = build_autoencoder("seed", encoder_filters=(6, 5), decoder_filters=(5, 6),
                              kernel_size=3, precision="mixed_bfloat16")
    x = random_images(2)
    assert tuple(model.encode(x).shape) == (2, 7, 7, 5)
    assert model.encode(x).dtype == tf.bfloat16
    assert model(x).dtype == tf.float32  # logits stay float32 for a safe loss
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)
    with pytest.raises(ValueError, match="same number"):
        build_autoencoder("seed", encoder_filters=(6, 5), decoder_filters=(5,))
