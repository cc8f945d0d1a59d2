"""Learning-rate schedules: closed forms, the update they scale, logging, resume, rollback,
bad input."""

import logging
import math
import re

import numpy as np
import pytest
import tensorflow as tf

import core
from core.config import Config
from core.errors import ConfigError
from core.schedules import Multiplier
from core.trainer import Trainer
from helpers import event_tags
from layers.autoencoders import build_autoencoder


def _m(multiplier, step):
    return float(multiplier(tf.constant(step, tf.int64)))


def test_each_schedule_is_its_closed_form():
    cosine = Multiplier("cosine", total_steps=110, warmup_steps=10, min_ratio=0.1)
    for step in (10, 35, 60, 85, 110, 500):
        t = min(max((step - 10) / 100, 0), 1)
        assert _m(cosine, step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)),
                                                 rel=1e-5)
    assert _m(cosine, 0) == pytest.approx(0.1)  # warm-up: (0 + 1) / 10 of the start
    assert _m(cosine, 4) == pytest.approx(0.5)
    linear = Multiplier("linear", total_steps=100, min_ratio=0.2)
    assert [_m(linear, s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.6, 0.2])
    exponential = Multiplier("exponential", decay_rate=0.5, steps_per_epoch=10)
    assert [_m(exponential, s) for s in (0, 10, 25)] == pytest.approx([1, 0.5, 0.5**2.5])
    piecewise = Multiplier("piecewise", boundaries=(5, 8), ratios=(1.0, 0.1, 0.01))
    assert [_m(piecewise, s) for s in (0, 4, 5, 7, 8, 100)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    assert _m(Multiplier(), 123) == 1.0


def test_the_update_is_scaled_by_the_schedule():
    """Adam's first step moves each weight by about lr: half the factor, half the move."""
    images = np.random.default_rng(0).random((16, 28, 28, 1)).astype(np.float32)
    moves = []
    for multiplier in (None, Multiplier("piecewise", boundaries=(100,), ratios=(0.5, 1.0))):
        tf.keras.utils.set_random_seed(0)
        model = build_autoencoder("seed")
        before = [v.numpy() for v in model.trainable_variables]
        trainer = Trainer(model, tf.distribute.get_strategy(), 16, 1e-2, eager=True,
                          lr_multiplier=multiplier)
        assert trainer.learning_rate == pytest.approx(1e-2 * (0.5 if multiplier else 1))
        trainer.train_step(images)
        moves.append([v.numpy() - b for v, b in zip(model.trainable_variables, before)])
    for full, half in zip(*moves):
        np.testing.assert_allclose(half, 0.5 * full, rtol=1e-4, atol=1e-7)


def test_a_rollback_scales_the_whole_schedule():
    trainer = Trainer(build_autoencoder("seed"), tf.distribute.get_strategy(), 16, 1e-2,
                      lr_multiplier=Multiplier("linear", total_steps=10, min_ratio=0.0))
    trainer.step.assign(5)
    assert trainer.learning_rate == pytest.approx(0.5e-2)
    trainer.set_learning_rate(trainer.base_learning_rate * 0.5)  # what a rollback does
    assert trainer.base_learning_rate == pytest.approx(0.5e-2)
    assert trainer.learning_rate == pytest.approx(0.25e-2)


def test_the_logged_rate_follows_the_step_through_a_resume(tmp_path, caplog):
    def config(name, steps):
        return Config(dataset="fontdigits", train_split="train[:640]", eval_split="test[:64]",
                      model_dir=str(tmp_path / name), train_steps=steps, epochs=None,
                      batch_size=32, log_every=5, steps_per_loop=5, eval_every=10,
                      mode="train", learning_rate=1e-2, lr_schedule="cosine", warmup_steps=5,
                      min_learning_rate=1e-3)

    core.run(config("whole", 20))
    core.run(config("resumed", 10))
    caplog.clear()
    resumed = core.run(config("resumed", 20))
    assert resumed["step"] == 20
    # The longer run stretched the schedule: the rate jumps at step 10, and the log says so.
    warned = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
    assert warned == [
        "resuming at step 10 with another learning-rate schedule: the run's (cosine from 0.01 "
        "to 0.001 over 10 steps, 5 warm-up steps) was at 0.001 here, this one (cosine from 0.01 "
        "to 0.001 over 20 steps, 5 warm-up steps) is at 0.00775, so the rate jumps at this step "
        "(a cosine or linear schedule spans --train_steps or --epochs: a longer run stretches "
        "it)"]
    caplog.clear()
    caplog.set_level(logging.INFO, logger="absl")
    core.run(config("whole", 20))  # the same schedule: nothing to say
    assert "resuming from step 20 towards 20" in caplog.text
    assert "learning-rate schedule" not in caplog.text
    whole = dict(event_tags(str(tmp_path / "whole" / "train"))["learning_rate"])
    again = dict(event_tags(str(tmp_path / "resumed" / "train"))["learning_rate"])
    # Steps 15 and 20 come from the resumed run (its first part ran a 10-step schedule,
    # whose end was step 10): the same rates as without the interruption.
    assert sorted(whole) == [5, 10, 15, 20]
    assert [again[s] for s in (15, 20)] == pytest.approx([whole[s] for s in (15, 20)], rel=1e-6)
    for step, rate in whole.items():  # the rate of the next step, by the closed form
        t = min(max((step - 5) / 15, 0), 1)
        expected = 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * t))
        assert rate == pytest.approx(expected * min(1, (step + 1) / 5), rel=1e-5), step


def test_a_schedule_that_reaches_past_the_run_says_so(tmp_path, caplog):
    """A recipe's schedule on a run cut short: the warm-up never ends, and a boundary after
    the last step never moves the rate."""
    def run(name, **schedule):
        caplog.clear()
        core.run(Config(dataset="fontdigits", train_split="train[:320]", eval_split="test[:32]",
                        model_dir=str(tmp_path / name), train_steps=4, epochs=None,
                        batch_size=32, mode="train", **schedule))
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert run("cosine", lr_schedule="cosine", warmup_steps=8) == [
        "--warmup_steps=8 reaches past the run's 4 steps: the rate only ramps up, to 50% of "
        "--learning_rate at the last step, and the cosine schedule after it never starts"]
    # A piecewise schedule runs under its warm-up: only the late boundaries are said.
    assert run("piecewise", lr_schedule="piecewise", lr_boundaries=(2, 4, 50),
               lr_values=(3e-3, 1e-3, 3e-4, 1e-4), warmup_steps=2) == [
        "--lr_boundaries 4,50 come at or after the run's last step (4): the rate never changes "
        "there"]


@pytest.mark.parametrize("changes, message", [
    (dict(lr_schedule="step"), "--lr_schedule='step' is unknown"),
    (dict(warmup_steps=-1), "--warmup_steps=-1: must be >= 0"),
    (dict(lr_schedule="exponential"), "--lr_schedule=exponential needs --decay_rate"),
    (dict(lr_schedule="exponential", decay_rate=-0.5), "--decay_rate=-0.5: the factor per "
                                                        "epoch must be in (0, 1]"),
    (dict(decay_rate=0.9), "--decay_rate is the exponential schedule's"),
    (dict(lr_schedule="cosine", min_learning_rate=1.0), "--min_learning_rate=1.0: must be >= 0 "
                                                        "and below --learning_rate"),
    (dict(lr_schedule="piecewise", lr_boundaries=(10,), lr_values=(1e-3,)),
     "got 1 boundaries and 1 values"),
    (dict(lr_schedule="piecewise", lr_boundaries=(20, 10), lr_values=(3e-3, 1e-3, 3e-4)),
     "--lr_boundaries=20,10: steps must be positive and increasing"),
    (dict(lr_boundaries=(10,), lr_values=(1e-3, 1e-4)), "are the piecewise schedule's"),
])
def test_bad_schedules(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**changes)
