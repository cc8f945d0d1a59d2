"""--keep_best, --checkpoint=best and --early_stopping_patience."""

import json
import os
import re

import pytest

import core
from core.config import Config
from core.errors import ConfigError
from helpers import event_tags


def _config(tmp_path, **kw):
    base = dict(dataset="fontdigits", train_split="train[:640]", eval_split="test[:128]",
                model_dir=str(tmp_path / "run"), train_steps=40, epochs=None, batch_size=32,
                eval_every=10, log_every=10, steps_per_loop=10, learning_rate=1e-2)
    base.update(kw)
    return Config(**base)


def test_the_best_checkpoint_is_kept_apart_and_evaluated(tmp_path):
    config = _config(tmp_path, keep_best="eval/psnr", keep_checkpoints=1)
    core.run(config)
    psnr = dict(event_tags(str(tmp_path / "run" / "eval"))["psnr"])
    best_step = max(psnr, key=psnr.get)
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["metric"] == "eval/psnr" and record["step"] == best_step
    assert record["value"] == pytest.approx(psnr[best_step], rel=1e-6)
    assert os.path.exists(tmp_path / "run" / "best" / f"ckpt-{best_step}.index")
    assert [f for f in os.listdir(tmp_path / "run") if f.endswith(".index")] == ["ckpt-40.index"]
    evaluated = core.run(config.replace(mode="eval", checkpoint="best"),
                         given={"mode", "model_dir", "checkpoint"})
    assert evaluated["step"] == best_step
    assert evaluated["psnr"] == pytest.approx(psnr[best_step], rel=1e-5)
    exported = core.run(config.replace(mode="export", checkpoint="best"),
                        given={"mode", "model_dir", "checkpoint"})
    assert exported["export_dir"].endswith(os.path.join("export", str(best_step)))


def test_early_stopping_stops_and_stays_stopped(tmp_path):
    """At a rate of 1e-12 the weights do not move (below float32's resolution): the eval loss
    repeats exactly, so after 2 evaluations without a new best the run stops, at step 30."""
    config = _config(tmp_path, learning_rate=1e-12, keep_best="eval/loss",
                     early_stopping_patience=2)
    result = core.run(config)
    assert result["step"] == 30 and result["history"][-1]["step"] == 30
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["step"] == 10 and record["evals_since"] == 2
    assert "ckpt-30.index" in os.listdir(tmp_path / "run")
    again = core.run(config)  # the same command: nothing more to train
    assert again["step"] == 30 and again["history"] == []


@pytest.mark.parametrize("changes, message", [
    (dict(keep_best="eval/accuracy"), "--keep_best=eval/accuracy is unknown: choose one of "
                                      "eval/loss, eval/bce"),
    (dict(keep_best="eval/kl"), "--keep_best=eval/kl is unknown"),  # the VAE's only
    (dict(keep_best="eval/loss", mode="train"), "--mode=train runs none"),
    (dict(early_stopping_patience=-1), "--early_stopping_patience=-1: must be >= 0"),
])
def test_bad_best_flags(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**changes)


def test_checkpoint_best_when_none_was_kept(tmp_path):
    config = _config(tmp_path, train_steps=10)
    core.run(config)
    with pytest.raises(ConfigError, match=re.escape("--checkpoint=best: ")):
        core.run(config.replace(mode="eval", checkpoint="best"),
                 given={"mode", "model_dir", "checkpoint"})
    assert not os.path.exists(tmp_path / "run" / "best")
