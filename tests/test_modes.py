"""Eval and export as a new user runs them: they take the trained run's settings from
its config.json, keep the training run's TensorBoard curves, and a failed run writes
nothing into the model dir."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import core
from core.config import Config
from helpers import Notebook, checkpoint_files, event_tags, run_train


def _scalars(folder, tag):
    acc = EventAccumulator(folder, size_guidance={"tensors": 0})
    acc.Reload()
    import tensorflow as tf

    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory, idx_dir):
    """A denoiser trained on --dataset=mnist with noise: nothing of it is a flag default."""
    model_dir = tmp_path_factory.mktemp("denoiser")
    proc = run_train("--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:512]",
                     "--eval_split=test[9800:]", "--model=denoiser", "--noise_factor=0.3",
                     "--seed=5", f"--model_dir={model_dir}", "--train_steps=30", "--batch_size=32",
                     "--eval_every=10", "--log_every=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(model_dir)


def test_eval_takes_the_runs_settings(denoiser):
    trained = dict(_scalars(os.path.join(denoiser, "eval"), "loss"))
    proc = run_train("--mode=eval", f"--model_dir={denoiser}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming with" not in proc.stderr and "overrides" not in proc.stderr
    results = json.load(open(os.path.join(denoiser, "eval_results.json")))
    assert results["dataset"] == "mnist" and results["split"] == "test[9800:]"
    # The same checkpoint on the same noisy split gives the training run's last evaluation.
    assert results["bce"] == pytest.approx(trained[30], abs=1e-6)
    assert not [f for f in os.listdir(denoiser) if f.startswith("events.out")][1:], \
        "eval wrote a root events file (an HParams session) of its own"


def test_another_eval_batch_gives_the_same_metrics(denoiser, tmp_path):
    """--eval_batch_size only changes how many examples an eval step takes: 200 examples in
    batches of 96 (the last one padded) give the training run's evaluation at batch 32."""
    trained = dict(_scalars(os.path.join(denoiser, "eval"), "loss"))
    out = tmp_path / "run"
    shutil.copytree(denoiser, out)
    proc = run_train("--mode=eval", f"--model_dir={out}", "--eval_batch_size=96")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(out / "eval_results.json"))
    assert results["bce"] == pytest.approx(trained[30], abs=1e-5)


def test_an_evaluation_long_enough_for_the_compiled_loop_gives_the_same_metrics(denoiser,
                                                                                 tmp_path):
    """1,100 batches of 2: the first 1,024 one call each (`EVAL_CALLS_BEFORE_LOOP`), then
    the compiled loop (a call of 64, then one that finds 12); on one replica and on two (one
    example each). Every metric is the one of the same split in 11 batches of 200."""
    out = tmp_path / "run"
    shutil.copytree(denoiser, out)
    split = ["--eval_split=test[:2200]", "--checkpoint=" + str(out / "ckpt-30")]
    found = {}
    for name, flags in {"200": ("--eval_batch_size=200",), "2": ("--eval_batch_size=2",),
                        "2 on 2 replicas": ("--eval_batch_size=2", "--strategy=mirrored",
                                            "--num_cpu_devices=2")}.items():
        proc = run_train("--mode=eval", f"--model_dir={out}", *split, *flags)
        assert proc.returncode == 0, proc.stderr[-2000:]
        looped = ("evaluation: after 1,024 calls of one batch each, a compiled loop of 64 "
                  "batches a call from here") in proc.stderr
        assert looped == (name != "200"), proc.stderr[-2000:]
        results, = glob.glob(str(out / "eval_ckpt-30_*" / "eval_results.json"))
        found[name] = json.load(open(results))
    assert found["200"]["split"] == "test[:2200]", found["200"]
    for name in ("2", "2 on 2 replicas"):
        for metric in ("bce", "mse", "psnr", "ssim"):
            assert found[name][metric] == pytest.approx(found["200"][metric], rel=1e-5,
                                                        abs=1e-6), (name, metric)


def test_an_explicit_flag_overrides_the_run_with_a_log_line(denoiser):
    proc = run_train("--mode=eval", f"--model_dir={denoiser}", "--noise_factor=0",
                     "--eval_split=test[:200]", "--checkpoint=" + os.path.join(denoiser, "ckpt-30"),
                     "--image_size=28")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--noise_factor=0.0 overrides the trained run's 0.3" in proc.stderr
    # As the flag is written (it was "(28, 28) overrides the trained run's None").
    assert "--image_size=28,28 overrides the trained run's default (unset)" in proc.stderr
    assert "--eval_split='test[:200]' overrides the trained run's 'test[9800:]'" in proc.stderr
    # Another split and a chosen checkpoint: a TensorBoard run of their own.
    out, = glob.glob(os.path.join(denoiser, "eval_ckpt-30_noise_factor-0.0_mnist-*-test-200"))
    results = json.load(open(os.path.join(out, "eval_results.json")))
    assert results["split"] == "test[:200]" and results["dataset"] == "mnist"


def test_eval_on_other_data_takes_its_splits_and_keeps_the_runs_results(denoiser, tmp_path):
    """A run trained on MNIST's test[:512], evaluated on a folder: the run's splits are not
    the folder's (it stopped on 'split test[9800:]: the folder has the splits train'), and
    its results went into the run's eval/ curve, mixing two datasets at one step."""
    import numpy as np
    from PIL import Image

    run = shutil.copytree(denoiser, tmp_path / "run")
    (tmp_path / "digits").mkdir()
    for i in range(20):  # greyscale bars, 40x40: resized to the run's 28x28
        digit = np.zeros((40, 40), np.uint8)
        digit[8 + i % 5:30, 12:16 + i] = 255
        Image.fromarray(digit).save(tmp_path / "digits" / f"{i:02d}.png")
    curve = _scalars(str(run / "eval"), "loss")
    root_results = (run / "eval_results.json").exists()  # an earlier test's eval, or none
    before = (run / "eval_results.json").read_bytes() if root_results else None
    proc = run_train("--mode=eval", f"--model_dir={run}", "--dataset=folder",
                     f"--data_dir={tmp_path / 'digits'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The whole folder, which the run never trained on: it evaluated 2 of the 20 images,
    # the tenth a training run on it would hold out.
    assert ("folder: --eval_split=train (all of it: other data than the run's; of a copy of "
            "the data it trained on, --eval_split=train[90%:] is the tenth it held out)\n"
            ) in proc.stderr
    assert "folder train: 20 image files (unlabelled) of 28x28x1" in proc.stderr
    out = run / "eval_folder-digits-train"
    results = json.load(open(out / "eval_results.json"))
    assert results["dataset"] == "folder" and results["split"] == "train"
    assert results["data_dir"] == str(tmp_path / "digits")
    assert [s for s, _ in _scalars(str(out), "loss")] == [30]
    assert (out / "reconstructions.png").exists()
    assert _scalars(str(run / "eval"), "loss") == curve  # the run's own curve, untouched
    assert (run / "eval_results.json").exists() == root_results
    assert not root_results or (run / "eval_results.json").read_bytes() == before
    # So are shards of train alone (there was no test-* split to evaluate).
    from core import prepare

    prepare.convert("folder", str(tmp_path / "shards"), str(tmp_path / "digits"),
                    splits=["train"], progress=None)
    proc = run_train("--mode=eval", f"--model_dir={run}", "--dataset=tfrecord",
                     f"--data_dir={tmp_path / 'shards'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tfrecord: --eval_split=train (all of it: other data than the run's)\n" in proc.stderr
    results = json.load(open(run / "eval_tfrecord-shards-train" / "eval_results.json"))
    assert results["split"] == "train" and "tfrecord train: 20 examples in" in proc.stderr


def test_eval_with_other_settings_keeps_the_runs_results(denoiser, tmp_path):
    """The denoiser evaluated at another noise level: its results went into the run's
    eval_results.json and figures, and a second value at step 30 into its eval/ curve."""
    run = shutil.copytree(denoiser, tmp_path / "run")
    curve = _scalars(str(run / "eval"), "loss")
    results_file = run / "eval_results.json"
    before = results_file.read_bytes() if results_file.exists() else None
    proc = run_train("--mode=eval", f"--model_dir={run}", "--noise_factor=0.6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = run / "eval_noise_factor-0.6"
    assert (f"evaluating other settings than the run's evaluations (noise_factor-0.6): results "
            f"in {out}/") in proc.stderr
    results = json.load(open(out / "eval_results.json"))
    assert results["bce"] > dict(curve)[30] * 1.01  # heavier noise: worse reconstructions
    assert (out / "reconstructions.png").exists()
    assert _scalars(str(run / "eval"), "loss") == curve
    assert (results_file.read_bytes() if results_file.exists() else None) == before
    # Another seed draws other noise: apart too; the same settings as the run's are not.
    proc = run_train("--mode=eval", f"--model_dir={run}", "--seed=6", "--noise_factor=0.3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "eval_seed-6" / "eval_results.json").exists()
    assert _scalars(str(run / "eval"), "loss") == curve


def test_another_loss_in_eval_does_not_take_the_runs_loss_weights():
    """--loss=mse in an eval of a run trained with --loss=l1+ssim --loss_weights=0.16,0.84
    stopped on 'gives 2 weight(s) for the 1 loss(es)': the weights were the run's losses'."""
    from core.runner import inherit_run_config

    saved = {"loss": "l1+ssim", "loss_weights": [0.16, 0.84], "model": "seed"}
    config = inherit_run_config(Config(mode="eval", loss="mse"), saved, given={"mode", "loss"})
    assert config.loss == "mse" and config.loss_weights is None
    config = inherit_run_config(Config(mode="eval"), saved, given={"mode"})
    assert config.loss == "l1+ssim" and config.loss_weights == (0.16, 0.84)


def test_export_at_another_image_size_is_refused_as_eval_is(denoiser, tmp_path):
    """It logged '--image_size=32,32 overrides the trained run's' and exported at 28x28."""
    run = shutil.copytree(denoiser, tmp_path / "run")
    proc = run_train("--mode=export", f"--model_dir={run}", "--image_size=32")
    assert proc.returncode == 2
    assert "holds a different model (image_shape: [28, 28, 1] -> [32, 32, 1])" in proc.stderr
    assert not (run / "export").exists()


def test_export_needs_no_data(denoiser, tmp_path):
    moved = shutil.copytree(denoiser, tmp_path / "run")
    saved = json.load(open(moved / "config.json"))
    saved["data_dir"] = str(tmp_path / "gone")  # the data is not on this machine
    (moved / "config.json").write_text(json.dumps(saved))
    proc = run_train("--mode=export", f"--model_dir={moved}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.exists(moved / "export" / "30" / "saved_model.pb")


def test_export_again_replaces_the_export_only_once_the_new_one_is_written(denoiser, tmp_path):
    """A second export of a step replaces the first (kept until the new one is complete)
    and removes what a stopped export left: its half-written .30.tmp, or the .30.old it
    moved."""
    import tensorflow as tf

    run = shutil.copytree(denoiser, tmp_path / "run")
    config = Config(mode="export", model_dir=str(run))
    first = core.run(config, given={"mode", "model_dir"})["export_dir"]
    for leftover in (".30.tmp", ".30.old"):
        os.makedirs(tmp_path / "run" / "export" / leftover)
        (tmp_path / "run" / "export" / leftover / "half").write_text("x")
    os.utime(os.path.join(first, "saved_model.pb"), (0, 0))
    again = core.run(config, given={"mode", "model_dir"})["export_dir"]
    assert again == first and sorted(os.listdir(os.path.dirname(first))) == ["30"]
    assert os.stat(os.path.join(first, "saved_model.pb")).st_mtime > 0  # written anew
    loaded = tf.saved_model.load(first)
    assert set(loaded.signatures) >= {"encode", "decode", "reconstruct"}


def test_the_export_refuses_another_shape_in_one_message(denoiser, tmp_path):
    """A signature of a SavedModel loaded in a fresh process is fed whatever shape comes:
    another image size ran (the resnet's decoder gave 8 images of 32x32 for 2 of 64x64),
    and images without the batch axis aborted the process in oneDNN's convolution. The
    export checks the shape first and names the one it takes."""
    run = shutil.copytree(denoiser, tmp_path / "run")
    export_dir = core.run(Config(mode="export", model_dir=str(run)),
                          given={"mode", "model_dir"})["export_dir"]

    def call(signature, argument, shape):
        script = (f"import tensorflow as tf\nm = tf.saved_model.load({export_dir!r})\n"
                  f"out = m.signatures[{signature!r}]({argument}=tf.zeros({shape}))\n"
                  "print(list(out.values())[0].shape.as_list())\n")
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    good = call("reconstruct", "images", [3, 28, 28, 1])
    assert good.returncode == 0 and good.stdout.split() == ["[3,", "28,", "28,", "1]"], good
    for shape in ([2, 56, 56, 1], [28, 28, 1]):
        bad = call("reconstruct", "images", shape)
        assert bad.returncode == 1, (bad.returncode, bad.stdout, bad.stderr[-2000:])
        assert "reconstruct: `images` must be float32 [N, 28, 28, 1]" in bad.stderr
        assert ("tf.image.resize(images, (28, 28)). Got shape] "
                f"[{' '.join(map(str, shape))}]") in bad.stderr
    bad = call("decode", "code", [1, 7, 7, 3])
    assert bad.returncode == 1 and "decode: `code` must be float32 [N, 7, 7, 32]" in bad.stderr


def test_eval_of_an_older_checkpoint_keeps_the_training_curve(denoiser, tmp_path):
    run = shutil.copytree(denoiser, tmp_path / "run")
    before = _scalars(str(run / "eval"), "loss")
    assert sorted({s for s, _ in before}) == [10, 20, 30]  # (an earlier test evaluated 30 again)
    proc = run_train("--mode=eval", f"--model_dir={run}", f"--checkpoint={run}/ckpt-10.index")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _scalars(str(run / "eval"), "loss") == before  # the training run's curve, whole
    chosen = _scalars(str(run / "eval_ckpt-10"), "loss")
    assert [s for s, _ in chosen] == [10]
    assert chosen[0][1] == pytest.approx(before[0][1], abs=1e-6)
    assert "reconstructions" in EventAccumulator(str(run / "eval_ckpt-10")).Reload().Tags()["tensors"]
    assert (run / "eval_ckpt-10" / "reconstructions.png").exists()


def test_a_model_mismatch_with_checkpoint_says_so_and_never_suggests_deleting(denoiser):
    before = checkpoint_files(denoiser)
    proc = run_train("--mode=export", f"--model_dir={denoiser}", "--model=vae",
                     f"--checkpoint={denoiser}/ckpt-20")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")][0]
    assert "ckpt-20 holds a different model (model: 'denoiser' -> 'vae'" in line
    assert "delete" not in line
    assert checkpoint_files(denoiser) == before


@pytest.mark.parametrize("flags, code, message", [
    (["--dataset=mnist", "--data_dir=/nonexistent"], 3, "is not a folder"),
    (["--train_split=train[5:5]"], 2, "is empty"),
    (["--train_split=train[:200%]"], 2, "percentage 200% is outside -100..100"),
    (["--train_split=train[:10]", "--batch_size=32"], 2, "is larger than the training split"),
    (["--mode=eval"], 2, "found no checkpoint"),
    (["--mode=export"], 2, "found no checkpoint"),
    (["--learning_rate=inf"], 2, "must be a positive, finite number"),
    (["--learning_rate=nan"], 2, "must be a positive, finite number"),
    (["--encoder_filters=8"], 2, "--encoder_filters has 1 stages, seed's decoder 3"),
    (["--profile_steps=a,b"], 2, "--profile_steps=a,b: give whole numbers"),
    (["--num_images=65"], 2, "--num_images=65: at most 64"),
])
def test_a_failed_run_creates_nothing(tmp_path, flags, code, message):
    model_dir = tmp_path / "new"
    data = [] if any(f.startswith("--dataset") for f in flags) else ["--dataset=synthetic",
                                                                      "--synthetic_shape=8,8,1"]
    proc = run_train(*data, *flags, f"--model_dir={model_dir}", "--train_steps=5")
    assert proc.returncode == code, (flags, proc.stderr[-2000:])
    lines = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")]
    assert len(lines) == 1 and message in lines[0], (flags, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert not model_dir.exists(), (flags, sorted(os.listdir(model_dir)))


def test_a_failed_eval_on_a_trained_run_adds_nothing(denoiser):
    names = set(os.listdir(denoiser))
    proc = run_train("--mode=eval", f"--model_dir={denoiser}", "--eval_split=test[5:5]")
    assert proc.returncode == 2
    assert set(os.listdir(denoiser)) == names


def test_a_data_dir_a_built_in_dataset_would_ignore_is_refused(tmp_path):
    """A user who gives their folder but not --dataset=folder: training, and eval of a run
    on built-in data, would use the generated images instead. One line, exit 2, nothing
    written. The same for --cache, which a dataset held in memory would ignore."""
    run = tmp_path / "run"
    proc = run_train("--dataset=synthetic", "--synthetic_shape=8,8,1", f"--model_dir={run}",
                     "--train_steps=2", "--batch_size=8", "--eval_split=test[:16]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {path: os.path.getmtime(path) for path in glob.glob(f"{run}/**", recursive=True)}
    photos = tmp_path / "photos"
    photos.mkdir()
    for flags, whose in ((["--mode=eval"], " (the trained run's)"),
                         (["--train_steps=4", "--dataset=synthetic"], "")):
        proc = run_train(*flags, f"--model_dir={run}", f"--data_dir={photos}")
        lines = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].endswith(f"--data_dir={photos} is not read by --dataset=synthetic{whose}, "
                                 "which is built in: for your images add --dataset=folder "
                                 "(TFRecord shards: --dataset=tfrecord), or leave out --data_dir")
        assert {path: os.path.getmtime(path)
                for path in glob.glob(f"{run}/**", recursive=True)} == names
    for flags, whose in ((["--mode=eval", "--cache=memory"], " (the trained run's)"),
                         (["--train_steps=4", "--dataset=synthetic", f"--cache={tmp_path}/c"], "")):
        proc = run_train(*flags, f"--model_dir={run}")
        lines = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].endswith(f"--cache={flags[-1].split('=')[1]} keeps image files decoded, "
                                 f"but --dataset=synthetic{whose} is held in memory already: drop "
                                 "--cache (it is for folder, tfrecord and tfds:NAME data)")
        assert {path: os.path.getmtime(path)
                for path in glob.glob(f"{run}/**", recursive=True)} == names
    assert not os.path.exists(tmp_path / "c")


def test_eval_of_a_run_whose_data_is_not_here_names_where_the_path_came_from(denoiser, idx_dir,
                                                                              tmp_path):
    """A run dir copied to another machine: its config.json names data that is not there,
    which the user never gave as a flag. Given where it is now, the eval is the run's own:
    its splits, its eval/ curves and results, not another dataset's."""
    run = shutil.copytree(denoiser, tmp_path / "run")
    saved = json.load(open(run / "config.json"))
    saved["data_dir"] = str(tmp_path / "elsewhere" / "mnist")
    (run / "config.json").write_text(json.dumps(saved))
    names = set(os.listdir(run))
    proc = run_train("--mode=eval", f"--model_dir={run}")
    lines = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")]
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].endswith(f"--data_dir={tmp_path}/elsewhere/mnist, the trained run's (its "
                             "config.json), does not exist: give --data_dir where the data is now")
    assert set(os.listdir(run)) == names
    trained = dict(_scalars(os.path.join(denoiser, "eval"), "loss"))
    proc = run_train("--mode=eval", f"--model_dir={run}", f"--data_dir={idx_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (f"the run's --data_dir={tmp_path}/elsewhere/mnist (its config.json) is not here: "
            f"--data_dir={idx_dir} is taken as the same data, moved") in proc.stderr
    # No TensorBoard run of its own (the copy holds those other tests wrote into the fixture).
    assert not [f for f in set(os.listdir(run)) - names
                if f.startswith("eval_") and (run / f).is_dir()]
    results = json.load(open(run / "eval_results.json"))
    assert (results["split"], results["data_dir"]) == ("test[9800:]", str(idx_dir))
    assert results["bce"] == pytest.approx(trained[30], abs=1e-6)


def test_profile_window_after_the_last_step_is_reported(tmp_path):
    proc = run_train("--dataset=synthetic", "--synthetic_shape=8,8,1", f"--model_dir={tmp_path}",
                     "--train_steps=6", "--batch_size=16", "--profile_steps=100,110")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--profile_steps=100,110 starts after the run's last step (6)" in proc.stderr
    assert not (tmp_path / "train" / "plugins").exists()
    assert "loss" in event_tags(str(tmp_path / "train"))


@pytest.mark.parametrize("shape", ["7,7,3", "1,1,1"])
def test_tiny_images_train_and_evaluate(tmp_path, shape):
    proc = run_train("--dataset=synthetic", f"--synthetic_shape={shape}", f"--model_dir={tmp_path}",
                     "--train_steps=4", "--batch_size=8", "--eval_split=test[:50]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ckpt-4.index").exists()
    ssim = [v for _, v in event_tags(str(tmp_path / "eval"))["ssim"]]
    assert len(ssim) == 1 and -1.0 <= ssim[0] <= 1.0
    # Synthetic images have no labels: no latent-space plot coloured by noise.
    assert not (tmp_path / "latent_space.png").exists()
    assert (tmp_path / "interpolation.png").exists()


def test_a_one_image_eval_split_and_eager_logs(tmp_path, idx_dir):
    proc = run_train("--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:64]",
                     "--eval_split=test[:1]", f"--model_dir={tmp_path}", "--train_steps=2",
                     "--batch_size=32", "--eager")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "first step ran in" in proc.stderr and "compiled in" not in proc.stderr
    assert (tmp_path / "reconstructions.png").exists()


def test_mode_train_checkpoints_at_every_eval_step(tmp_path):
    proc = run_train("--mode=train", "--dataset=synthetic", "--synthetic_shape=8,8,1",
                     f"--model_dir={tmp_path}", "--train_steps=60", "--eval_every=20",
                     "--batch_size=16", "--keep_checkpoints=5", "--checkpoint_every_secs=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".index")) == [
        "ckpt-20.index", "ckpt-40.index", "ckpt-60.index"]
    assert not (tmp_path / "eval").exists()  # checkpoints, but no evaluation


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_eval_is_one_line_and_frees_the_dir(denoiser, tmp_path, signum):
    """Ctrl-C (or SIGTERM) while TensorFlow traces the eval step: Python's KeyboardInterrupt
    raised there once corrupted TensorFlow's heap (SIGABRT, 'corrupted size vs. prev_size');
    now the process exits at once with one line, the dir as it was and its lock free."""
    run = shutil.copytree(denoiser, tmp_path / "run")
    before = sorted(os.listdir(run))
    proc = _popen_train("--mode=eval", f"--model_dir={run}", "--eval_split=test",
                        "--batch_size=8")
    for line in proc.stderr:
        if "restored" in line:
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == (f"train.py: stopped by {signal.Signals(signum).name} "
                                            "outside training: the checkpoints are as they were")
    assert sorted(os.listdir(run)) == before
    again = run_train("--mode=eval", f"--model_dir={run}", "--eval_split=test[:64]")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stale lock" not in again.stderr  # released, not left to be taken over


def test_ctrl_c_while_starting_up_is_one_line(tmp_path):
    """Ctrl-C while Python imports TensorFlow (the slowest part of start-up): one line, and
    nothing written."""
    proc = _popen_train(f"--model_dir={tmp_path / 'run'}", "--train_steps=5")
    for line in proc.stderr:  # the first line of TensorFlow's C++ library, as it loads
        if "absl::InitializeLog" in line or "oneDNN" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("train.py: stopped by SIGINT outside training")
    assert not (tmp_path / "run").exists()


_NOTEBOOK = """
import sys, time, traceback
from absl import logging
logging.set_verbosity(logging.INFO)
import core
from core.config import Config

def slow_action(step, metrics):
    print("in the action", flush=True)
    time.sleep(600)  # longer than the test waits: only an interrupt ends it in time

# A notebook's cells: an evaluation that is interrupted, then one that runs to its end.
for cell, split in (("first", sys.argv[2]), ("again", "test[:64]")):
    try:
        result = core.run(Config(mode="eval", model_dir=sys.argv[1], eval_split=split,
                                 eval_batch_size=8),
                          eval_actions=[slow_action] if cell == "first" and sys.argv[3] == "slow"
                          else [])
        print(cell, "finished at step", result["step"], flush=True)
    except KeyboardInterrupt:
        frames = traceback.extract_tb(sys.exc_info()[2])
        print(cell, "interrupted in", " < ".join(f.name for f in frames[::-1][:2]), flush=True)
"""


@pytest.mark.parametrize("slow", [False, True], ids=["in_eval", "in_a_slow_action"])
def test_ctrl_c_from_python_interrupts_at_a_safe_point(denoiser, tmp_path, slow):
    """core.run from Python (a notebook): Ctrl-C outside training raises KeyboardInterrupt
    at the run's next safe point (between eval batches), never inside TensorFlow, where
    Python's own could corrupt it; the process goes on to evaluate again. A second Ctrl-C
    interrupts at once, here inside your own slow eval action, where no safe point comes."""
    run = shutil.copytree(denoiser, tmp_path / "run")
    before = checkpoint_files(run)
    with Notebook(_NOTEBOOK, run, "test[:64]" if slow else "test",
                  "slow" if slow else "-") as notebook:
        notebook.wait_for("in the action" if slow else "restored")
        notebook.ctrl_c()
        if slow:  # the action is not a safe point: only the second Ctrl-C interrupts it
            notebook.wait_for("next safe point")
            notebook.ctrl_c()
        code, out = notebook.finish()
    assert code == 0, out[-3000:]
    assert "Ctrl-C: interrupting at the run's next safe point" in out
    # The watcher's handler, in your action; or core/signals.py, from the eval's restore
    # or its batches (just after the "restored" line, or a batch later).
    where = ("_handle < slow_action\n" if slow else "interruption_point < ")
    assert f"first interrupted in {where}" in out, out[-3000:]
    assert "again finished at step 30\n" in out, out[-3000:]
    assert "Traceback" not in out and "Error" not in out.split("first interrupted")[0][-2000:]
    assert checkpoint_files(run) == before


def _popen_train(*flags):
    from helpers import ROOT

    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        # A shell runs background jobs with SIGINT ignored, and Python keeps an inherited
        # SIG_IGN: give the child Ctrl-C's default, as a terminal would, however the
        # suite itself was started (CI ran it as `.ci/run &` once, and the signal was lost).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_config_json_records_what_ran_and_a_float16_run_evaluates_and_exports_in_float32(
        tmp_path):
    """A run trained in float16 (a V100's auto) is evaluated and exported on a machine whose
    auto is float32 (a CPU, an H100's bfloat16), and config.json says what ran."""
    model_dir = str(tmp_path / "run")
    core.run(Config(dataset="fontdigits", train_split="train[:512]", eval_split="test[:64]",
                    model_dir=model_dir, train_steps=4, epochs=None, batch_size=32,
                    precision="mixed_float16", strategy="mirrored", num_cpu_devices=2))
    saved = json.load(open(os.path.join(model_dir, "config.json")))
    assert saved["precision"] == "mixed_float16" and saved["jit_compile"] is None
    assert saved["resolved_precision"] == "mixed_float16"
    assert saved["resolved_jit_compile"] is False  # the CPU default
    assert saved["resolved_strategy"] == "MirroredStrategy" and saved["resolved_replicas"] == 2
    assert [d.rsplit("/", 1)[-1] for d in saved["resolved_devices"]] == ["device:CPU:0",
                                                                         "device:CPU:1"]
    evaluated = core.run(Config(mode="eval", model_dir=model_dir, precision="float32"),
                         given={"mode", "model_dir", "precision"})
    assert evaluated["step"] == 4 and 0 < evaluated["bce"] < 1
    exported = core.run(Config(mode="export", model_dir=model_dir, precision="mixed_bfloat16"),
                        given={"mode", "model_dir", "precision"})
    assert os.path.exists(os.path.join(exported["export_dir"], "saved_model.pb"))


@pytest.mark.parametrize("first, then", [("mixed_float16", "float32"),
                                         ("float32", "mixed_float16")])
def test_resume_across_precisions_keeps_adams_state(tmp_path, first, then):
    """A run trained where auto is float16 (a V100) resumes where it is not (a CPU, an
    H100), and back: the weights, the step and Adam's moments carry over."""
    import numpy as np
    import tensorflow as tf

    model_dir = str(tmp_path / "run")
    config = Config(dataset="fontdigits", train_split="train[:512]", eval_split="test[:64]",
                    model_dir=model_dir, train_steps=4, epochs=None, batch_size=32,
                    mode="train", precision=first)
    core.run(config)
    path = os.path.join(model_dir, "ckpt-4")
    names = [n for n, _ in tf.train.list_variables(path)]
    assert any("inner_optimizer" in n for n in names) == (first == "mixed_float16")
    resumed = core.run(config.replace(precision=then, train_steps=5))
    assert resumed["step"] == 5 and [h["step"] for h in resumed["history"]] == [5]
    # Adam's step count went on from 4 (not from 0): its state was restored.
    adam = "optimizer/inner_optimizer/" if then == "mixed_float16" else "optimizer/"
    assert int(tf.train.load_variable(os.path.join(model_dir, "ckpt-5"),
                                      adam + "_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 5
    saved = json.load(open(os.path.join(model_dir, "config.json")))
    assert saved["resolved_precision"] == then and np.isfinite(resumed["history"][-1]["loss"])


def test_continuous_eval_follows_a_training_run_to_its_last_step(tmp_path):
    """Started before the training run (--mode=train, which evaluates nothing), it waits for
    the first checkpoint, evaluates the newest checkpoint each time one appears, into the
    run's eval/ curve, and stops by itself after the last step, having written no
    checkpoint file. Which of the middle checkpoints it sees depends on the two processes'
    speeds; the first and the last are certain."""
    from helpers import ROOT

    model_dir = tmp_path / "run"
    sidecar = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--mode=continuous_eval",
         f"--model_dir={model_dir}", "--continuous_eval_timeout=240"], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        seen = []
        while not any("waiting for the first checkpoint" in line for line in seen):
            seen.append(sidecar.stderr.readline())  # started first, whatever the machine's load
            assert seen[-1] or sidecar.poll() is None, "".join(seen)[-2000:]
        trained = run_train("--mode=train", "--dataset=synthetic", "--synthetic_shape=16,16,1",
                            "--eval_split=test[:64]", f"--model_dir={model_dir}",
                            "--train_steps=60", "--batch_size=32", "--eval_every=20",
                            "--steps_per_loop=5")
        assert trained.returncode == 0, trained.stderr[-2000:]
        files = checkpoint_files(model_dir)
        _, err = sidecar.communicate(timeout=240)
    finally:
        sidecar.kill()
    assert sidecar.returncode == 0, err[-2000:]
    assert "continuous eval: evaluated step 60, the training's last: done" in err
    steps = [step for step, _ in _scalars(str(model_dir / "eval"), "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 60 and set(steps) <= {20, 40, 60}
    assert json.loads((model_dir / "eval_results.json").read_text())["step"] == 60
    assert checkpoint_files(model_dir) == files  # read-only on checkpoints


def test_a_folder_of_results_holds_one_runs(tmp_path, monkeypatch):
    """Eval, export and continuous_eval of a run into a folder of your own (a run you cannot
    write to) write eval_ckpt-N/, export/N/ and eval/ there. Another run's, at the same
    step, replaced them (its export then served as the first run's) and, at another, mixed
    with them: one line, nothing written, as for a training run there. The same run's,
    named from anywhere, goes in."""
    import tensorflow as tf

    def files(folder):
        return {os.path.join(d, f): open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(folder) for f in names}

    run = tmp_path / "run"
    core.run(Config(mode="train", dataset="synthetic", synthetic_shape=(8, 8, 1), epochs=None,
                    train_steps=4, batch_size=8, eval_every=2, model_dir=str(run),
                    eval_split="test[:16]"))
    shutil.copytree(run, tmp_path / "other")  # another run, at the same step
    mine = tmp_path / "mine"
    core.run(Config(mode="eval", checkpoint=str(run / "ckpt-4"), model_dir=str(mine)))
    exported = core.run(Config(mode="export", checkpoint=str(run), model_dir=str(mine)))
    # An export records the checkpoint it is of, where loaders ignore it.
    assert json.loads((mine / "export" / "4" / "assets.extra" / "tapeloop.json").read_text()) \
        == {"checkpoint": str(run / "ckpt-4"), "step": 4, "weights": "raw"}
    assert set(tf.saved_model.load(exported["export_dir"]).signatures) >= {"encode", "decode"}
    monkeypatch.chdir(tmp_path)  # the same run, named relative to another directory
    core.run(Config(mode="continuous_eval", checkpoint="run", model_dir="mine",
                    continuous_eval_timeout=1))
    before = files(mine)
    for mode, what in (("eval", "this evaluation"), ("export", "this export"),
                       ("continuous_eval", "these evaluations")):
        with pytest.raises(core.ConfigError, match=re.escape(
                f"--model_dir=mine holds results of the run {run} (its eval_results.json): the "
                f"{what.split()[1]} of --checkpoint=other, another run's, would go in among "
                f"them: give {what} a folder of its own")):
            core.run(Config(mode=mode, checkpoint="other", model_dir="mine",
                            continuous_eval_timeout=1))
    # A training run there would mix its eval/ curve with the evaluations of `run`.
    with pytest.raises(core.ConfigError, match=re.escape(
            f"--model_dir=mine holds results of the run {run} (its eval_results.json): a "
            "training run would go in among them")):
        core.run(Config(mode="train", dataset="synthetic", synthetic_shape=(8, 8, 1),
                        epochs=None, train_steps=4, batch_size=8, model_dir="mine"))
    # Given as the run to read, it names the run whose results it holds (continuous_eval
    # waited for a checkpoint that no run there could write).
    for mode, then in (("eval", "reads its latest checkpoint"), ("continuous_eval",
                                                                   "evaluates each new")):
        with pytest.raises(core.ConfigError, match=re.escape(
                f"results of the run {run} (its eval_results.json)") + ".*" + re.escape(
                f": --checkpoint={run} --model_dir=mine {then}")):
            core.run(Config(mode=mode, model_dir="mine", continuous_eval_timeout=30))
    assert files(mine) == before
    # A folder of exports alone tells whose they are by their records.
    core.run(Config(mode="export", checkpoint="run", model_dir="exports"))
    with pytest.raises(core.ConfigError, match=re.escape(
            f"--model_dir=exports holds results of the run {run} (its export/4/)")):
        core.run(Config(mode="export", checkpoint="other/ckpt-4", model_dir="exports"))
    assert os.listdir(tmp_path / "exports" / "export") == ["4"]


def test_a_run_without_its_config_json_says_so_in_one_last_line(tmp_path):
    """A run copied without config.json: eval builds the flags' model, which does not match.
    The line said the code had changed, and TensorFlow's warnings for each value left
    unread followed it."""
    run = tmp_path / "vae"
    core.run(Config(model="vae", train_split="train[:64]", eval_split="test[:32]", epochs=None,
                    train_steps=2, batch_size=32, eval_every=2, model_dir=str(run)))
    os.remove(run / "config.json")
    before = checkpoint_files(run)
    proc = run_train("--mode=eval", f"--model_dir={run}")
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"train.py: error: checkpoint {run}/ckpt-2 holds another model than --model=seed with "
        f"these flags: {run} has no config.json to say how it was trained, so none of its "
        "flags were taken: give them (--model and its sizes, --image_size, --channels)")
    assert "could not be found in the restored object" not in proc.stderr
    assert checkpoint_files(run) == before
    proc = run_train("--mode=eval", f"--model_dir={run}", "--model=vae", "--eval_split=test[:32]")
    assert proc.returncode == 0, proc.stderr[-2000:]  # as the line says


def test_a_checkpoint_path_without_model_dir_puts_the_results_in_its_run(tmp_path, monkeypatch):
    """`--mode=eval --checkpoint=runs/a/ckpt-4` wrote into runs/default, the default training
    run's folder (or was refused there, if it held a run): the checkpoint's run is the
    model dir unless --model_dir is given."""
    run = tmp_path / "a"
    core.run(Config(mode="train", dataset="synthetic", synthetic_shape=(8, 8, 1), epochs=None,
                    train_steps=4, batch_size=8, eval_every=2, model_dir=str(run),
                    eval_split="test[:16]"))
    monkeypatch.chdir(tmp_path)
    given = {"mode", "checkpoint", "continuous_eval_timeout"}  # as train.py's flags
    evaluated = core.run(Config(mode="eval", checkpoint="a/ckpt-2"), given)
    assert json.loads((run / "eval_ckpt-2" / "eval_results.json").read_text())["psnr"] == \
        evaluated["psnr"]
    assert core.run(Config(mode="export", checkpoint=str(run)), given)["export_dir"] == \
        os.path.join(str(run), "export", "4")
    followed = core.run(Config(mode="continuous_eval", checkpoint="a",
                               continuous_eval_timeout=1), given)
    assert json.loads((run / "eval_results.json").read_text())["step"] == followed["step"] == 4
    assert not (tmp_path / "runs").exists()


def test_continuous_eval_stops_after_its_timeout_and_refuses_what_makes_no_sense(tmp_path,
                                                                                  caplog):
    """A run that will not reach its last step (stopped early, or killed): the newest
    checkpoint is evaluated, then the wait for another ends at --continuous_eval_timeout. An empty
    model dir is one line after the timeout; --checkpoint and multi_worker are refused."""
    model_dir = str(tmp_path / "run")
    core.run(Config(mode="train", dataset="synthetic", synthetic_shape=(8, 8, 1), epochs=None,
                    train_steps=4, batch_size=8, eval_every=2, model_dir=model_dir,
                    eval_split="test[:16]"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["resolved_total_steps"] == 4
    saved["resolved_total_steps"] = 100  # as if it had been cut short
    saved["mode"] = "train_and_eval"  # as if it evaluated itself
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    for watched in (None, model_dir + "/"):  # the run's own folder, given as --checkpoint too
        caplog.clear()
        with caplog.at_level("WARNING", logger="absl"):
            results = core.run(Config(mode="continuous_eval", model_dir=model_dir,
                                      checkpoint=watched, continuous_eval_timeout=1))
        assert results["step"] == 4 and [e["step"] for e in results["evaluations"]] == [4]
        assert results["evaluations"][0]["psnr"] == results["psnr"]
        assert any("which evaluates too: both write its eval/ curve" in r.getMessage()
                   for r in caplog.records)
    # With another loss it writes a curve of its own, which the run's evaluations do not.
    caplog.clear()
    with caplog.at_level("WARNING", logger="absl"):
        core.run(Config(mode="continuous_eval", model_dir=model_dir, continuous_eval_timeout=1,
                        loss="mse"))
    assert not any("which evaluates too" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "run" / "eval_loss-mse" / "eval_results.json").exists()
    with pytest.raises(core.ConfigError, match=r"found no checkpoint in --model_dir=.*empty "
                       r"within --continuous_eval_timeout=0.5 s: start the training run"):
        core.run(Config(mode="continuous_eval", model_dir=str(tmp_path / "empty"),
                        continuous_eval_timeout=0.5))
    assert not (tmp_path / "empty").exists()
    # A run's folder as --checkpoint (a run you cannot write to): its checkpoints are
    # evaluated into --model_dir, the run's folder only read.
    before = {p: os.stat(tmp_path / "run" / p).st_mtime_ns for p in os.listdir(model_dir)}
    mine = tmp_path / "mine"
    results = core.run(Config(mode="continuous_eval", checkpoint=model_dir + "/",
                              model_dir=str(mine), continuous_eval_timeout=1))
    assert results["step"] == 4 and [e["step"] for e in results["evaluations"]] == [4]
    assert json.loads((mine / "eval_results.json").read_text())["checkpoint"] == \
        model_dir + "/ckpt-4"
    assert [step for step, _ in _scalars(str(mine / "eval"), "loss")] == [4]
    assert (mine / "curves.png").exists() and not (mine / "train").exists()
    assert {p: os.stat(tmp_path / "run" / p).st_mtime_ns for p in os.listdir(model_dir)} == before
    Config(mode="continuous_eval", checkpoint="runs/2024")  # a run's folder named by digits
    for one in (model_dir + "/ckpt-2", "best", "2", model_dir + "/ckpt-2.index"):
        with pytest.raises(core.ConfigError, match=re.escape(
                f"--checkpoint={one} names one: use --mode=eval for it (--checkpoint=RUN_DIR "
                "--model_dir=YOUR_FOLDER evaluates each new checkpoint of RUN_DIR into your")):
            Config(mode="continuous_eval", checkpoint=one)
    # Into another run's folder: its eval/ curve is its own.
    with pytest.raises(core.ConfigError, match=re.escape(
            f"--model_dir={model_dir} holds a run of its own: the evaluations of --checkpoint="
            f"{mine}, another run's, would go in among its own: give these evaluations a folder "
            "of its own")):
        core.run(Config(mode="continuous_eval", checkpoint=str(mine), model_dir=model_dir))
    # So would eval's eval_ckpt-4/ and export's export/4/ (which TF Serving would serve).
    shutil.copytree(model_dir, tmp_path / "copy")
    for mode, what in (("eval", "evaluation"), ("export", "export")):
        with pytest.raises(core.ConfigError, match=re.escape(
                f"--model_dir={model_dir} holds a run of its own: the {what} of --checkpoint="
                f"{tmp_path / 'copy'}, another run's, would go in among its own: give this "
                f"{what} a folder of its own")):
            core.run(Config(mode=mode, checkpoint=str(tmp_path / "copy"), model_dir=model_dir))
    assert {p: os.stat(tmp_path / "run" / p).st_mtime_ns for p in os.listdir(model_dir)} == before
    (tmp_path / "model.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(core.ConfigError, match="names one: use --mode=eval for it"):
        core.run(Config(mode="continuous_eval", checkpoint=str(tmp_path / "model.weights.h5"),
                        model_dir=str(tmp_path / "other"), continuous_eval_timeout=1))
    assert not (tmp_path / "other").exists()
    with pytest.raises(core.ConfigError, match="runs beside the workers, not among them"):
        Config(mode="continuous_eval", strategy="multi_worker")
