"""Your own model with BatchNormalization and Dropout: the moving statistics are one value
over batch shards and replicas, the random layers' state is checkpointed (exact resume),
and the trainer finds which variables are which."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

import core
from core import distribute
from core.config import Config
from core.errors import ConfigError
from core.trainer import Trainer
from helpers import FONTDIGITS_SLICES, served
from layers.autoencoders import build_autoencoder, register

keras = tf.keras
SHAPE = (16, 16, 1)


def bn_dropout(image_shape, rate=0.25):
    """A small autoencoder with BatchNormalization (momentum 0.5, so that one step moves
    the statistics far), Dropout, and a frozen layer, whose weights no pass updates."""
    frozen = keras.layers.Conv2D(8, 1, trainable=False, name="frozen")
    encoder = keras.Sequential([
        keras.Input(image_shape),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.5, name="bn_enc"),
        keras.layers.ReLU(),
        keras.layers.Dropout(rate),
        frozen,
    ], name="bn_encoder")
    decoder = keras.Sequential([
        keras.Input((image_shape[0] // 2, image_shape[1] // 2, 8)),
        keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.5, name="bn_dec"),
        keras.layers.ReLU(),
        keras.layers.Conv2D(image_shape[2], 3, padding="same"),
    ], name="bn_decoder")
    return encoder, decoder


register("bn_dropout", bn_dropout)
# Without dropout: each part's examples alone make the same statistics wherever they run.
register("bn", lambda image_shape: bn_dropout(image_shape, rate=0.0))


def _images(n, seed):
    return tf.random.stateless_uniform((n, *SHAPE), seed=(seed, 1))


@pytest.fixture(scope="module")
def weights():
    tf.keras.utils.set_random_seed(0)
    return build_autoencoder("bn", SHAPE).get_weights()


def _statistics_after_one_step(weights, batch, replicas=1, shards=1, jit=False, name="bn",
                               accum=1):
    """The moving statistics after one training step on `batch`, per replica."""
    strategy = (tf.distribute.get_strategy() if replicas == 1 else
                distribute.make_strategy("mirrored", replicas))
    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = build_autoencoder(name, SHAPE)
        model.set_weights(weights)
        trainer = Trainer(model, strategy, int(batch.shape[0]) // accum, 1e-3, jit_compile=jit,
                          batch_shards=shards, accum_steps=accum)
    # One global batch, split over the replicas in order: replica 0 gets the first part.
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch))
    trainer.train_loop(iter(dataset), 1)
    assert [v.path.split("/", 1)[1] for v in model.running_statistics] == [
        "bn_enc/moving_mean", "bn_enc/moving_variance",
        "bn_dec/moving_mean", "bn_dec/moving_variance"]
    return [[c.numpy() for c in getattr(v.value, "values", (v.value,))]
            for v in model.running_statistics]


def test_the_trainer_finds_the_running_statistics_and_the_random_state():
    model = build_autoencoder("bn_dropout", SHAPE)
    # Not the frozen layer's weights (non-trainable, but no pass writes them), nor the
    # Dropout's seed state (an int, checkpointed instead).
    assert all("moving_" in v.path for v in model.running_statistics)
    assert len(model.running_statistics) == 4
    assert [v.dtype for v in model.random_states] == ["int64"]
    assert [v.path.split("/")[-1] for v in model.random_states] == ["seed_generator_state"]
    for name in ("seed", "resnet"):  # the built-in models keep nothing of the kind
        builtin = build_autoencoder(name, (32, 32, 3))
        assert builtin.running_statistics == [] and builtin.random_states == []


@pytest.mark.parametrize("replicas, shards, jit", [(1, 2, False), (1, 2, True), (2, 1, False),
                                                   (2, 1, True), (2, 2, False)],
                         ids=["shards", "shards-xla", "replicas", "replicas-xla",
                              "replicas-and-shards"])
def test_moving_statistics_are_the_mean_of_each_parts_update(weights, replicas, shards, jit):
    """Split over batch shards or replicas, the moving statistics end as the mean of what
    each part's examples alone would have made of them, on every replica: not one update
    after another, and not a copy per replica that drifts from the others."""
    parts = replicas * shards
    pieces = [_images(8, seed) for seed in range(parts)]
    alone = [_statistics_after_one_step(weights, piece) for piece in pieces]
    expected = [np.mean([a[i][0] for a in alone], axis=0) for i in range(4)]
    together = _statistics_after_one_step(weights, tf.concat(pieces, 0), replicas, shards, jit)
    moved = max(np.abs(e - w).max() for e, w in zip(expected, (np.zeros(8), np.ones(8)) * 2))
    assert moved > 0.1  # one step moved them (momentum 0.5)
    for want, copies in zip(expected, together):
        assert len(copies) == replicas
        for copy in copies:
            np.testing.assert_allclose(copy, want, rtol=1e-4, atol=1e-5)


def test_micro_batches_update_the_statistics_one_after_another(weights):
    """With --grad_accum_steps the micro-batches run one after another, each normalised by
    its own examples, and each updates the statistics in turn (its 2 shards' mean), as
    PyTorch's accumulation and separate steps do: momentum x (momentum x start + (1 -
    momentum) x first) + (1 - momentum) x second."""
    micro = [_images(8, 0), _images(8, 1) * 0.3]
    alone = [_statistics_after_one_step(weights, m, shards=2) for m in micro]
    start = (np.zeros(8, np.float32), np.ones(8, np.float32)) * 2
    # momentum 0.5: alone = 0.5 start + 0.5 batch statistic
    first, second = ([2 * a[i][0] - start[i] for i in range(4)] for a in alone)
    together = _statistics_after_one_step(weights, tf.concat(micro, 0), shards=2, accum=2)
    for i, (copy,) in enumerate(together):
        want = 0.5 * (0.5 * start[i] + 0.5 * first[i]) + 0.5 * second[i]
        np.testing.assert_allclose(copy, want, rtol=1e-4, atol=1e-5)
        assert np.abs(want - (0.5 * start[i] + 0.25 * (first[i] + second[i]))).max() > 1e-3


class _NestedEncoder(keras.Model):
    """The encoder of `bn`, its pass a tf.function of its own."""

    def __init__(self):
        super().__init__(name="nested_encoder")
        self.conv = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization(momentum=0.5, name="bn_enc")
        self.frozen = keras.layers.Conv2D(8, 1, trainable=False, name="frozen")
        self.encode = tf.function(self._encode)

    def _encode(self, images, training):
        return self.frozen(tf.nn.relu(self.bn(self.conv(images), training=training)))

    def call(self, images, training=False):
        return self.encode(images, training)


class _CondDecoder(keras.Model):
    """The decoder of `bn`, its BatchNormalization inside a tf.cond."""

    def __init__(self, channels):
        super().__init__(name="cond_decoder")
        self.up = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", use_bias=False)
        self.bn = keras.layers.BatchNormalization(momentum=0.5, name="bn_dec")
        self.out = keras.layers.Conv2D(channels, 3, padding="same")

    def call(self, code, training=False):
        x = self.up(code)
        x = tf.cond(tf.reduce_all(tf.math.is_finite(x)),
                    lambda: self.bn(x, training=training), lambda: tf.identity(x))
        return self.out(tf.nn.relu(x))


register("bn_nested", lambda image_shape: (_NestedEncoder(), _CondDecoder(image_shape[2])))


@pytest.mark.parametrize("replicas, shards", [(1, 2), (2, 1)], ids=["shards", "replicas"])
def test_statistics_written_in_a_nested_function_or_a_cond_are_found(weights, replicas,
                                                                     shards):
    """The trainer follows the traced pass into a tf.function of the model's own and into
    tf.cond's branches: the statistics written there are found and kept as one value."""
    model = build_autoencoder("bn_nested", SHAPE)
    assert [w.shape for w in model.get_weights()] == [w.shape for w in weights]
    pieces = [_images(8, 0), _images(8, 1) * 0.3]  # darker: other statistics
    alone = [_statistics_after_one_step(weights, p, name="bn_nested") for p in pieces]
    expected = [np.mean([a[i][0] for a in alone], axis=0) for i in range(4)]
    assert np.abs(alone[0][0][0] - alone[1][0][0]).max() > 0.05  # the parts' updates differ
    together = _statistics_after_one_step(weights, tf.concat(pieces, 0), replicas, shards,
                                          name="bn_nested")
    for want, copies in zip(expected, together):
        assert len(copies) == replicas
        for copy in copies:
            np.testing.assert_allclose(copy, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting, draws_per_step", [
    (dict(batch_shards=2), 2),
    (dict(strategy="mirrored", num_cpu_devices=2, batch_shards=1, jit_compile=True), 1),
], ids=["shards", "replicas-xla"])
def test_a_resumed_run_with_dropout_and_batchnorm_is_the_uninterrupted_run(tmp_path, setting,
                                                                           draws_per_step):
    """The Dropout's seed state is in the checkpoint, so the resumed run draws the masks the
    uninterrupted one did: the same weights and moving statistics, bit for bit."""
    config = Config(model="bn_dropout", **FONTDIGITS_SLICES, train_steps=12, epochs=None,
                    batch_size=32, eval_every=0, steps_per_loop=6, deterministic=True,
                    model_dir=str(tmp_path / "straight"), **setting)
    core.run(config)
    core.run(config.replace(model_dir=str(tmp_path / "resumed"), train_steps=6))
    core.run(config.replace(model_dir=str(tmp_path / "resumed")))
    straight, resumed = (tf.train.load_checkpoint(str(tmp_path / d / "ckpt-12"))
                         for d in ("straight", "resumed"))
    names = [n for n in straight.get_variable_to_shape_map() if n.startswith(("model/", "random/"))]
    assert any("moving_mean" in n for n in names) and any(n.startswith("random/") for n in names)
    for name in names:
        np.testing.assert_array_equal(straight.get_tensor(name), resumed.get_tensor(name), name)
    # The state moved by one draw per step and shard, whatever the replicas.
    state = [straight.get_tensor(n) for n in names if n.startswith("random/")][0]
    assert state[1] == 12 * draws_per_step
    evaluated = core.run(config.replace(mode="eval"), given={"mode", "model_dir"})
    assert 0 < evaluated["mse"] < 0.3


def test_the_export_holds_the_statistics_where_tf_serving_reads_them(tmp_path):
    """The SavedModel holds the moving statistics and the frozen layer, each weight once,
    and loaded as TF Serving loads it (a session, the graph's own restore op) it computes
    what the trained model computes in inference mode."""
    model_dir = str(tmp_path / "run")
    core.run(Config(model="bn_dropout", dataset="fontdigits", train_split="train[:256]",
                    eval_split="test[:64]", train_steps=4, epochs=None, batch_size=32,
                    eval_every=0, model_dir=model_dir))
    exported = core.run(Config(mode="export", model_dir=model_dir),
                        given={"mode", "model_dir"})["export_dir"]
    model = build_autoencoder("bn_dropout", (28, 28, 1))
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(model_dir)).expect_partial()
    moved = [v for v in model.variables if "moving_variance" in v.path]
    assert moved and not np.allclose(moved[0].numpy(), 1.0)  # trained: not the initial 1s
    x = tf.random.stateless_uniform((5, 28, 28, 1), seed=(3, 4)).numpy()
    expected = model.reconstruct(x, training=False).numpy()
    np.testing.assert_allclose(served(exported, "reconstruct", images=x)["images"], expected,
                               atol=1e-5)
    stored = dict(tf.train.list_variables(os.path.join(exported, "variables", "variables")))
    stored.pop("_CHECKPOINTABLE_OBJECT_GRAPH")
    assert sum(int(np.prod(shape)) for shape in stored.values()) == model.count_params()
    assert sum("moving_variance" in name for name in stored) == 2
    assert any("frozen" in name for name in stored)


class _StringOpBatchNorm(keras.Model):
    """BatchNormalization plus an op XLA has no kernel for."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, strides=2, padding="same")
        self.norm = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        digits = tf.strings.length(tf.strings.as_string(tf.reduce_sum(x)))
        return self.norm(self.conv(x), training=training) + tf.cast(digits, x.dtype) * 0.0


def test_xla_over_replicas_compiles_a_model_that_updates_its_statistics(tmp_path):
    """The check that XLA can compile your model traces it as a replica does: over two
    replicas, BatchNormalization's updates compile (and train), and an op XLA cannot
    compile is still found, before anything is written."""
    setting = dict(dataset="synthetic", synthetic_shape=(16, 16, 1), train_steps=2, epochs=None,
                   batch_size=16, eval_every=0, strategy="mirrored", num_cpu_devices=2,
                   jit_compile=True)
    result = core.run(Config(model="bn_dropout", model_dir=str(tmp_path / "bn"), **setting))
    assert result["step"] == 2
    register("strings_bn", lambda shape: (_StringOpBatchNorm(), keras.Sequential([
        keras.layers.Conv2DTranspose(shape[2], 3, strides=2, padding="same")])))
    with pytest.raises(ConfigError, match=r"^--jit_compile: XLA cannot compile op AsString "):
        core.run(Config(model="strings_bn", model_dir=str(tmp_path / "strings"), **setting))
    assert not (tmp_path / "strings").exists()


class _Draw(keras.layers.Layer):
    """Keeps the last number its seed generator drew, as a moving statistic would: each
    replica's draw then shows in the mean the step keeps."""

    def build(self, input_shape):
        self.seed_generator = keras.random.SeedGenerator(5)
        self.last = self.add_weight(shape=(), initializer="zeros", trainable=False, name="last")

    def call(self, x, training=None):
        if training:
            self.last.assign(keras.random.uniform((), seed=self.seed_generator))
        return x


def _draw_model(image_shape):
    encoder = keras.Sequential([keras.Input(image_shape), _Draw(name="draw"),
                                keras.layers.Conv2D(4, 3, strides=2, padding="same")])
    decoder = keras.Sequential([keras.Input((image_shape[0] // 2, image_shape[1] // 2, 4)),
                                keras.layers.Conv2DTranspose(image_shape[2], 3, strides=2,
                                                             padding="same")])
    return encoder, decoder


register("draw", _draw_model)


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_each_replica_draws_its_own_random_numbers(replicas):
    """Keras' random layers (Dropout, ...) keep a seed generator per replica, all copies
    alike: every replica would draw the same masks. Each draws its own inside the step,
    and the copies are equal again after it, as one replica's would be."""
    strategy = (tf.distribute.get_strategy() if replicas == 1 else
                distribute.make_strategy("mirrored", replicas))
    with strategy.scope():
        model = build_autoencoder("draw", SHAPE)
        trainer = Trainer(model, strategy, 4 * replicas, 1e-3)
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(_images(4 * replicas, 0)))
    trainer.train_loop(iter(dataset), 1)
    draws = [keras.random.uniform((), seed=keras.random.SeedGenerator(5 + r * 1_000_003))
             for r in range(replicas)]  # replica r's first draw
    last, state = model.running_statistics[0], model.random_states[0]
    for copy in getattr(last.value, "values", (last.value,)):
        np.testing.assert_allclose(copy.numpy(), np.mean(draws), rtol=1e-6)
    for copy in getattr(state.value, "values", (state.value,)):
        assert list(copy.numpy()) == [5, 1]
    if replicas > 1:
        assert len(set(float(d) for d in draws)) == replicas


def synchronized(image_shape):
    encoder, decoder = bn_dropout(image_shape, rate=0.0)
    return keras.Sequential([keras.Input(image_shape), keras.layers.Conv2D(8, 3, padding="same"),
                             keras.layers.BatchNormalization(synchronized=True),
                             keras.layers.MaxPooling2D()]), decoder


def test_synchronized_batchnorm_trains_over_replicas_and_xla_refuses_it_in_one_line(tmp_path):
    """Keras' BatchNormalization(synchronized=True) all-reduces its batch statistics inside
    the pass: that trains over two replicas without XLA, and with --jit_compile is one line
    before anything is written (the replica's compiled pass cannot hold a collective)."""
    register("synchronized", synchronized)
    setting = dict(model="synchronized", dataset="synthetic", synthetic_shape=(16, 16, 1),
                   train_steps=2, epochs=None, batch_size=16, eval_every=0, strategy="mirrored",
                   num_cpu_devices=2)
    assert core.run(Config(model_dir=str(tmp_path / "plain"), **setting))["step"] == 2
    with pytest.raises(ConfigError, match=re.escape(
            "--jit_compile: XLA cannot compile the all-reduce across replicas in "
            "BatchNormalization.call() of --model=synchronized: train without XLA "
            "(--nojit_compile), or replace the op")):
        core.run(Config(model_dir=str(tmp_path / "xla"), jit_compile=True, **setting))
    assert not (tmp_path / "xla").exists()


class _Noise(keras.layers.Layer):
    """Training noise drawn with TensorFlow's stateful op, or with keras.random and a
    SeedGenerator."""

    def __init__(self, stateful):
        super().__init__()
        self.stateful = stateful
        self.seed = keras.random.SeedGenerator(7)

    def call(self, x, training=False):
        if not training:
            return x
        if self.stateful:
            return x + 0.1 * tf.random.normal(tf.shape(x))
        return x + 0.1 * keras.random.normal(tf.shape(x), seed=self.seed)


def _noisy(image_shape, stateful):
    encoder = keras.Sequential([keras.Input(image_shape), _Noise(stateful),
                                keras.layers.Conv2D(8, 3, strides=2, padding="same")])
    decoder = keras.Sequential([
        keras.Input((image_shape[0] // 2, image_shape[1] // 2, 8)),
        keras.layers.Conv2DTranspose(image_shape[2], 3, strides=2, padding="same")])
    return encoder, decoder


register("noisy_tf", lambda image_shape: _noisy(image_shape, stateful=True))
register("noisy_keras", lambda image_shape: _noisy(image_shape, stateful=False))


def test_stateful_random_ops_are_warned_of_as_not_resumable(tmp_path, caplog):
    """tf.random.normal keeps its state in the kernel, where no checkpoint reaches: a run is
    warned that its resume will not repeat the draws; keras.random with a SeedGenerator is
    checkpointed (random/) and is not warned of."""
    assert build_autoencoder("noisy_tf", SHAPE).stateful_random_ops == ("RandomStandardNormal",)
    assert build_autoencoder("noisy_keras", SHAPE).stateful_random_ops == ()
    warned = {}
    for name in ("noisy_tf", "noisy_keras"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="absl"):
            core.run(Config(model=name, **FONTDIGITS_SLICES, train_steps=2, epochs=None,
                            batch_size=16, mode="train", model_dir=str(tmp_path / name)))
        warned[name] = [r.getMessage() for r in caplog.records
                        if "stateful random ops" in r.getMessage()]
    assert len(warned["noisy_tf"]) == 1 and "(RandomStandardNormal:" in warned["noisy_tf"][0]
    assert "keras.random.SeedGenerator" in warned["noisy_tf"][0]
    assert warned["noisy_keras"] == []
