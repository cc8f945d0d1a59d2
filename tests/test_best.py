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
    result = core.run(config)
    psnr = dict(event_tags(str(tmp_path / "run" / "eval"))["psnr"])
    # From Python the run returns every evaluation, and the final one's metrics, as
    # --mode=eval returns them.
    assert [e["step"] for e in result["evaluations"]] == [10, 20, 30, 40]
    assert [e["psnr"] for e in result["evaluations"]] == pytest.approx(
        [psnr[s] for s in (10, 20, 30, 40)], rel=1e-6)
    assert result["psnr"] == result["evaluations"][-1]["psnr"] and result["step"] == 40
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
    # As the log names it ("saved DIR/best/ckpt-N"), relative to the model dir.
    named = core.run(config.replace(mode="eval", checkpoint=f"best/ckpt-{best_step}"),
                     given={"mode", "model_dir", "checkpoint"})
    assert named["step"] == best_step and named["psnr"] == evaluated["psnr"]
    exported = core.run(config.replace(mode="export", checkpoint="best"),
                        given={"mode", "model_dir", "checkpoint"})
    assert exported["export_dir"].endswith(os.path.join("export", str(best_step)))
    # From a folder of your own (a run you cannot write to): the run's config.json, above
    # best/, says what it trained on, as for its rolling checkpoints (the defaults were
    # taken: the whole test split here; another --model failed to restore).
    mine = str(tmp_path / "mine")
    elsewhere = core.run(Config(mode="eval", checkpoint=str(tmp_path / "run" / "best"),
                                model_dir=mine), given={"mode", "model_dir", "checkpoint"})
    assert elsewhere["step"] == best_step and elsewhere["psnr"] == evaluated["psnr"]
    assert json.load(open(os.path.join(mine, f"eval_ckpt-{best_step}", "eval_results.json"))
                     )["split"] == "test[:128]"


def test_early_stopping_stops_and_stays_stopped(tmp_path, caplog):
    """At a rate of 1e-12 the weights do not move (below float32's resolution): the eval loss
    repeats exactly, so after 2 evaluations without a new best the run stops, at step 30."""
    config = _config(tmp_path, learning_rate=1e-12, keep_best="eval/loss",
                     early_stopping_patience=2)
    with caplog.at_level("INFO", logger="absl"):
        result = core.run(config)
    assert any(r.getMessage().startswith("early stopping at step 30: eval/loss has not improved")
               and r.getMessage().endswith("for 2 evaluations (--early_stopping_patience)")
               for r in caplog.records)
    assert result["step"] == 30 and result["history"][-1]["step"] == 30
    assert [e["step"] for e in result["evaluations"]] == [10, 20, 30]
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["step"] == 10 and record["evals_since"] == 2
    assert "ckpt-30.index" in os.listdir(tmp_path / "run")
    again = core.run(config)  # the same command: nothing more to train
    assert again["step"] == 30 and again["history"] == [] and again["evaluations"] == []
    assert "loss" not in again  # nothing was evaluated


def test_a_resume_with_another_loss_or_eval_split_judges_anew(tmp_path, caplog):
    """eval/loss is the training loss: after a resume with --loss=mse its values are not
    comparable with the BCE record, so the run that stopped early on BCE trains on, and
    the first MSE evaluation starts the record; so does another eval split, or another
    --noise_factor."""
    config = _config(tmp_path, learning_rate=1e-12, early_stopping_patience=2)
    assert core.run(config)["step"] == 30  # stopped early on BCE
    with caplog.at_level("INFO", logger="absl"):
        result = core.run(config.replace(loss="mse", train_steps=50))
    assert result["step"] == 50
    assert ("eval/loss is judged anew from step 40: the best so far (0.69") in caplog.text
    assert "at step 10) was judged by loss BCE (now MSE)" in caplog.text
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["loss"] == "MSE" and record["step"] == 40 and record["evals_since"] == 1
    assert record["value"] == pytest.approx(result["evaluations"][0]["mse"], rel=1e-6)
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        core.run(config.replace(loss="mse", train_steps=60, eval_split="test[128:256]"))
    assert ("judged anew from step 60: the best so far (0.2") in caplog.text
    assert ("at step 40) was judged by eval_data fontdigits test[:128] (now fontdigits "
            "test[128:256])") in caplog.text
    assert json.load(open(tmp_path / "run" / "best" / "best.json"))["step"] == 60
    # A denoiser resumed at a higher noise (a curriculum): every metric drops with it.
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        core.run(config.replace(loss="mse", train_steps=70, eval_split="test[128:256]",
                                noise_factor=0.3))
    assert ("judged anew from step 70: the best so far (0.2") in caplog.text
    assert ("at step 60) was judged by eval_inputs --resize=crop --noise_factor=0 (now "
            "--resize=crop --noise_factor=0.3)") in caplog.text
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["step"] == 70 and record["eval_inputs"] == "--resize=crop --noise_factor=0.3"


def test_reduce_lr_on_plateau_lowers_the_rate_and_resumes_on_schedule(tmp_path, caplog):
    """The flat run above: the eval loss repeats, so the rate is multiplied by 0.5 after
    every 2 evaluations without a new best (at steps 30 and 50), down to --reduce_lr_min;
    it is in the checkpoint and TensorBoard's train/learning_rate, and a resumed run reduces
    again on the uninterrupted run's schedule."""
    config = _config(tmp_path, learning_rate=1e-12, train_steps=60, reduce_lr_patience=2,
                     reduce_lr_factor=0.5, reduce_lr_min=3e-13)
    with caplog.at_level("INFO", logger="absl"):
        core.run(config)
    lines = [r.getMessage() for r in caplog.records if "--reduce_lr_patience" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("learning rate 1e-12 -> 5e-13 at step 30: "
                                                   "eval/loss has not improved on")
    assert lines[1].startswith("learning rate 5e-13 -> 3e-13 at step 50")  # the floor
    rates = dict(event_tags(str(tmp_path / "run" / "train"))["learning_rate"])
    assert rates[30] == pytest.approx(1e-12) and rates[40] == pytest.approx(5e-13)
    assert rates[60] == pytest.approx(3e-13)
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["step"] == 10 and record["evals_since"] == 5
    assert not os.path.exists(tmp_path / "run" / "best" / "ckpt-10.index")  # none kept

    # Resumed with a higher floor: the next reduction is due at 4 evaluations past 30, step 70.
    # The start's line gives the rate it resumes at, not the flag's (it said "constant 1e-12").
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        core.run(config.replace(train_steps=80, reduce_lr_min=1e-13))
    messages = [r.getMessage() for r in caplog.records]
    assert ("learning rate: constant 3e-13 (the run's --learning_rate=1e-12, lowered by "
            "--reduce_lr_patience or NaN rollbacks before step 60)") in messages
    lines = [m for m in messages if "--reduce_lr_patience)" in m]
    assert len(lines) == 1 and lines[0].startswith("learning rate 3e-13 -> 1.5e-13 at step 70")
    rates = dict(event_tags(str(tmp_path / "run" / "train"))["learning_rate"])
    assert rates[70] == pytest.approx(3e-13) and rates[80] == pytest.approx(1.5e-13)


def test_a_run_that_died_between_its_best_record_and_its_checkpoint_counts_once(tmp_path,
                                                                                caplog):
    """After the evaluation at step 40 best.json is written, then ckpt-40: a process that
    died between them leaves best.json one evaluation ahead of the checkpoint it resumes
    from (30). The resumed run evaluates step 40 again; that evaluation must not count a
    second time: the record, and the reduction due at 40, are the uninterrupted run's."""
    import tensorflow as tf

    config = _config(tmp_path, learning_rate=1e-12, reduce_lr_patience=3, reduce_lr_factor=0.5)
    core.run(config)
    run = str(tmp_path / "run")
    uninterrupted = json.load(open(os.path.join(run, "best", "best.json")))
    assert uninterrupted["evals_since"] == 3 and uninterrupted["step"] == 10
    # What the dead process left: best.json of step 40, no ckpt-40.
    for name in os.listdir(run):
        if name.startswith("ckpt-40."):
            os.remove(os.path.join(run, name))
    tf.compat.v1.train.update_checkpoint_state(run, os.path.join(run, "ckpt-30"),
                                     [os.path.join(run, f"ckpt-{s}") for s in (20, 30)])
    with caplog.at_level("INFO", logger="absl"):
        result = core.run(config)
    messages = [r.getMessage() for r in caplog.records]
    assert result["step"] == 40 and any("resuming from step 30" in m for m in messages)
    record = json.load(open(os.path.join(run, "best", "best.json")))
    assert record == uninterrupted
    assert any(m.startswith("learning rate 1e-12 -> 5e-13 at step 40") for m in messages)


def test_reduce_lr_and_early_stopping_together(tmp_path, caplog):
    """Early stopping at patience 3 after one reduction at 2; a patience no longer than the
    reduction's is warned of."""
    config = _config(tmp_path, learning_rate=1e-12, keep_best="eval/psnr", train_steps=60,
                     reduce_lr_patience=2, early_stopping_patience=3)
    with caplog.at_level("INFO", logger="absl"):
        result = core.run(config)
    assert result["step"] == 40
    messages = [r.getMessage() for r in caplog.records]
    assert sum("--reduce_lr_patience)" in m for m in messages) == 1
    assert any(m.startswith("early stopping at step 40") for m in messages)
    caplog.clear()
    with caplog.at_level("WARNING", logger="absl"):
        core.run(config.replace(model_dir=str(tmp_path / "other"), early_stopping_patience=2,
                                train_steps=10))
    assert any("--early_stopping_patience=2 stops the run before --reduce_lr_patience=2"
               in r.getMessage() for r in caplog.records)


def test_min_delta_is_what_a_new_best_must_beat_by(tmp_path, caplog):
    """With --min_delta=1 no evaluation after the first beats the best by enough, though the
    eval loss falls: the best checkpoint stays the first, and the rate is lowered at each
    evaluation after it."""
    config = _config(tmp_path, keep_best="eval/loss", min_delta=1.0, reduce_lr_patience=1,
                     reduce_lr_factor=0.5)
    with caplog.at_level("INFO", logger="absl"):
        core.run(config)
    loss = dict(event_tags(str(tmp_path / "run" / "eval"))["loss"])
    assert loss[40] < loss[10]
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["step"] == 10 and record["evals_since"] == 3
    assert {f.split(".")[0] for f in os.listdir(tmp_path / "run" / "best")
            if f.startswith("ckpt-")} == {"ckpt-10"}
    lines = [r.getMessage() for r in caplog.records if "--reduce_lr_patience" in r.getMessage()]
    assert [m.split(":")[0] for m in lines] == [
        "learning rate 0.01 -> 0.005 at step 20", "learning rate 0.005 -> 0.0025 at step 30",
        "learning rate 0.0025 -> 0.00125 at step 40"]
    assert "has not improved by more than 1 on" in lines[0] and "for 1 evaluation " in lines[0]


@pytest.mark.parametrize("changes, message", [
    (dict(min_delta=-0.1, keep_best="eval/loss"), "--min_delta=-0.1: must be a finite number"),
    (dict(min_delta=0.1), "give --keep_best, --early_stopping_patience or --reduce_lr_patience"),
    (dict(reduce_lr_patience=-1), "--reduce_lr_patience=-1: must be >= 0"),
    (dict(reduce_lr_patience=2, reduce_lr_factor=1.0), "--reduce_lr_factor=1.0: must be between"),
    (dict(reduce_lr_patience=2, reduce_lr_min=1.0), "--reduce_lr_min=1.0: must be >= 0 and below"),
    (dict(reduce_lr_factor=0.5), "give --reduce_lr_patience=N"),
    (dict(reduce_lr_min=1e-5), "give --reduce_lr_patience=N"),
    (dict(reduce_lr_patience=2, mode="train"), "--reduce_lr_patience judges evaluations"),
    (dict(keep_best="eval/accuracy"), "--keep_best=eval/accuracy is unknown: choose one of "
                                      "eval/loss, eval/bce"),
    (dict(keep_best="eval/kl"), "--keep_best=eval/kl is unknown"),  # the VAE's only
    (dict(keep_best="psnr"), "eval/ssim: did you mean --keep_best=eval/psnr, as TensorBoard"),
    (dict(keep_best="val_loss"), "did you mean --keep_best=eval/loss"),  # Keras' monitor
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


def test_files_added_to_a_folder_are_judged_anew_and_warned_of(tmp_path, caplog):
    """Images added to a folder between runs: the eval split's metrics are of another set
    of images, so the best is judged anew (by the count, the names being the same); the
    training split's epochs are drawn over another set, which the resume warns of."""
    import tensorflow as tf

    def add(split, start, n):
        os.makedirs(tmp_path / "photos" / split, exist_ok=True)
        for i in range(start, start + n):
            image = tf.random.stateless_uniform((16, 16, 3), (i, 0), maxval=256, dtype=tf.int32)
            tf.io.write_file(str(tmp_path / "photos" / split / f"{i}.png"),
                             tf.io.encode_png(tf.cast(image, tf.uint8)))

    add("train", 0, 40)
    add("val", 100, 8)
    config = Config(dataset="folder", data_dir=str(tmp_path / "photos"), batch_size=8,
                    model_dir=str(tmp_path / "run"), train_steps=10, epochs=None, eval_every=10,
                    keep_best="eval/psnr", strategy="default")
    core.run(config)
    assert json.load(open(tmp_path / "run" / "config.json"))["resolved_train_examples"] == 40
    assert json.load(open(tmp_path / "run" / "best" / "best.json"))["eval_examples"] == 8
    add("train", 40, 8)
    add("val", 108, 4)
    with caplog.at_level("INFO", logger="absl"):
        core.run(config.replace(train_steps=20))
    assert ("resuming on 48 training examples where the run had 40 (files added or removed?): "
            "the epochs' order is drawn anew") in caplog.text
    assert re.search(r"eval/psnr is judged anew from step 20: the best so far \(\S+ at step 10\) "
                     r"was judged by eval_examples 8 \(now 12\)", caplog.text)
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert record["step"] == 20 and record["eval_examples"] == 12


def test_a_folder_that_moved_keeps_the_runs_best(tmp_path, caplog):
    """The run's --data_dir is not there any more and the command names where it went: the
    same data, so the best stands (it was judged anew, and a worse evaluation became the
    best); a copy beside the run's own folder is other data, judged anew."""
    import shutil

    import tensorflow as tf

    for i in range(48):
        split = "train" if i < 40 else "val"
        os.makedirs(tmp_path / "photos" / split, exist_ok=True)
        image = tf.random.stateless_uniform((16, 16, 3), (i, 0), maxval=256, dtype=tf.int32)
        tf.io.write_file(str(tmp_path / "photos" / split / f"{i}.png"),
                         tf.io.encode_png(tf.cast(image, tf.uint8)))
    # At a rate of 1e-12 the weights do not move: every evaluation equals the first, which
    # stays the best unless the run judges anew.
    config = Config(dataset="folder", data_dir=str(tmp_path / "photos"), batch_size=8,
                    model_dir=str(tmp_path / "run"), train_steps=10, epochs=None, eval_every=10,
                    keep_best="eval/psnr", learning_rate=1e-12, strategy="default")
    core.run(config)
    os.rename(tmp_path / "photos", tmp_path / "moved")
    moved = config.replace(data_dir=str(tmp_path / "moved"), train_steps=20)
    with caplog.at_level("INFO", logger="absl"):
        core.run(moved)
    assert (f"the run's --data_dir={tmp_path}/photos (its config.json) is not here: "
            f"--data_dir={tmp_path}/moved is taken as the same data, moved (its best so far "
            "stands") in caplog.text
    assert "judged anew" not in caplog.text and "trained on other data" not in caplog.text
    record = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert (record["step"], record["evals_since"]) == (10, 1)
    assert record["eval_data"] == f"folder {tmp_path}/moved val"  # the measure's new place
    # The run's folder is here now: a copy elsewhere is other data.
    shutil.copytree(tmp_path / "moved", tmp_path / "copy")
    caplog.clear()
    with caplog.at_level("INFO", logger="absl"):
        core.run(moved.replace(data_dir=str(tmp_path / "copy"), train_steps=30))
    assert "is taken as the same data" not in caplog.text
    assert "was trained on other data" in caplog.text
    assert "eval/psnr is judged anew from step 30" in caplog.text
    assert json.load(open(tmp_path / "run" / "best" / "best.json"))["step"] == 30
