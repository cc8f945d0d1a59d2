"""Your own images from the command line, as a user runs them: train.py on a folder (with
two files --bad_images=skip drops) and on shards from core.prepare, bad files (exit 3,
nothing written), and kill -9 then resume, exact on both."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import core
from core import prepare
from core.config import Config
from core.errors import ConfigError
from helpers import ROOT, run_train, run_unprivileged
from test_sources import colour_images, png_tree, save


def _prepare(*flags, env=None):
    return subprocess.run([sys.executable, "-m", "core.prepare", *flags], capture_output=True,
                          text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})))


def test_a_bad_flag_value_is_one_line_and_exit_2(tmp_path):
    proc = _prepare("--encoding=jpeg", f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert lines == ["prepare: error: flag --encoding=jpeg: value should be one of <png|raw> "
                     "(python -m core.prepare --helpshort lists the flags)"], proc.stderr
    assert not (tmp_path / "out").exists()
    # Without --dataset: an AttributeError's traceback ('NoneType' ... 'partition').
    proc = _prepare(f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "prepare: error: --dataset is required: what to convert, e.g. --dataset=folder "
        "--data_dir=~/photos, or mnist, tfrecord, tfds:NAME")
    assert not (tmp_path / "out").exists()
    # Values the flags' types let through: --channels=2 wrote the images' own channels,
    # --splits=train,train train's images as train and test, and letters for a size were
    # Python's own words ("invalid literal for int()").
    for flag, line in [
            ("--channels=2", "--channels=2: 1 (greyscale) or 3 (RGB)"),
            ("--splits=train,train", "--splits=train,train: names a split twice; give each once"),
            ("--image_size=a,b", "--image_size=a,b: give HEIGHT,WIDTH as two positive numbers, "
                                 "e.g. 64,48, or one for a square, e.g. 64")]:
        proc = _prepare("--dataset=shapes", flag, f"--output_dir={tmp_path / 'out'}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == f"prepare: error: {line}"
        assert not (tmp_path / "out").exists()


def test_a_model_dir_that_is_the_data_folder_is_one_line_and_the_folder_is_untouched(tmp_path):
    """A run writes its TensorBoard events into train/ and eval/ of --model_dir: given the
    data folder, they went into its train/ split, whose events made the next run skip it as
    a run's folder ('holds no images')."""
    data = tmp_path / "photos"
    png_tree(str(data), splits=(("train", 8), ("test", 4)))
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for model_dir in (data, f"{data}/", data / "train" / ".."):
        proc = run_train("--dataset=folder", f"--data_dir={data}", f"--model_dir={model_dir}",
                         "--train_steps=2", "--batch_size=4")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == (
            f"train.py: error: --model_dir={model_dir} is --data_dir: the run would write its "
            "checkpoints, TensorBoard events (train/, eval/) and figures among your data; give "
            "it a folder of its own, e.g. --model_dir=runs/NAME")
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """A user's folder: mixed formats and sizes, class subfolders, train/ and test/."""
    root = tmp_path_factory.mktemp("photos")
    for split, n in (("train", 96), ("test", 16)):
        arrays = colour_images(n, 48, 64, seed=len(split))
        for i, a in enumerate(arrays):
            ext = ("jpg", "png", "bmp", "gif")[i % 4]
            if i % 5 == 0:  # some of another size and shape
                a = np.asarray(Image.fromarray(a).resize((80, 40)))
            save(str(root / split / ("red" if i % 2 else "blue") / f"{i:03d}.{ext}"), a)
    (root / "train" / "red" / "zero.jpg").write_bytes(b"")  # two files to skip
    (root / "train" / "blue" / "notes.png").write_text("not a picture")
    (root / "train" / "red" / "scan.tif").write_bytes(b"II*\0")  # not read, but said so
    return root


def test_train_on_a_folder_then_on_its_shards(tmp_path, photo_dir):
    common = ["--image_size=32,32", "--train_steps=6", "--batch_size=16", "--eval_every=6",
              "--bad_images=skip"]
    folder = run_train("--dataset=folder", f"--data_dir={photo_dir}",
                       f"--model_dir={tmp_path / 'folder'}", *common)
    assert folder.returncode == 0, folder.stderr[-2000:]
    assert "folder train: 96 image files (2 classes) of 32x32x3" in folder.stderr
    assert "skipping 2 of 98 files" in folder.stderr
    assert "not reading 1 file of other types (.tif 1)" in folder.stderr
    assert "folder train: decoded, then resized to 32x32 where they differ" in folder.stderr
    listed = (tmp_path / "folder" / "skipped_images.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [
        str(photo_dir / "train" / "blue" / "notes.png"), str(photo_dir / "train" / "red" / "zero.jpg")]
    figure = np.asarray(Image.open(tmp_path / "folder" / "reconstructions.png").convert("RGB"))
    spread = np.abs(figure[..., 0].astype(int) - figure[..., 2]).max()
    assert spread > 50  # the figure shows colour
    assert (tmp_path / "folder" / "latent_space.png").exists()  # labels from the folders

    # Written as in the README, `--output_dir=~/...`: a shell leaves that ~ to us.
    home = {"HOME": str(tmp_path)}
    shards = _prepare("--dataset=folder", f"--data_dir={photo_dir}", "--image_size=32,32",
                      "--output_dir=~/shards", "--shards=3", "--bad_images=skip", env=home)
    assert shards.returncode == 0, shards.stderr[-2000:]
    assert "wrote 112 images (32x32x3) in 6 shards" in shards.stdout
    assert "skipped 2 undecodable files" in shards.stdout
    assert "[##############################] 96/96" in shards.stderr  # the progress bar
    with pytest.raises(ConfigError, match="already holds shards: pass --overwrite"):
        prepare.convert("folder", str(tmp_path / "shards"), str(photo_dir), progress=None)
    records = run_train("--dataset=tfrecord", "--data_dir=~/shards", "--model_dir=~/records",
                        *common[1:-1], env=home)
    assert records.returncode == 0, records.stderr[-2000:]
    assert "96 examples in 3 TFRecord shard(s) of 32x32x3" in records.stderr
    assert "tfrecord train: decoded straight to 32x32, no resize" in records.stderr
    assert tf.train.latest_checkpoint(str(tmp_path / "records")).endswith("-6")  # ~ is HOME
    # Eval takes the data, size and model from the run's config.json (in-process: no
    # second TensorFlow start-up).
    evaluated = core.run(Config(mode="eval", model_dir=str(tmp_path / "records")))
    assert evaluated["step"] == 6 and evaluated["bce"] > 0


def test_eval_of_a_run_that_skipped_bad_files_skips_them_too(tmp_path):
    """A run trained with --bad_images=skip on a folder whose test split holds a file that
    is no image: --mode=eval of it failed on that file ('... to train without it'), the run's
    choice not taken from its config.json. It skips it now, as the run did; given
    --bad_images=error, the line names the file and how to leave it out."""
    for split, n in (("train", 8), ("test", 6)):
        for i, a in enumerate(colour_images(n, 16, 16, seed=n)):
            save(str(tmp_path / "photos" / split / f"{i}.png"), a)
    (tmp_path / "photos" / "test" / "notes.png").write_text("not a picture")
    run = tmp_path / "run"
    trained = run_train("--dataset=folder", f"--data_dir={tmp_path / 'photos'}",
                        "--bad_images=skip", "--train_steps=1", "--batch_size=4",
                        f"--model_dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "skipping 1 of 7 files of test" in trained.stderr
    evaluated = run_train("--mode=eval", f"--model_dir={run}")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "skipping 1 of 7 files of test" in evaluated.stderr
    refused = run_train("--mode=eval", f"--model_dir={run}", "--bad_images=error")
    assert refused.returncode == 3 and refused.stderr.splitlines()[-1] == (
        f"train.py: error: {tmp_path / 'photos' / 'test' / 'notes.png'} is not an image (Pillow "
        "cannot identify it): replace or remove it, or pass --bad_images=skip to leave it out")


def test_records_with_two_images_train_on_the_one_named(tmp_path):
    """Segmentation-style records (an image and its mask, as TFDS writes oxford_iiit_pet):
    --image_feature names the one to train on; eval takes it from config.json; without it,
    or beside data that is not TFRecords, one line and nothing written."""
    from test_sources import _write_records

    pixels, masks = colour_images(24, 16, 16, seed=3), colour_images(24, 16, 16, seed=4)
    (tmp_path / "pets").mkdir()
    for split, part in (("train", slice(0, 16)), ("test", slice(16, 24))):
        _write_records(tmp_path / "pets" / f"{split}.tfrecord", [
            {"image": tf.io.encode_png(a).numpy(), "segmentation_mask":
             tf.io.encode_png(m[..., :1]).numpy(), "label": i % 2}
            for i, (a, m) in enumerate(zip(pixels[part], masks[part]))])
    common = ["--dataset=tfrecord", f"--data_dir={tmp_path / 'pets'}", "--train_steps=2",
              "--batch_size=8"]
    unnamed = run_train(*common, f"--model_dir={tmp_path / 'unnamed'}")
    assert unnamed.returncode == 3, unnamed.stderr[-2000:]
    assert ("hold several encoded images (image, segmentation_mask) and no image/encoded "
            "feature, which would say which to train on: name it, e.g. --image_feature=image"
            ) in unnamed.stderr and "Traceback" not in unnamed.stderr
    assert not (tmp_path / "unnamed").exists()
    masked = run_train(*common, "--image_feature=segmentation_mask",
                       f"--model_dir={tmp_path / 'masks'}")
    assert masked.returncode == 0, masked.stderr[-2000:]
    assert "16 examples in 1 TFRecord shard(s) of 16x16x1" in masked.stderr
    assert "the images are the encoded files of the feature 'segmentation_mask'" in masked.stderr
    # Without the feature from config.json, the eval split would be refused as above.
    evaluated = core.run(Config(mode="eval", model_dir=str(tmp_path / "masks")))
    assert evaluated["step"] == 2 and evaluated["bce"] > 0
    wrong = run_train("--dataset=synthetic", "--image_feature=image",
                      f"--model_dir={tmp_path / 'wrong'}")
    assert wrong.returncode == 2 and not (tmp_path / "wrong").exists()
    assert ("train.py: error: --image_feature=image names the feature of TFRecord examples "
            "that holds the image: it goes with --dataset=tfrecord or tfds:NAME, not "
            "--dataset=synthetic"
            ) in wrong.stderr


# (Every other bad input has an in-process test in test_sources.py; these two prove the
# exit code and the untouched disk for a folder and for shards.)
@pytest.mark.parametrize("case", ["truncated", "no_match"])
def test_bad_data_exits_3_with_one_line_and_writes_nothing(tmp_path, case):
    data_dir, dataset = tmp_path / "data", "folder"
    if case == "truncated":
        save(str(data_dir / "a.png"), colour_images(1)[0])
        raw = (data_dir / "a.png").read_bytes()
        (data_dir / "b.png").write_bytes(raw[: len(raw) // 2])
        expected = "b.png is a truncated"
    else:
        dataset, data_dir = "tfrecord", tmp_path / "train-*.tfrecord"
        expected = "matches no files"
    model_dir = tmp_path / "run"
    proc = run_train(f"--dataset={dataset}", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                     "--train_steps=2", "--batch_size=1")
    assert proc.returncode == 3, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in proc.stderr
    assert not model_dir.exists()


def _model_weights(model_dir):
    ckpt = tf.train.latest_checkpoint(str(model_dir))
    reader = tf.train.load_checkpoint(ckpt)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(ckpt)
            if name.startswith("optimizer/_trainable_variables/")}


@pytest.mark.parametrize("kind", ["folder", "tfrecord"])
def test_kill_9_then_resume_is_exact(tmp_path, kind):
    png_tree(str(tmp_path / "imgs"), splits=(("train", 128), ("test", 8)))
    data_dir = tmp_path / "imgs"
    if kind == "tfrecord":
        assert _prepare("--dataset=folder", f"--data_dir={data_dir}", "--shards=4",
                        f"--output_dir={tmp_path / 'shards'}").returncode == 0
        data_dir = tmp_path / "shards"
    steps = 240

    def flags(model_dir):
        return [f"--dataset={kind}", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                f"--train_steps={steps}", "--batch_size=16", "--steps_per_loop=5",
                "--checkpoint_every_steps=20", "--eval_every=100000", "--deterministic",
                "--seed=4"]

    whole = run_train(*flags(tmp_path / "whole"))  # a subprocess: --deterministic is
    assert whole.returncode == 0, whole.stderr[-2000:]  # process-wide, not for pytest's
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                             *flags(tmp_path / "cut")], cwd=ROOT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not tf.train.latest_checkpoint(str(tmp_path / "cut")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = int(tf.train.latest_checkpoint(str(tmp_path / "cut")).rsplit("-", 1)[1])
    assert killed_at < steps, "the run finished before the kill: nothing was tested"
    resumed = run_train(*flags(tmp_path / "cut"))
    assert resumed.returncode == 0 and f"(step {killed_at})" in resumed.stderr, resumed.stderr
    a, b = _model_weights(tmp_path / "whole"), _model_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) >= 8
    assert max(float(np.max(np.abs(a[k] - b[k]))) for k in a) <= 1e-6


def _top_strip_cells(folder, tag, size):
    """The mean of each image of the top row of image summary `tag` (rows of size x size
    images side by side, as `Summaries.image_rows` lays them out) in `folder`."""
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    png = acc.Tensors(tag)[0].tensor_proto.string_val[2]
    strip = tf.io.decode_png(png).numpy()[:size].astype(float)
    return [round(strip[:, i:i + size].mean()) for i in range(0, strip.shape[1], size)]


def test_the_figures_show_every_class_of_a_folder(tmp_path):
    """A folder's split is in path order, a class after another (and so are shards written
    from it): the images the figures and TensorBoard show are spread over the split, so
    they show both classes, not the first class alone."""
    for split in ("train", "test"):
        for name, value in (("black", 0), ("white", 255)):
            for i in range(12):
                save(str(tmp_path / "photos" / split / name / f"{i:02d}.png"),
                     np.full((16, 16, 3), value, np.uint8))
    proc = run_train("--dataset=folder", f"--data_dir={tmp_path / 'photos'}", "--train_steps=2",
                     "--batch_size=8", "--eval_every=2", "--num_images=8", "--augment=flip",
                     f"--model_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _top_strip_cells(tmp_path / "run" / "eval", "reconstructions", 16) == [0] * 4 + [255] * 4
    assert _top_strip_cells(tmp_path / "run" / "train", "augmented", 16) == [0] * 4 + [255] * 4


def test_a_stopped_prepare_is_one_line_and_its_part_of_the_shards_is_refused(tmp_path):
    """Ctrl-C during core.prepare was a KeyboardInterrupt traceback, and it left shards
    0..k and NAME.tmp of shard k+1 without dataset_info.json: train.py read those, the
    .tmp as a shard too, on part of the data without a word. --overwrite then left an
    earlier set of another count beside the new one, and both were read."""
    out = tmp_path / "shards"
    proc = subprocess.Popen([sys.executable, "-m", "core.prepare", "--dataset=fontdigits",
                             "--splits=train[:16000]", "--shards=4", "--png_compression=9",
                             f"--output_dir={out}"], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    seen = b""
    while b"/16,000" not in seen or not list(out.glob("train-00000-of-00004")):
        chunk = proc.stderr.read1(4096)
        assert chunk, seen[-2000:]  # it ended before its first shard
        seen += chunk
    proc.send_signal(signal.SIGINT)
    seen += proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGINT, seen[-2000:]
    last = seen.decode().replace("\r", "\n").splitlines()[-1]
    assert last == (f"prepare: stopped by SIGINT: {out} holds only the shards written so far, "
                    "if any; run the same command with --overwrite to write them all")
    assert "Traceback" not in seen.decode()
    names = sorted(os.listdir(out))
    assert "dataset_info.json" not in names and "train-00000-of-00004" in names
    assert "train-00003-of-00004" not in names, "the prepare ended before the signal"
    proc = run_train("--dataset=tfrecord", f"--data_dir={out}", "--eval_split=train[:64]",
                     f"--model_dir={tmp_path / 'run'}", "--train_steps=1")
    assert proc.returncode == 3, proc.stderr[-2000:]
    missing = [f"train-0000{i}-of-00004" for i in range(4) if f"train-0000{i}-of-00004" not in names]
    assert proc.stderr.splitlines()[-1] == (
        f"train.py: error: --data_dir={out} has {4 - len(missing)} of the 4 train shards "
        f"(missing {', '.join(missing)}): a copy or a core.prepare that stopped part way? copy "
        "the missing ones, or write them again with python -m core.prepare --overwrite (it "
        f"removes the old ones); to train on these alone, give them as a pattern, e.g. "
        f"--data_dir={out}/train-*")
    # As the line says, a pattern reads those shards alone (not the .tmp).
    proc = run_train("--dataset=tfrecord", f"--data_dir={out}/train-*", "--train_steps=1",
                     "--eval_split=train", f"--model_dir={tmp_path / 'part'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"in {4 - len(missing)} TFRecord shard(s)" in proc.stderr
    # --overwrite with another count: the old set and the .tmp go.
    again = _prepare("--dataset=fontdigits", "--splits=train[:2000]", "--shards=2",
                     "--overwrite", f"--output_dir={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["dataset_info.json", "train-00000-of-00002",
                                       "train-00001-of-00002"]
    # An older set beside a newer one (copied in by hand) is refused too.
    for name in ("train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003"):
        (out / name).write_bytes((out / "train-00000-of-00002").read_bytes())
    proc = run_train("--dataset=tfrecord", f"--data_dir={out}", "--eval_split=train[:64]",
                     f"--model_dir={tmp_path / 'run'}", "--train_steps=1")
    assert proc.returncode == 3 and proc.stderr.splitlines()[-1] == (
        f"train.py: error: --data_dir={out} holds 2 sets of train shards (-of-00002, "
        "-of-00003): remove the older set, or write them again with python -m core.prepare "
        "--overwrite (it removes the old ones)"), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_shards_of_train_alone_train_with_mode_train_as_prepare_says(tmp_path):
    """Shards of the training split alone (`--splits=train`): core.prepare said `train on
    them: python train.py --dataset=tfrecord --data_dir=DIR`, and that command, and even
    --mode=train, which evaluates nothing, failed for want of test-* shards. --mode=train
    now trains on them, its figures showing training images."""
    out = tmp_path / "shards"
    prepared = _prepare("--dataset=fontdigits", "--splits=train[:96]", "--shards=2",
                        f"--output_dir={out}")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    command = (f"python train.py --dataset=tfrecord --data_dir={out} --mode=train")
    assert prepared.stdout.splitlines()[-1] == (
        f"train on them: {command} (no held-out split was written to evaluate on: "
        "--splits=train[:90%],train[90%:] writes one)")
    flags = command.split()[2:]
    run = run_train(*flags, f"--model_dir={tmp_path / 'run'}", "--train_steps=2",
                    "--batch_size=16", "--eval_every=2")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{out} has no test shards: --mode=train evaluates nothing, and its figures show " \
           "training images (--eval_split=train)" in run.stderr
    assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith("-2")
    assert (tmp_path / "run" / "reconstructions.png").exists()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["eval_split"] == "train"
    # Training with evaluations needs held-out shards; so does an evaluation named by hand.
    for extra in ([], ["--mode=train", "--eval_split=test"]):
        proc = run_train(*flags[:2], *extra, f"--model_dir={tmp_path / 'evaluated'}",
                         "--train_steps=2", "--batch_size=16")
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == (
            f"train.py: error: --data_dir={out} has no test-* TFRecord shards (it has shards "
            "of train): name one of those in --train_split or --eval_split (with --mode=train, "
            "which evaluates nothing, give no --eval_split), or write them with python -m "
            "core.prepare, or name the split's files test-00000-of-00001 (or test.tfrecord) "
            "and so on")
        assert not (tmp_path / "evaluated").exists()
    # Nor can the shards be sliced into one, by core.prepare (it said 'percentages need the
    # split size') or train.py: records stream in the order written, often class by class.
    sliced = _prepare("--dataset=tfrecord", f"--data_dir={out}", "--splits=train[:90%],train[90%:]",
                      f"--output_dir={tmp_path / 'sliced'}")
    assert sliced.returncode == 2, sliced.stderr[-2000:]
    assert sliced.stderr.splitlines()[-1] == (
        "prepare: error: split 'train[:90%]': TFRecord splits cannot be sliced (records are "
        "streamed in the order they were written, often class by class): name the whole split "
        "(train), or write the slices from the images the shards came from, e.g. python -m "
        "core.prepare --dataset=folder --splits=train[:90%],train[90%:]")
    assert not (tmp_path / "sliced").exists()
    # Shards of a held-out split alone evaluate a run; one image is one image.
    held_out = _prepare("--dataset=fontdigits", "--splits=test[:1]", "--shards=1",
                        f"--output_dir={tmp_path / 'one'}")
    assert held_out.returncode == 0, held_out.stderr[-2000:]
    assert held_out.stdout.splitlines()[0].startswith("wrote 1 image (28x28x1) in 1 shard, ")
    assert held_out.stdout.splitlines()[-1] == (
        "evaluate a run on them: python train.py --dataset=tfrecord "
        f"--data_dir={tmp_path / 'one'} --mode=eval --model_dir=RUN")



def test_data_this_user_may_not_read_is_one_line_each(tmp_path):
    """A folder or shard this user may not read (another user's, a mount's): a class folder
    or the data folder was TensorFlow's PermissionDeniedError traceback, a shard 'not a
    readable TFRecord file (... {{function_node ...}} ...): write the shards again' and
    dataset_info.json 'not readable JSON: delete it'. Root reads every file whatever its
    mode, so as root the runs go without the capabilities that let it."""
    png_tree(str(tmp_path / "photos"), splits=(("train", 12), ("test", 4)))
    shards = tmp_path / "shards"
    prepared = _prepare("--dataset=folder", f"--data_dir={tmp_path / 'photos'}",
                        f"--output_dir={shards}", "--shards=2")
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    for copy in ("class", "root", "split"):
        shutil.copytree(tmp_path / "photos", tmp_path / copy)
    for copy in ("info", "counted"):  # shards without dataset_info.json are counted
        shutil.copytree(shards, tmp_path / copy)
    (tmp_path / "counted" / "dataset_info.json").unlink()
    locked = [tmp_path / "class" / "train" / "dog", tmp_path / "root",
              tmp_path / "split" / "train", tmp_path / "info" / "dataset_info.json",
              tmp_path / "counted" / "train-00001-of-00002"]
    cases = [dict(dataset="folder", data_dir=str(tmp_path / "class")),
             dict(dataset="folder", data_dir=str(tmp_path / "root")),
             dict(dataset="folder", data_dir=str(tmp_path / "split"), train_split="train",
                  eval_split="test"),
             dict(dataset="tfrecord", data_dir=str(tmp_path / "info")),
             dict(dataset="tfrecord", data_dir=str(tmp_path / "counted"))]
    expected = [f"{locked[0]} is not readable (permission denied): fix its permissions, or "
                f"move it out of {tmp_path}/class/train",
                f"--data_dir={locked[1]} is not readable (permission denied): fix its "
                "permissions"] + [
                f"{path} is not readable (permission denied): fix its permissions"
                for path in locked[2:]]
    for path in locked:
        path.chmod(0)
    try:
        seen = run_unprivileged([dict(kw, model_dir=str(tmp_path / "run"), train_steps=1,
                                      batch_size=4) for kw in cases])
    finally:
        for path in locked:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert seen == [f"{line} (exit 3)" for line in expected]
    assert not (tmp_path / "run").exists()
