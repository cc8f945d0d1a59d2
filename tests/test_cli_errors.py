"""Bad input through train.py: one line naming the problem and the fix, a non-zero
exit, no traceback, and the existing checkpoints untouched."""

import gzip
import os
import shutil

import pytest

from helpers import ROOT, checkpoint_files, run_train


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, idx_dir):
    model_dir = tmp_path_factory.mktemp("trained")
    proc = run_train("--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:512]",
                     "--eval_split=test[9900:]", f"--model_dir={model_dir}", "--train_steps=4",
                     "--batch_size=64", "--log_every=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(model_dir)


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory, idx_dir):
    folder = tmp_path_factory.mktemp("broken")
    raw = gzip.compress(open(os.path.join(idx_dir, "t10k-images-idx3-ubyte"), "rb").read())
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(raw[:5000])
    shutil.copy(os.path.join(idx_dir, "t10k-labels-idx1-ubyte"), folder)
    return str(folder)


def _cases(idx_dir, broken):
    mnist = ["--dataset=mnist", "--train_split=test[:512]", "--eval_split=test[9900:]"]
    return [
        (["--dataset=imagenet"], 2, "--dataset='imagenet' is unknown: choose one of fontdigits"),
        (["--dataset=folder:photos"], 2, "--dataset='folder:photos': the path goes in its own "
                                         "flag: --dataset=folder --data_dir=photos"),
        (["--model=unet"], 2, "--model='unet' is unknown: choose one of seed"),
        (["--loss=l2"], 2, "--loss=l2: 'l2' is unknown: choose from bce, mse, l1, charbonnier, "
                           "ssim"),
        (["--loss=l1+ssim", "--loss_weights=1"], 2, "gives 1 weight(s) for the 2 loss(es)"),
        (["--batch_size=0"], 2, "--batch_size=0: must be a positive whole number"),
        (["--eval_batch_size=0"], 2, "--eval_batch_size=0: must be a positive whole number"),
        (["--strategy=mirrored", "--num_cpu_devices=2", "--eval_batch_size=5"], 2,
         "--eval_batch_size=5 does not divide evenly over 2 replicas: use a multiple of 2, "
         "e.g. --eval_batch_size=4 or --eval_batch_size=6"),
        (["--learning_rate=-1"], 2, "--learning_rate=-1.0: must be a positive, finite number"),
        (["--epochs=0"], 2, "--epochs=0: must be a positive whole number"),
        (["--batch_shards=0"], 2, "--batch_shards=0: must be >= 1 (1 = no split)"),
        (["--batch_shards=3"], 2, "--batch_size=256 does not divide evenly over 1 replica x 3 "
                                  "shards (--batch_shards): use a multiple of 3, e.g. "
                                  "--batch_size=255 or --batch_size=258"),
        (["--num_intra_threads=-1"], 2, "--num_intra_threads=-1: must be >= 0"),
        (["--seed=-1"], 2, "--seed=-1: must be between 0 and 4294967295"),  # a traceback
        ([*mnist, "--data_dir=/nonexistent"], 3, "--data_dir=/nonexistent is not a folder"),
        (["--dataset=mnist", "--train_split=train", f"--data_dir={idx_dir}"], 3,
         "has no train images: expected train-images-idx3-ubyte.gz or train-images-idx3-ubyte"),
        ([*mnist, f"--data_dir={broken}"], 3,
         "t10k-images-idx3-ubyte.gz: the gzip stream is truncated"),
        # absl's own parse errors, one line and exit 2 as the others (absl: two lines, 1)
        (["--resize=zoom"], 2, "flag --resize=zoom: value should be one of <crop|pad|stretch> "
                               "(python train.py --helpshort lists the flags)"),
        (["--bach_size=3"], 2, "Unknown command line flag 'bach_size'. Did you mean: batch_size"),
        (["--batch_size=abc"], 2, "flag --batch_size=abc: invalid literal for int()"),
        (["--flagfile=/nonexistent.cfg"], 2, "Unable to open flagfile: [Errno 2] No such file"),
        # absl gives a flag written without its value the next argument
        (["--keep_best", "--early_stopping_patience=2"], 2,
         "--keep_best has no value: it took the next argument, --early_stopping_patience=2, as "
         "its value; give it one as --keep_best=VALUE"),
        (["--train_actions", "--noverbose"], 2, "--train_actions has no value: it took the next "
                                                "argument, --noverbose, as its value"),
    ]


def test_bad_inputs(trained_dir, idx_dir, broken_data):
    before = checkpoint_files(trained_dir)
    assert any(name.endswith(".index") for name in before)
    for flags, code, message in _cases(idx_dir, broken_data):
        proc = run_train(*flags, f"--model_dir={trained_dir}", "--train_steps=100")
        lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
        assert proc.returncode == code, (flags, proc.stderr[-2000:])
        assert len(lines) == 1 and message in lines[0], (flags, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, flags
        assert checkpoint_files(trained_dir) == before, flags


def test_a_rejected_batch_creates_no_model_dir(tmp_path):
    """The batch check needs the strategy, not the model dir: nothing is created first."""
    model_dir = tmp_path / "new"
    proc = run_train("--batch_shards=3", f"--model_dir={model_dir}", "--dataset=synthetic")
    assert proc.returncode == 2 and "use a multiple of 3" in proc.stderr
    assert not model_dir.exists()


def test_a_model_dir_without_its_value_trains_nothing_into_a_flag_named_folder():
    """absl reads `--model_dir --eval_every=1` as --model_dir='--eval_every=1': the run
    trained into a folder of that name in the working directory."""
    stray = os.path.join(ROOT, "--eval_every=1")
    proc = run_train("--model_dir", "--eval_every=1", "--train_steps=1", "--dataset=synthetic")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.py: error: --model_dir has no value: it took the next argument, " \
           "--eval_every=1, as its value" in proc.stderr
    assert not os.path.exists(stray)


def test_two_flags_or_a_comment_on_one_flagfile_line_are_one_line_and_nothing_written(tmp_path):
    """absl reads a --flagfile line as one flag and the rest of the line as its value:
    `--model_dir=X --train_steps=5` trained the defaults into a folder named
    `X --train_steps=5`, and `--model_dir=X  # baseline` into `X  # baseline`; a number
    flag's line got absl's bare `invalid literal for int()`."""
    model_dir = tmp_path / "run"
    for line, said in [(f"--model_dir={model_dir} --train_steps=5", f"--model_dir={model_dir} "
                        "--train_steps=5: a --flagfile line is one flag"),
                       (f"--model_dir={model_dir}  # baseline", f"--model_dir={model_dir}  # "
                        "baseline: a --flagfile line is one flag"),
                       ("--train_steps=20 --eval_every=10", "flag --train_steps=20 "
                        "--eval_every=10: invalid literal for int() with base 10: '20 "
                        "--eval_every=10'; a --flagfile line is one flag, the rest of the line "
                        "its value: put each flag, and each comment (# ...), on a line of its "
                        "own"),
                       ("--train_steps=20  # short", "'20 # short'; a --flagfile line is one")]:
        flagfile = tmp_path / "experiment.cfg"
        flagfile.write_text(f"--dataset=synthetic\n{line}\n")
        proc = run_train(f"--model_dir={model_dir}", f"--flagfile={flagfile}")
        errors = [text for text in proc.stderr.splitlines() if "error:" in text]
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
        assert said in errors[0], (line, errors[0])
        assert list(tmp_path.iterdir()) == [flagfile], line
    # A path with a space (and a # not between spaces) is a path.
    photos = tmp_path / "my photos #2"
    proc = run_train("--dataset=folder", f"--data_dir={photos}", f"--model_dir={model_dir}")
    assert proc.returncode == 3 and f"--data_dir={photos} is not a folder" in proc.stderr


def test_verbose_shows_the_traceback(tmp_path):
    proc = run_train("--batch_size=0", f"--model_dir={tmp_path}", "--verbose")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "--batch_size=0" in proc.stderr


def test_a_model_dir_with_a_bracket_is_refused_with_its_checkpoints_intact(tmp_path):
    """TensorFlow writes a checkpoint under 'runs [a]/' and then cannot find its files
    ('[a]' is a set in its file pattern): such a run trained, then every restore called
    its checkpoint damaged and said to move it away. Now it is one line, before anything."""
    model_dir = tmp_path / "runs [a]"
    import tensorflow as tf

    tf.train.Checkpoint(v=tf.Variable(1.0)).save(str(model_dir / "ckpt"))
    with pytest.raises(Exception, match="Unsuccessful TensorSliceReader"):  # what TF does
        tf.train.load_checkpoint(str(model_dir / "ckpt-1"))
    before = checkpoint_files(model_dir)
    for mode in ("train", "eval"):
        proc = run_train(f"--mode={mode}", f"--model_dir={model_dir}", "--dataset=synthetic",
                         "--train_steps=1")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert (f"train.py: error: --model_dir='{model_dir}': TensorFlow reads a checkpoint's "
                "files back by a file pattern, in which '[' is a pattern character") in proc.stderr
        assert checkpoint_files(model_dir) == before
    fresh = tmp_path / "new [b]"
    assert run_train(f"--model_dir={fresh}", "--dataset=synthetic").returncode == 2
    assert not fresh.exists()


def test_a_model_dir_holding_a_name_not_in_utf8_is_one_line_with_its_checkpoints_intact(
        tmp_path):
    """A Latin-1 `café.txt` a user keeps in the run's folder: TensorFlow's folder listing
    (of the checkpoint manager) raised UnicodeDecodeError, a traceback."""
    model_dir = tmp_path / "run"
    first = run_train(f"--model_dir={model_dir}", "--dataset=synthetic", "--train_steps=2",
                      "--batch_size=8")
    assert first.returncode == 0, first.stderr[-2000:]
    (model_dir / "caf\udce9.txt").write_bytes(b"notes")  # the bytes caf\xe9.txt
    before = checkpoint_files(model_dir)
    proc = run_train(f"--model_dir={model_dir}", "--dataset=synthetic", "--train_steps=4",
                     "--batch_size=8")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"train.py: error: --model_dir={model_dir}: {model_dir}/caf\\xe9.txt has a name not "
            "in UTF-8, and TensorFlow lists folders by UTF-8 names only: rename it (for a tree "
            f"of Latin-1 names: convmv -f latin1 -t utf8 -r --notest {model_dir})") in proc.stderr
    assert "Traceback" not in proc.stderr and checkpoint_files(model_dir) == before


def _any_ms(line):
    """`line` with libcurl's elapsed time ("after 0 ms", "after 1 ms") as "after N ms"."""
    import re

    return re.sub(r"after \d+ ms", "after N ms", line)


def test_a_file_system_tensorflow_cannot_reach_is_one_line_before_anything_is_written(
        tmp_path, trained_dir, idx_dir):
    """gs:// without a network or credentials, and s3:// (TensorFlow 2.21 has no file system
    for it): TensorFlow's error was a traceback and exit 1, or for --data_dir its isdir's
    False, read as "is not a folder". The network here is a proxy on a closed local port,
    so gs:// fails alike on a machine with internet; no retries, so it fails at once."""
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "none", "GCS_RETRY_CONFIG_MAX_RETRIES": "0"}
    unreachable = ("cannot reach it (Failed to connect to 127.0.0.1 port 9 after N ms: Could "
                   "not connect to server): check the network and your credentials (gcloud "
                   "auth application-default login, or GOOGLE_APPLICATION_CREDENTIALS), then "
                   "run the same command again")
    fresh = tmp_path / "new"
    bucket = "gs://tapeloop-test-bucket"
    cases = [
        ([f"--model_dir={bucket}/run"], 2, f"--model_dir={bucket}/run: {unreachable}"),
        (["--model_dir=s3://tapeloop-test-bucket/run"], 2, "--model_dir=s3://tapeloop-test-"
         "bucket/run: TensorFlow has no file system for s3://: give a local path or a gs:// one"),
        ([f"--model_dir={trained_dir}", "--dataset=folder", f"--data_dir={bucket}/photos"], 3,
         f"--data_dir={bucket}/photos: {unreachable}"),
        ([f"--model_dir={fresh}", f"--init_checkpoint={bucket}/run"], 2,
         f"--init_checkpoint={bucket}/run: {unreachable}"),
        ([f"--model_dir={trained_dir}", "--mode=eval", f"--checkpoint={bucket}/run/ckpt-4"], 2,
         f"--checkpoint={bucket}/run/ckpt-4: {unreachable}"),
    ]
    before = checkpoint_files(trained_dir)
    for flags, code, message in cases:
        proc = run_train("--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:512]",
                         "--eval_split=test[9900:]", "--train_steps=8", *flags, env=offline)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
        assert proc.returncode == code, (flags, proc.stderr[-2000:])
        assert [_any_ms(line) for line in lines] == [f"train.py: error: {message}"], (
            flags, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, flags
        assert checkpoint_files(trained_dir) == before and not fresh.exists(), flags
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "core.prepare", "--dataset=mnist",
                           f"--data_dir={idx_dir}", "--splits=test[:64]",
                           f"--output_dir={bucket}/shards"], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **offline), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _any_ms(proc.stderr.strip().splitlines()[-1]) == (
        f"prepare: error: --output_dir={bucket}/shards: {unreachable}")


def test_model_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    proc = run_train(f"--model_dir={path}", "--dataset=synthetic", "--train_steps=1")
    assert proc.returncode == 2
    assert f"--model_dir={path} is a file" in proc.stderr
    assert path.read_text() == "x"


def test_corrupted_gzip_keeps_data_intact(broken_data):
    before = open(os.path.join(broken_data, "t10k-images-idx3-ubyte.gz"), "rb").read()
    with pytest.raises(EOFError):
        gzip.decompress(before)  # the fixture is really broken
    run_train("--dataset=mnist", f"--data_dir={broken_data}", "--train_split=test[:512]",
              "--eval_split=test[9900:]", "--train_steps=1")
    assert open(os.path.join(broken_data, "t10k-images-idx3-ubyte.gz"), "rb").read() == before
