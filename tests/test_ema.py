"""--ema_decay: the average's recurrence (1 and 2 replicas), checkpointed and resumed,
used by eval, figures and export (and not with --ema=false)."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

import core
from core import data, distribute
from core.checkpoints import Checkpointer
from core.config import Config
from core.errors import ConfigError
from core.trainer import Trainer
from helpers import event_tags, served
from layers.autoencoders import build_autoencoder


@pytest.mark.parametrize("replicas", [1, 2])
def test_the_average_follows_its_recurrence(replicas, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
    strategy = (distribute.make_strategy("mirrored", replicas) if replicas > 1
                else tf.distribute.get_strategy())
    with strategy.scope():
        model = build_autoencoder("seed")
        trainer = Trainer(model, strategy, 32, 1e-2, ema_decay=0.8)
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(images, 32, 0, 0, ctx)))
    expected = [v.numpy() for v in model.trainable_variables]
    for _ in range(4):
        trainer.train_loop(iterator, 1)
        expected = [0.8 * e + 0.2 * v.numpy() for e, v in zip(expected, model.trainable_variables)]
    for average, e in zip(trainer.ema, expected):
        np.testing.assert_allclose(average.numpy(), e, rtol=1e-5, atol=1e-7)
    assert not np.allclose(trainer.ema[0].numpy(), model.trainable_variables[0].numpy())
    # Checkpointed, and restored exactly into a fresh trainer.
    Checkpointer(str(tmp_path), trainer).save()
    with strategy.scope():
        fresh = Trainer(build_autoencoder("seed"), strategy, 32, 1e-2, ema_decay=0.8)
    assert Checkpointer(str(tmp_path), fresh).restore() == 4
    for a, b in zip(fresh.ema, trainer.ema):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    raw = [v.numpy() for v in model.trainable_variables]
    with trainer.ema_weights():  # what eval, figures and export see
        for v, e in zip(model.trainable_variables, expected):
            np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-7)
    for v, r in zip(model.trainable_variables, raw):
        np.testing.assert_array_equal(v.numpy(), r)


def test_eval_and_export_use_the_average_unless_told_not_to(tmp_path, caplog):
    model_dir = str(tmp_path / "run")
    config = Config(dataset="fontdigits", train_split="train[:640]", eval_split="test[:128]",
                    model_dir=model_dir, train_steps=20, epochs=None, batch_size=32,
                    eval_every=20, log_every=10, learning_rate=1e-2, ema_decay=0.9)
    trained = core.run(config)
    assert trained["step"] == 20
    with_ema = core.run(Config(mode="eval", model_dir=model_dir), given={"mode", "model_dir"})
    exported = core.run(Config(mode="export", model_dir=model_dir), given={"mode", "model_dir"})
    with caplog.at_level("INFO", logger="absl"):
        raw = core.run(Config(mode="eval", model_dir=model_dir, ema=False),
                       given={"mode", "model_dir", "ema"})
    assert "eval (raw weights) | step 20 |" in caplog.text  # which weights, as for the average
    assert with_ema["bce"] != pytest.approx(raw["bce"], rel=1e-4)
    # The raw weights' results go apart: the run's results, curve and export stay the
    # average's (they were replaced, and eval/ held two values at step 20).
    saved = json.load(open(os.path.join(model_dir, "eval_results.json")))
    assert saved["bce"] == with_ema["bce"]
    apart = json.load(open(os.path.join(model_dir, "eval_noema", "eval_results.json")))
    assert apart["bce"] == raw["bce"]
    assert os.path.exists(os.path.join(model_dir, "eval_noema", "reconstructions.png"))
    assert [s for s, _ in event_tags(os.path.join(model_dir, "eval"))["bce"]] == [20, 20]
    assert event_tags(os.path.join(model_dir, "eval_noema"))["bce"] == [
        (20, pytest.approx(raw["bce"], rel=1e-6))]
    raw_export = core.run(Config(mode="export", model_dir=model_dir, ema=False),
                          given={"mode", "model_dir", "ema"})
    assert raw_export["export_dir"] == os.path.join(model_dir, "export_noema", "20")
    loaded = tf.saved_model.load(exported["export_dir"])
    images = data.to_float(data.load_split("test[:128]", "fontdigits").images)
    out = loaded.signatures["reconstruct"](images=images)["images"]
    bce = float(tf.reduce_mean(tf.keras.losses.binary_crossentropy(images, out)))
    assert bce == pytest.approx(with_ema["bce"], rel=2e-3)  # the export holds the average
    # ... also where TF Serving restores it.
    np.testing.assert_allclose(
        served(exported["export_dir"], "reconstruct", images=images[:8].numpy())["images"],
        out[:8].numpy(), atol=1e-6)
    out = tf.saved_model.load(raw_export["export_dir"]).signatures["reconstruct"](
        images=images)["images"]
    bce = float(tf.reduce_mean(tf.keras.losses.binary_crossentropy(images, out)))
    assert bce == pytest.approx(raw["bce"], rel=2e-3)
    # A run that evaluated its raw weights (--noema) is evaluated as it was by default.
    trained_raw = core.run(config.replace(model_dir=str(tmp_path / "raw"), ema=False))
    again = core.run(Config(mode="eval", model_dir=str(tmp_path / "raw")),
                     given={"mode", "model_dir"})
    assert again["bce"] == pytest.approx(trained_raw["bce"], rel=1e-5)
    assert not os.path.exists(str(tmp_path / "raw" / "eval_ema"))
    # Turned on over a run without an average: it starts from the restored weights.
    plain = config.replace(model_dir=str(tmp_path / "plain"), ema_decay=None, train_steps=10)
    core.run(plain)
    # Asked of an eval of a run without one, it says so and evaluates the run's weights,
    # not under the average's name.
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        core.run(Config(mode="eval", model_dir=plain.model_dir, ema_decay=0.9),
                 given={"mode", "model_dir", "ema_decay"})
    assert (f"--ema_decay=0.9: {plain.model_dir} keeps no weight average, so its own weights "
            "are evaluated") in caplog.text
    assert "eval | step 10 |" in caplog.text and "EMA" not in caplog.text
    assert core.run(plain.replace(ema_decay=0.9, train_steps=20))["step"] == 20


def test_a_resume_that_drops_the_average_says_how_to_keep_it(tmp_path, caplog):
    config = Config(dataset="fontdigits", train_split="train[:640]", eval_split="test[:128]",
                    model_dir=str(tmp_path / "run"), train_steps=4, batch_size=32,
                    learning_rate=1e-2, ema_decay=0.9, mode="train")
    core.run(config)
    # A resume that turns to the raw weights says its curve changes meaning.
    with caplog.at_level("INFO", logger="absl"):
        assert core.run(config.replace(train_steps=6, ema=False))["step"] == 6
    assert (f"--model_dir={tmp_path / 'run'} evaluated its weight average until now: this "
            "run's evaluations use the raw weights, in the same eval/ curve; give --ema to go "
            "on as before") in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        assert core.run(config.replace(ema_decay=None, train_steps=8))["step"] == 8
    assert (f"--model_dir={tmp_path / 'run'} keeps a weight average (--ema_decay=0.9) that this "
            "run leaves out") in caplog.text and "give --ema_decay=0.9 to keep it" in caplog.text
    # What the checkpoint holds beyond this run's objects is left unread without
    # TensorFlow's warning per value.
    assert "unrestored values" not in caplog.text and "could not be found" not in caplog.text


@pytest.mark.parametrize("value", [0.0, 1.0, -0.5, 1.5])
def test_bad_ema_decay(value):
    with pytest.raises(ConfigError, match=re.escape(f"--ema_decay={value}: must be between 0 "
                                                    "and 1")):
        Config(ema_decay=value)
