
import numpy as np
import pytest
import tensorflow as tf

from conftest import random_images
from layers.autoencoders import MODELS, build_autoencoder, kl_divergence

# The models built from layers.blocks (the resnet has its own tests, test_resnet.py).
CONV_MODELS = sorted(name for name, spec in MODELS.items() if spec.family == "conv")


def test_seed_model_is_the_tutorials_encoder():
    model = build_autoencoder("seed")
    convs = [b.conv for b in model.encoder.blocks]
    assert [c.filters for c in convs] == [8, 4, 4]
    assert all(tuple(c.kernel_size) == (4, 4) for c in convs)
    assert all(b.pool for b in model.encoder.blocks)
    code = model.encode(tf.zeros((3, 28, 28, 1)))
    assert tuple(code.shape) == (3, 4, 4, 4)  # the 64-number bottleneck
    assert tuple(model(tf.zeros((3, 28, 28, 1))).shape) == (3, 28, 28, 1)


@pytest.mark.parametrize("name", CONV_MODELS)
@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 20, 3), (9, 13, 1)])
def test_shapes_and_symmetry(name, shape):
    model = build_autoencoder(name, input_shape=shape)
    x = random_images(2, shape)
    code = model.encode(x)
    assert tuple(model(x).shape) == (2, *shape)
    assert tuple(model.decode(code).shape) == (2, *shape)
    # The decoder mirrors the encoder: its stages' widths are the encoder's, reversed.
    encoder_widths = [b.filters for b in model.encoder.blocks]
    assert [b.filters for b in model.decoder.blocks] == encoder_widths[::-1]


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
        out = model.decode_logits(code)
    dec = tape.jacobian(out, code).numpy()
    n_in, n_code = x.shape.num_elements(), code.shape.num_elements()
    return total.reshape(-1, n_in), dec.reshape(-1, n_code), enc.reshape(n_code, n_in)


@pytest.mark.parametrize("name", CONV_MODELS)
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


@pytest.mark.parametrize("name", CONV_MODELS)
def test_get_config_round_trip(name):
    model = build_autoencoder(name)
    config = model.get_config()
    clone = type(model).from_config(config)
    assert type(clone) is type(model)
    x = random_images(2)
    clone(x)
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    assert clone.encoder.get_config()["filters"] == model.encoder.get_config()["filters"]
    assert clone.decoder.get_config() == model.decoder.get_config() | {
        "name": clone.decoder.name}


@pytest.mark.parametrize("name", CONV_MODELS)
def test_one_gradient_step_changes_every_weight(name):
    model = build_autoencoder(name)
    optimizer = tf.keras.optimizers.Adam(1e-2)
    optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    x = random_images(8)
    with tf.GradientTape() as tape:
        logits, extra, _ = model.forward(x, training=True, seed=tf.constant([1, 2], tf.int64))
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(x, logits)) + tf.reduce_mean(extra)
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


def test_registry_entries_are_the_published_architectures():
    blog = build_autoencoder("keras_blog")
    assert [b.conv.filters for b in blog.encoder.blocks] == [16, 8, 8]
    assert tuple(blog.encode(random_images(1)).shape) == (1, 4, 4, 8)
    denoiser = build_autoencoder("denoiser")
    assert tuple(denoiser.encode(random_images(1)).shape) == (1, 7, 7, 32)
    # The README's parameter counts, exactly (keras.io's denoiser has 28,353 too).
    assert build_autoencoder("seed").count_params() == 2_081
    assert blog.count_params() == 4_385
    assert denoiser.count_params() == 28_353
    assert build_autoencoder("vae").count_params() == 228_193
    vae = build_autoencoder("vae", latent_dim=5)
    assert tuple(vae.encode(random_images(3)).shape) == (3, 5)


def test_kl_term_matches_the_closed_form():
    mean = tf.constant([[1.0, 0.0], [0.0, 0.0]])
    log_var = tf.constant([[0.0, np.log(4.0)], [0.0, 0.0]], tf.float32)
    # 0.5 * sum(var + mean^2 - 1 - log var): (1 + 1 - 1 - 0) + (4 + 0 - 1 - log 4)
    expected = [0.5 * (1.0 + 3.0 - np.log(4.0)), 0.0]
    np.testing.assert_allclose(kl_divergence(mean, log_var).numpy(), expected, rtol=1e-6)
    vae = build_autoencoder("vae", latent_dim=4, kl_weight=2.0)
    x = random_images(2)
    logits, extra, logs = vae.forward(x, training=False)
    m, lv = (t.numpy().astype(np.float64) for t in vae.moments(x))
    kl = 0.5 * (np.exp(lv) + m**2 - 1 - lv).sum(axis=1)
    np.testing.assert_allclose(logs["kl"].numpy(), kl, rtol=1e-4, atol=1e-6)  # float32 sums
    np.testing.assert_allclose(extra.numpy(), 2.0 * kl / 784, rtol=1e-4, atol=1e-8)  # per pixel
    # Training samples z ~ N(mean, var): different seeds, different outputs; no seed, the mean.
    a = vae.forward(x, training=True, seed=tf.constant([1, 1], tf.int64))[0]
    b = vae.forward(x, training=True, seed=tf.constant([1, 2], tf.int64))[0]
    assert not np.allclose(a.numpy(), b.numpy())
    np.testing.assert_allclose(vae.forward(x, training=True)[0].numpy(), logits.numpy(), atol=1e-6)


@pytest.mark.parametrize("name", CONV_MODELS)
def test_a_model_only_checkpoint_holds_every_weight(name, tmp_path):
    model = build_autoencoder(name)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    saved = [n for n, _ in tf.train.list_variables(path) if n.startswith("model/")]
    assert len(saved) == len(model.weights)
    clone = build_autoencoder(name)
    tf.train.Checkpoint(model=clone).restore(path).assert_consumed()
    for a, b in zip(model.weights, clone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
