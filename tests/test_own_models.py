"""Your own model (`--model=MODULE:FACTORY`, `register`) and the losses (`--loss`)."""

import gc
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import core
from core import distribute, losses
from core.config import Config
from core.errors import CheckpointError, ConfigError
from core.trainer import Trainer
from helpers import FONTDIGITS_SLICES, ROOT, event_tags, run_train, served
from layers.autoencoders import build_autoencoder, register

keras = tf.keras


def readme_example() -> str:
    """The `# my_models.py` block of the README's "Your own model"."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"```python\n(# my_models\.py\n.*?)```", readme, re.S)
    assert found, "README.md lost its my_models.py example"
    return found.group(1)


def test_the_readme_example_trains_exports_and_loads_in_plain_tensorflow(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_models.py").write_text(readme_example())
    model_dir = work / "run"
    # As a user runs it: train.py from another folder, the module in the working directory.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--model=my_models:make",
         "--dataset=fontdigits", f"--model_dir={model_dir}", "--train_steps=20",
         "--batch_size=32", "--eval_every=20", "--log_every=10", "--loss=l1+ssim",
         "--loss_weights=0.16,0.84"], cwd=work, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model my_models:make" in proc.stderr and "code (7, 7, 8)" in proc.stderr
    assert {"ckpt-20.index", "reconstructions.png", "curves.png"} <= set(os.listdir(model_dir))
    # Eval and export in-process: the module comes from the working directory again.
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(work))])
    evaluated = core.run(Config(mode="eval", model_dir=str(model_dir), batch_size=32),
                         given={"mode", "model_dir", "batch_size"})
    assert evaluated["step"] == 20
    assert evaluated["loss"] == pytest.approx(
        0.16 * evaluated_l1(model_dir) + 0.84 * (1 - evaluated["ssim"]), rel=1e-4)
    exported = core.run(Config(mode="export", model_dir=str(model_dir)),
                        given={"mode", "model_dir"})
    loaded = tf.saved_model.load(exported["export_dir"])  # plain TensorFlow, no tapeloop
    images = np.random.default_rng(0).random((3, 28, 28, 1)).astype(np.float32)
    code = loaded.signatures["encode"](images=images)["code"]
    assert code.shape == (3, 7, 7, 8)
    out = loaded.signatures["decode"](code=code)["images"]
    assert out.shape == (3, 28, 28, 1) and 0 <= float(tf.reduce_min(out)) <= 1
    np.testing.assert_allclose(served(exported["export_dir"], "decode", code=code.numpy())["images"],
                               out.numpy(), atol=1e-6)  # as TF Serving runs it


def evaluated_l1(model_dir) -> float:
    """The mean L1 of the run's model on its eval split, computed here from the export-free
    checkpoint: restores the encoder and decoder into a fresh model of the same factory."""
    from core import data

    import my_models  # noqa: F401 - on the path: the test chdir'ed into its folder

    model = build_autoencoder("my_models:make", (28, 28, 1))
    ckpt = tf.train.Checkpoint(model=model)
    ckpt.restore(tf.train.latest_checkpoint(str(model_dir))).expect_partial()
    opened = data.open_split("test", dataset="fontdigits")
    images = data.to_float(opened.source.images).numpy()
    total = 0.0
    for i in range(0, len(images), 500):
        x = images[i:i + 500]
        total += float(tf.reduce_sum(tf.abs(x - model.reconstruct(x))))
    return total / images.size


# ------------------------------------------------------- register + core.run
class SubEncoder(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")
        self.flat = keras.layers.Flatten()
        self.dense = keras.layers.Dense(10)

    def call(self, images):
        return self.dense(self.flat(self.conv(images)))  # a flat code, (N, 10)


class SubDecoder(keras.Model):
    def __init__(self, shape):
        super().__init__()
        self.shape_ = shape
        self.dense = keras.layers.Dense(shape[0] * shape[1] * shape[2])

    def call(self, code):
        return tf.reshape(self.dense(code), (-1, *self.shape_))


def functional(image_shape):
    images = keras.Input(image_shape)
    code = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(images)
    encoder = keras.Model(images, code, name="f_encoder")
    codes = keras.Input(code.shape[1:])
    logits = keras.layers.Conv2DTranspose(image_shape[2], 3, strides=2, padding="same")(codes)
    return encoder, keras.Model(codes, logits, name="f_decoder")


@pytest.mark.parametrize("name, code_shape, setting", [
    ("sub", (10,), dict(strategy="mirrored", num_cpu_devices=2, jit_compile=True,
                        precision="mixed_bfloat16")),
    ("functional", (14, 14, 4), dict(strategy="default", precision="mixed_float16",
                                     loss="mse+charbonnier", loss_weights=(1.0, 0.5))),
], ids=["subclassed-mirrored-xla-bf16", "functional-fp16-mse+charbonnier"])
def test_registered_models_train_resume_and_evaluate(tmp_path, name, code_shape, setting):
    register("sub", lambda shape: (SubEncoder(), SubDecoder(shape)))
    register("functional", functional)
    config = Config(model=name, **FONTDIGITS_SLICES, model_dir=str(tmp_path / name),
                    train_steps=10, epochs=None, batch_size=32, eval_every=10, log_every=5,
                    steps_per_loop=5, **setting)
    first = core.run(config)
    assert first["step"] == 10 and np.isfinite([h["loss"] for h in first["history"]]).all()
    resumed = core.run(config.replace(train_steps=15, mode="train"))
    assert resumed["step"] == 15 and [h["step"] for h in resumed["history"]] == [15]
    evaluated = core.run(config.replace(mode="eval"), given={"mode", "model_dir"})
    assert evaluated["step"] == 15 and 0 < evaluated["mse"] < 0.3
    tags = event_tags(str(tmp_path / name / "eval"))
    assert {"loss", "bce", "mse", "psnr", "ssim"} <= set(tags)
    if "loss_weights" in setting:  # eval's loss is the training loss, from config.json
        assert evaluated["loss"] > evaluated["mse"]
    model = build_autoencoder(name, (28, 28, 1))
    assert model.encode(tf.zeros((2, 28, 28, 1))).shape == (2, *code_shape)
    if name == "functional":  # a process that never registered it: one line, nothing written
        before = sorted(os.listdir(tmp_path / name))
        proc = run_train("--mode=export", f"--model_dir={tmp_path / name}")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            "train.py: error: the run was trained with --model='functional', a factory "
            "registered from Python (layers.autoencoders.register), which this process has "
            "not registered: call register('functional', factory) before core.run, or train "
            "with --model=MODULE:FACTORY, which eval and export import again")
        assert sorted(os.listdir(tmp_path / name)) == before


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "float32"])
def test_own_model_in_bfloat16_on_a_cpu_is_warned_of_bias_gradients(tmp_path, caplog, precision):
    """Your own layers stay as written, and TensorFlow's CPU kernel sums an unfused bias's
    gradient in bfloat16: a bfloat16 run without XLA on a CPU says so; float32 does not."""
    register("functional", functional)
    config = Config(model="functional", **FONTDIGITS_SLICES, model_dir=str(tmp_path / "run"),
                    train_steps=2, epochs=None, batch_size=32, precision=precision)
    with caplog.at_level("WARNING", logger="absl"):
        assert core.run(config)["step"] == 2
    warned = [r.getMessage() for r in caplog.records if "sums the gradient of a bias" in r.getMessage()]
    assert len(warned) == (precision == "mixed_bfloat16")


class OneModel(keras.Model):
    def call(self, x):
        return x


def _factory_module(tmp_path, monkeypatch, body: str) -> None:
    (tmp_path / "bad_models.py").write_text("import tensorflow as tf\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_models", None)


@pytest.mark.parametrize("body, model, message", [
    ("", "missing_module:make", "--model=missing_module:make: importing missing_module failed "
                                "(ModuleNotFoundError"),
    ("import nonexistent_dependency\n", "bad_models:make",
     "importing bad_models failed (ModuleNotFoundError: No module named "
     "'nonexistent_dependency')"),
    ("", "bad_models:make", "bad_models has no callable 'make'"),
    ("def make(shape):\n    raise ValueError('too small')\n", "bad_models:make",
     "bad_models:make(image_shape=(28, 28, 1)) raised ValueError: too small"),
    ("def make(shape):\n    return tf.keras.Sequential([tf.keras.layers.Dense(1)])\n",
     "bad_models:make", "returned Sequential: return (encoder, decoder), two tf.keras.Model"),
    ("def make(shape):\n    return tf.keras.layers.Dense(1), tf.keras.layers.Dense(1)\n",
     "bad_models:make", "returned (Dense, Dense): return (encoder, decoder)"),
    ("def make(shape):\n    d = tf.keras.layers.Conv2D(3, 3, strides=2)\n"
     "    u = tf.keras.layers.Conv2DTranspose(1, 3, strides=2)\n"
     "    return tf.keras.Sequential([d]), tf.keras.Sequential([u], name='up')\n", "bad_models:make",
     "the decoder 'up' returns shape (None, 27, 27, 1), the images are "
     "(None, 28, 28, 1): its output must be logits of the image's shape"),
    ("def make(shape):\n"  # Keras' tutorial decoder ends in a sigmoid
     "    d = tf.keras.Sequential([tf.keras.layers.Conv2D(4, 3, strides=2, padding='same')])\n"
     "    u = tf.keras.layers.Conv2DTranspose(1, 3, strides=2, padding='same', "
     "activation='sigmoid')\n"
     "    return d, tf.keras.Sequential([u], name='up')\n", "bad_models:make",
     "the decoder 'up' returns only values >= 0 (0."),
    ("class E(tf.keras.Model):\n"  # runs eagerly; the step's graph has no AutoGraph
     "    def __init__(self):\n        super().__init__()\n"
     "        self.c = tf.keras.layers.Conv2D(4, 3, strides=2, padding='same')\n"
     "    def call(self, x):\n        y = self.c(x)\n"
     "        return y * 2.0 if tf.reduce_mean(x) > 0.5 else y\n"
     "def make(shape):\n    return E(), tf.keras.Sequential(\n"
     "        [tf.keras.layers.Conv2DTranspose(1, 3, strides=2, padding='same')])\n",
     "bad_models:make", "fails when traced into the training step's graph "
     "(OperatorNotAllowedInGraphError in E.call(): Using a symbolic `tf.Tensor` as a Python "
     "`bool` is not allowed): use TensorFlow ops on tensors in call()"),
    ("class E(tf.keras.Model):\n"  # its activity regularizer's loss stays in call's graph
     "    def __init__(self):\n        super().__init__()\n"
     "        self.c = tf.keras.layers.Conv2D(4, 3, strides=2, padding='same',\n"
     "            activity_regularizer=tf.keras.regularizers.L1(1e-3))\n"
     "    @tf.function\n    def call(self, x):\n        return self.c(x)\n"
     "def make(shape):\n    return E(), tf.keras.Sequential(\n"
     "        [tf.keras.layers.Conv2DTranspose(1, 3, strides=2, padding='same')])\n",
     "bad_models:make", "a loss of a layer (an activity_regularizer or add_loss) is made inside "
     "a tf.function of the model's own and cannot reach the training step's loss"),
    ("class E(tf.keras.Model):\n"  # as a SavedModel's signature (TFSMLayer) returns
     "    def __init__(self):\n        super().__init__(name='enc')\n"
     "        self.c = tf.keras.layers.Conv2D(4, 3, strides=2, padding='same')\n"
     "    def call(self, x):\n        return {'code': self.c(x)}\n"
     "def make(shape):\n    return E(), tf.keras.Sequential(\n"
     "        [tf.keras.layers.Conv2DTranspose(1, 3, strides=2, padding='same')])\n",
     "bad_models:make", "the encoder 'enc' returned dict with keys 'code': return one of them, "
     "e.g. outputs['code']; it must return one tensor, the code"),
], ids=["no-module", "import-fails", "no-factory", "factory-raises", "one-model", "layers",
        "wrong-shape", "sigmoid-output", "python-if", "loss-in-own-function", "dict-code"])
def test_a_bad_factory_is_one_line_before_anything_is_written(tmp_path, monkeypatch, body, model,
                                                              message):
    _factory_module(tmp_path, monkeypatch, body)
    model_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        core.run(Config(model=model, dataset="fontdigits", model_dir=str(model_dir),
                        train_steps=1, epochs=None))
    assert "\n" not in str(raised.value)
    assert not model_dir.exists()


def test_a_model_module_edited_since_its_checkpoint_is_named_on_resume_and_eval(tmp_path,
                                                                                 monkeypatch,
                                                                                 caplog):
    """The flags match config.json, so the code differs: it said "give the flags it was
    trained with, or another --checkpoint", neither of which helps (nor is --checkpoint a
    training flag)."""
    factory = ("def make(shape):\n    return (tf.keras.Sequential([tf.keras.layers.Conv2D(\n"
               "        {}, 3, strides=2, padding='same')], name='enc'), tf.keras.Sequential(\n"
               "        [tf.keras.layers.Conv2DTranspose(1, 3, strides=2, padding='same')]))\n")
    model_dir = tmp_path / "run"
    config = Config(model="bad_models:make", dataset="fontdigits", model_dir=str(model_dir),
                    train_steps=2, batch_size=8)
    _factory_module(tmp_path, monkeypatch, factory.format(4))
    core.run(config)
    before = {n: (model_dir / n).read_bytes() for n in os.listdir(model_dir) if "ckpt-" in n}
    _factory_module(tmp_path, monkeypatch, factory.format(6))  # the user edits the module
    with pytest.raises(CheckpointError, match=re.escape(
            "its config.json matches these flags, so the code that builds the model differs "
            "from the code that saved it (your --model module, edited?): resume with that "
            "code, or use a fresh --model_dir for this one")), caplog.at_level("WARNING"):
        core.run(config.replace(train_steps=4))
    gc.collect()  # nor, after the one line, TensorFlow's for each value left unrestored
    assert not [r for r in caplog.records if r.name == "tensorflow"], caplog.text[-2000:]
    with pytest.raises(CheckpointError, match=re.escape(
            "the code that builds the model differs from the code that saved it (your --model "
            "module, edited?), or the checkpoint is another run's")):
        core.run(Config(mode="eval", model_dir=str(model_dir)), given={"mode", "model_dir"})
    assert {n: (model_dir / n).read_bytes() for n in os.listdir(model_dir) if "ckpt-" in n} == before


def test_filter_flags_are_refused_with_your_own_model():
    with pytest.raises(ConfigError, match="--encoder_filters configures the built-in models"):
        Config(model="my_models:make", encoder_filters=(8, 4))


# -------------------------------------------------------------------- losses
def test_each_loss_is_its_formula_and_zero_or_least_at_a_perfect_reconstruction():
    rng = np.random.default_rng(0)
    targets = rng.random((4, 16, 16, 3)).astype(np.float32)
    logits = rng.normal(size=targets.shape).astype(np.float32)
    images = tf.sigmoid(logits).numpy()
    d = targets - images
    expected = {
        "bce": np.mean(np.maximum(logits, 0) - logits * targets
                       + np.log1p(np.exp(-np.abs(logits))), axis=(1, 2, 3)),
        "mse": np.mean(d**2, axis=(1, 2, 3)),
        "l1": np.mean(np.abs(d), axis=(1, 2, 3)),
        "charbonnier": np.mean(np.sqrt(d**2 + 1e-6), axis=(1, 2, 3)),
        "ssim": 1 - tf.image.ssim(targets, images, 1.0, filter_size=11).numpy(),
    }
    for name, value in expected.items():
        got = losses.build(name).per_example(targets, logits).numpy()
        np.testing.assert_allclose(got, value, rtol=2e-5, atol=1e-6, err_msg=name)
    perfect = np.log(targets / (1 - targets + 1e-7) + 1e-7)  # sigmoid(perfect) ~ targets
    for name in ("mse", "l1", "ssim"):
        assert float(np.max(losses.build(name).per_example(targets, perfect))) < 1e-3, name
    combined = losses.build("l1+ssim", (0.16, 0.84)).per_example(targets, logits).numpy()
    np.testing.assert_allclose(combined, 0.16 * expected["l1"] + 0.84 * expected["ssim"],
                               rtol=1e-5)


def _reference(name, targets, logits):
    """Each loss per example, written independently; BCE as softplus(x) - x z, smooth at
    x = 0, where relu(x) - x z + log1p(exp(-|x|)) has a kink that the tape differentiates
    as -z instead of sigmoid(0) - z (a dead ReLU before the logits gives exact zeros)."""
    if name == "bce":
        return tf.reduce_mean(tf.math.softplus(logits) - logits * targets, axis=[1, 2, 3])
    return losses.LOSSES[name]().per_example(targets, logits)


@pytest.mark.parametrize("spec, weights", [("bce", None), ("ssim", None),
                                           ("bce+l1+ssim", (1.0, 0.3, 2.0))])
@pytest.mark.parametrize("model", ["seed", "vae"])
def test_the_step_gradient_is_the_tape_gradient_of_the_whole_loss(spec, weights, model):
    """Hand-written (BCE) and taped terms mixed: the trainer's gradients equal the tape's
    gradient of mean(loss per example + the model's extra term)."""
    x = np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32)
    net = build_autoencoder(model)
    loss = losses.build(spec, weights)
    trainer = Trainer(net, tf.distribute.get_strategy(), 8, 1e-3, eager=True, loss=loss)
    seed = tf.constant([3, 4], tf.int64)
    value, grads = trainer.forward_backward(x, x, seed)
    with tf.GradientTape() as tape:
        logits, extra, _ = net.forward(x, training=True, seed=seed)
        expected = tf.reduce_mean(tf.add_n([w * _reference(term.name, x, logits)
                                            for w, term in loss.terms]) + extra)
    expected_grads = tape.gradient(expected, net.trainable_variables)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7)


def regularized(image_shape):
    """The Keras blog's sparse autoencoder, as convolutions: an L1 activity regularizer on
    the code, and L2 on a kernel."""
    encoder = keras.Sequential([
        keras.Input(image_shape),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu",
                            kernel_regularizer=keras.regularizers.L2(0.01)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu",
                            activity_regularizer=keras.regularizers.L1(0.05)),
    ])
    decoder = keras.Sequential([
        keras.Input((image_shape[0] // 2, image_shape[1] // 2, 4)),
        keras.layers.Conv2DTranspose(image_shape[2], 3, strides=2, padding="same")])
    return encoder, decoder


@pytest.mark.parametrize("replicas, shards", [(1, 1), (1, 2), (2, 2)])
def test_keras_regularizers_are_in_the_step_and_in_the_evaluated_loss(replicas, shards):
    """Your model's `model.losses` (weight and activity regularizers, add_loss) enter the
    step as in Keras' fit: the loss is mean BCE + their sum, the gradients the tape's of
    that, whether the batch is split into shards and replicas or not, and eval's `loss`
    includes them too. (They were left out: a sparse autoencoder trained without its
    sparsity.)"""
    register("regularized", regularized)
    x = np.random.default_rng(2).random((8, 16, 16, 1)).astype(np.float32)
    tf.keras.utils.set_random_seed(0)
    reference_net = build_autoencoder("regularized", (16, 16, 1))
    with tf.GradientTape() as tape:
        logits = reference_net(x, training=True)
        bce = tf.reduce_mean(_reference("bce", x, logits))
        keras_losses = tf.add_n(reference_net.losses)
        expected = bce + keras_losses
    expected_grads = tape.gradient(expected, reference_net.trainable_variables)
    assert len(reference_net.losses) == 2 and float(keras_losses) > 0.1 * float(bce)

    strategy = tf.distribute.get_strategy() if replicas == 1 else \
        distribute.make_strategy("mirrored", replicas)
    with strategy.scope():
        net = build_autoencoder("regularized", (16, 16, 1))
        net.set_weights(reference_net.get_weights())
        trainer = Trainer(net, strategy, 8, 1e-3, batch_shards=shards)

    @tf.function
    def step(images):
        def replica(batch):
            loss, grads = trainer.replica_forward_backward(batch, tf.zeros([3, 2], tf.int64))
            context = tf.distribute.get_replica_context()
            return context.all_reduce("sum", loss), context.all_reduce("sum", grads)
        return strategy.run(replica, args=(images,))

    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
    loss, grads = step(next(iter(dataset)))
    loss, grads = strategy.experimental_local_results((loss, grads))[0]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
    sums = trainer.eval_step(x, x, tf.ones(8))
    assert float(sums["loss"] / sums["count"]) == pytest.approx(
        float(tf.reduce_mean(_reference("bce", x, reference_net(x))) + tf.add_n(reference_net.losses)),
        rel=1e-5)


def with_a_spare_layer(image_shape):
    """An encoder that builds a layer it never calls (a leftover of an edit)."""
    class Encoder(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")
            self.spare = keras.layers.Dense(3, name="spare")
            self.spare.build((None, 5))

        def call(self, x):
            return self.conv(x)

    decoder = keras.Sequential([keras.Input((image_shape[0] // 2, image_shape[1] // 2, 4)),
                                keras.layers.Conv2DTranspose(image_shape[2], 3, strides=2,
                                                             padding="same")])
    return Encoder(), decoder


@pytest.mark.parametrize("replicas, clip", [(1, None), (2, None), (2, 0.01)])
def test_weights_the_loss_does_not_depend_on_are_left_alone_and_named(replicas, clip, caplog):
    """A layer built but never called has no gradient: the step trains the rest, measures
    and clips the gradient it has (the all-reduce takes no None), and warns once."""
    register("with_a_spare_layer", with_a_spare_layer)
    strategy = tf.distribute.get_strategy() if replicas == 1 else \
        distribute.make_strategy("mirrored", replicas)
    with strategy.scope():
        net = build_autoencoder("with_a_spare_layer", (16, 16, 1))
        trainer = Trainer(net, strategy, 8, 1e-2, clip_norm=clip)
    before = {v.path: v.numpy() for v in net.trainable_variables}
    x = np.random.default_rng(2).random((8, 16, 16, 1)).astype(np.float32)
    dataset = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x).repeat())
    with caplog.at_level("WARNING"):
        assert np.isfinite(trainer.train_loop(iter(dataset), 2))
    after = {v.path: v.numpy() for v in net.trainable_variables}
    spare = {path for path in before if path.startswith("spare/")}
    assert spare == {"spare/kernel", "spare/bias"}
    for path in before:
        assert np.array_equal(before[path], after[path]) == (path in spare), path
    warnings = [r.getMessage() for r in caplog.records if "does not depend on" in r.getMessage()]
    assert warnings == ["the loss does not depend on spare/kernel, spare/bias: they are not "
                        "trained (a layer your model builds but never calls?)"]
    assert trainer.last_grad_norms[1] == 2 and trainer.last_grad_norms[0] > 0


@pytest.mark.parametrize("changes, message", [
    (dict(loss="l2"), "--loss=l2: 'l2' is unknown"),
    (dict(loss="l1+ssim", loss_weights=(1.0,)), "gives 1 weight(s) for the 2 loss(es)"),
    (dict(loss="l1+l1"), "names a loss twice"),
    (dict(loss="l1", loss_weights=(-1.0,)), "every weight must be positive and finite"),
])
def test_bad_loss_flags(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**changes)


def test_ssim_refuses_images_smaller_than_its_window(tmp_path):
    model_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(
            "--loss=ssim needs images of at least 11x11 (SSIM's window); these are 8x8")):
        core.run(Config(loss="ssim", dataset="synthetic", synthetic_shape=(8, 8, 1),
                        model_dir=str(model_dir), train_steps=1, epochs=None, batch_size=8))
    assert not model_dir.exists()


class StringOpEncoder(keras.Model):
    """A code that also depends on tf.strings: an op XLA has no kernel for."""

    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(4, 3, strides=2, padding="same")

    def call(self, x):
        digits = tf.strings.length(tf.strings.as_string(tf.reduce_sum(x)))
        return self.conv(x) + 0.0 * tf.cast(digits, x.dtype)


def test_an_op_xla_cannot_compile_is_found_before_the_first_step(tmp_path, monkeypatch, caplog):
    """Asked for, XLA's refusal is one line naming the op and the model's line, before
    anything is written; by default on a GPU machine (XLA on), the run trains without XLA
    and says why."""
    register("strings", lambda shape: (StringOpEncoder(), keras.Sequential([
        keras.layers.Conv2DTranspose(shape[2], 3, strides=2, padding="same")])))
    config = Config(model="strings", dataset="synthetic", synthetic_shape=(8, 8, 1),
                    model_dir=str(tmp_path / "run"), train_steps=2, epochs=None, batch_size=8,
                    jit_compile=True)
    with pytest.raises(ConfigError, match=r"^--jit_compile: XLA cannot compile op AsString "
                       r"\(test_own_models.py line \d+\) of --model=strings: train without XLA "
                       r"\(--nojit_compile\), or replace the op$"):
        core.run(config)
    assert not (tmp_path / "run").exists()
    # The GPU default: a machine with a GPU turns XLA on (distribute.default_jit_compile).
    from core import distribute
    monkeypatch.setattr(distribute, "default_jit_compile", lambda: True)
    with caplog.at_level("WARNING", logger="absl"):
        result = core.run(config.replace(jit_compile=None))
    assert result["step"] == 2
    assert any("XLA (on by default with a GPU) cannot compile op AsString" in r.getMessage()
               for r in caplog.records)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resolved_jit_compile"] is False
    assert distribute.xla_refusal(build_autoencoder("resnet", (32, 32, 3)), (32, 32, 3)) is None


# ----------------------------------------------------------------- your own loss
def readme_loss() -> str:
    """The `# my_losses.py` block of the README's "Your own loss"."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    found = re.search(r"```python\n(# my_losses\.py\n.*?)```", readme, re.S)
    assert found, "README.md lost its my_losses.py example"
    return found.group(1)


def test_the_readme_loss_trains_evaluates_as_its_formula_and_exports_without_it(
        tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_losses.py").write_text(readme_loss())
    model_dir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--dataset=fontdigits",
         "--loss=l1+my_losses:edges", "--loss_weights=1,0.5", f"--model_dir={model_dir}",
         "--train_steps=20", "--batch_size=32", "--eval_every=20"], cwd=work, env=env,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss L1 + 0.5 edges" in proc.stderr
    # Eval imports it again, and reports the training loss: L1 + 0.5 edges, per example.
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(work))])
    evaluated = core.run(Config(mode="eval", model_dir=str(model_dir)),
                         given={"mode", "model_dir"})
    import my_losses  # noqa: E402 - on the path now: the test chdir'ed into its folder
    from core import data

    model = build_autoencoder("seed")
    tf.train.Checkpoint(model=model).restore(
        tf.train.latest_checkpoint(str(model_dir))).expect_partial()
    images = data.to_float(data.open_split("test", "fontdigits").source.images)
    out = model.reconstruct(images)
    expected = tf.reduce_mean(tf.reduce_mean(tf.abs(images - out), axis=[1, 2, 3])
                              + 0.5 * my_losses.edges(images, out))
    assert evaluated["loss"] == pytest.approx(float(expected), rel=1e-4)
    # Export computes no loss: it runs where the module is not.
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_losses")
    exported = core.run(Config(mode="export", model_dir=str(model_dir)),
                        given={"mode", "model_dir"})
    assert os.path.exists(os.path.join(exported["export_dir"], "saved_model.pb"))


@pytest.mark.parametrize("body, loss, message", [
    ("", "missing_losses:f", "--loss=missing_losses:f: importing missing_losses failed "
                             "(ModuleNotFoundError"),
    ("", "bad_losses:f", "bad_losses has no callable 'f': define f(targets, images) -> one "
                         "loss per example, shape (N,)"),
    ("def f(t, x):\n    raise ValueError('no')\n", "bad_losses:f",
     "bad_losses:f(targets, images) raised ValueError on a batch of 2 images of shape "
     "(28, 28, 1): no"),
    ("def f(t, x):\n    return tf.abs(t - x)\n", "bad_losses:f",
     "returned shape (2, 28, 28, 1) for a batch of 2: return one value per example"),
    ("def f(t, x):\n    return tf.reduce_mean(tf.math.log(t - t), axis=[1, 2, 3])\n",
     "bad_losses:f", "on random images: it must be finite"),
    ("def f(t, x):\n    return tf.constant((t.numpy() - x.numpy()).mean(axis=(1, 2, 3)))\n",
     "l1+bad_losses:f", "its value has no gradient with respect to the images"),
    ("def f(t, x):\n    m = tf.reduce_mean(tf.abs(t - x), axis=[1, 2, 3])\n"
     "    return m if tf.reduce_mean(x) > 0 else 2 * m\n", "bad_losses:f",
     "fails when traced into the training step's graph (OperatorNotAllowedInGraphError: Using a "
     "symbolic `tf.Tensor` as a Python `bool` is not allowed): use TensorFlow ops on tensors"),
], ids=["no-module", "no-function", "raises", "per-pixel", "not-finite", "numpy", "python-if"])
def test_a_bad_loss_function_is_one_line_before_anything_is_written(tmp_path, monkeypatch, body,
                                                                    loss, message):
    (tmp_path / "bad_losses.py").write_text("import tensorflow as tf\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_losses", None)
    model_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        core.run(Config(loss=loss, dataset="fontdigits", model_dir=str(model_dir),
                        train_steps=1, epochs=None))
    assert "\n" not in str(raised.value)
    assert not model_dir.exists()


def test_a_long_error_from_a_loss_is_cut_at_a_word_and_says_so(tmp_path, monkeypatch):
    """The one-line error quotes the first line of the user's exception; one longer than
    200 characters ends with "..." at a word, never mid-word or with its second line."""
    (tmp_path / "long_losses.py").write_text(
        "def f(t, x):\n    raise ValueError('the images must be ' + 'very ' * 60 + "
        "'bright\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as raised:
        core.run(Config(loss="long_losses:f", dataset="fontdigits",
                        model_dir=str(tmp_path / "run"), train_steps=1, epochs=None))
    text = str(raised.value)
    assert re.search(r"raised ValueError on a batch of 2 images of shape \(28, 28, 1\): the "
                     r"images must be (very )+very\.\.\.$", text), text
    quoted = text.split("(28, 28, 1): ")[1]
    assert 150 < len(quoted) <= 200
    assert "\n" not in text and "bright" not in text
    assert not (tmp_path / "run").exists()


def test_a_long_trace_error_is_cut_at_a_word_and_says_so():
    """What a model's call() raised while traced, as the one-line error quotes it: Keras'
    wrapper line dropped, the first sentence kept, a long one cut at a word with '...'."""
    from layers.autoencoders import describe_trace_error

    wrapped = ValueError("Exception encountered when calling Enc.call().\n\n"
                         + "the code " * 30 + "is wrong. Try this instead.")
    text = describe_trace_error(wrapped)
    assert re.fullmatch(r"ValueError in Enc\.call\(\): (the code )+(the|the code)\.\.\.", text), text
    assert len(text) < 200 and "wrong" not in text
    assert describe_trace_error(ValueError("short. Advice.")) == "ValueError: short"


def test_a_loss_op_xla_cannot_compile_is_found_before_the_first_step(tmp_path, monkeypatch):
    (tmp_path / "string_losses.py").write_text(
        "import tensorflow as tf\n\n\ndef f(t, x):\n"
        "    n = tf.strings.length(tf.strings.as_string(tf.reduce_sum(x)))\n"
        "    return tf.reduce_mean(tf.abs(t - x), axis=[1, 2, 3]) + 0.0 * tf.cast(n, x.dtype)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^--jit_compile: XLA cannot compile op AsString "
                       r"\(string_losses.py line 5\) of --loss=string_losses:f: train without "
                       r"XLA"):
        core.run(Config(loss="string_losses:f", dataset="synthetic", synthetic_shape=(8, 8, 1),
                        model_dir=str(tmp_path / "run"), train_steps=2, epochs=None,
                        batch_size=8, jit_compile=True))
    assert not (tmp_path / "run").exists()
