"""train.py's flags: flag files and later flags, --help without TensorFlow, stray
arguments, and a CPU run's stderr."""

import glob
import os
import subprocess
import sys

import pytest

from helpers import ROOT, run_train

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.cfg")))


@pytest.fixture
def parse():
    """Parses a train.py command line in this process; returns its Config."""
    import train

    def parse_argv(*args):
        argv = ["train.py", *args]
        train.FLAGS.unparse_flags()
        train.FLAGS(argv)
        return train.config_from_flags(argv)

    yield parse_argv
    train.FLAGS.unparse_flags()


@pytest.mark.parametrize("config_file", CONFIGS, ids=os.path.basename)
def test_a_later_flag_overrides_the_flag_file(parse, config_file):
    steps = parse(f"--flagfile={config_file}", "--train_steps=50")
    assert steps.train_steps == 50 and steps.epochs is None
    epochs = parse(f"--flagfile={config_file}", "--epochs=2")
    assert epochs.epochs == 2 and epochs.train_steps is None
    # And the flag file's own choice stands when nothing overrides it.
    plain = parse(f"--flagfile={config_file}")
    assert (plain.epochs is None) != (plain.train_steps is None)


@pytest.mark.parametrize("config_file", CONFIGS, ids=os.path.basename)
def test_a_flag_file_opens_with_its_command_and_what_it_reaches(config_file):
    with open(config_file) as f:
        header = "".join(line for line in iter(f.readline, "") if line.startswith("#"))
    assert f"python train.py --flagfile=configs/{os.path.basename(config_file)}" in header
    assert "# Expect" in header, "say what the run reaches (measured), or why it was not"


def test_the_fast_recipe_takes_the_data_splits_and_seed_from_the_command_line(parse):
    config = parse("--flagfile=" + os.path.join(ROOT, "configs", "fast_mnist.cfg"),
                   "--data_dir=/data/mnist", "--train_split=test[2000:]",
                   "--eval_split=test[:2000]", "--seed=3")
    assert (config.data_dir, config.train_split, config.eval_split, config.seed) == (
        "/data/mnist", "test[2000:]", "test[:2000]", 3)
    assert config.dataset == "mnist" and config.model == "seed"


def test_the_last_of_epochs_and_train_steps_wins_on_the_command_line(parse, caplog):
    with caplog.at_level("INFO", logger="absl"):  # --verbosity=0: parsing resets the level
        assert parse("--verbosity=0", "--epochs=3", "--train_steps=7").train_steps == 7
        assert parse("--verbosity=0", "--train_steps=7", "--epochs=3").epochs == 3
    # The log says which set the length: --train_steps=10 --epochs=2 trained 468 steps unsaid.
    assert ("--train_steps=7 and --epochs=3 both given: the later, --epochs=3, sets the run's "
            "length") in caplog.text
    assert "--epochs=3 and --train_steps=7 both given: the later, --train_steps=7" in caplog.text


def test_help_imports_no_tensorflow_and_lists_the_models():
    code = ("import sys, runpy; sys.argv = ['train.py', '--helpshort']\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "One of: seed, keras_blog, denoiser, vae" in proc.stdout
    assert "folder, tfrecord, or tfds:NAME[/CONFIG]" in " ".join(proc.stdout.split())  # all kinds
    # The docstring's continuation lines survive (no collapsed backslash-newline).
    assert "--model_dir=runs/mnist-test \\\n" in proc.stdout


def test_a_stray_argument_is_one_line(tmp_path):
    proc = run_train("oops", f"--model_dir={tmp_path}/run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "train.py: error: unexpected arguments oops: flags take the form --name=value")
    assert "USAGE" not in proc.stderr and "flags:" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_a_cpu_run_prints_no_cuda_error_nor_tensorflow_info(tmp_path):
    """On a machine without an NVIDIA driver, CUDA's failed initialisation stays quiet (in
    train.py, core.prepare and the benchmarks); so do the INFO lines TensorFlow's Python
    modules write with absl's logger, ours stay."""
    assert not os.path.exists("/proc/driver/nvidia/version")  # this suite runs on CPUs
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--dataset=synthetic",
                           "--synthetic_shape=8,8,1", "--train_steps=2", "--batch_size=16",
                           f"--model_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cuInit" not in proc.stderr
    assert "checkpoints.py" in proc.stderr and "saved checkpoint" in proc.stderr  # ours
    assert "functional_saver.py" not in proc.stderr  # "Sharding callback duration: 37 us"
    prepared = subprocess.run([sys.executable, "-m", "core.prepare", "--dataset=synthetic",
                               "--splits=test[:8]", f"--output_dir={tmp_path}/shards"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    assert "wrote 8 images" in prepared.stdout and "cuInit" not in prepared.stderr
    benchmark = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "op_profile.py"),
                                "--model=nope", f"--output_dir={tmp_path}/report"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=300)
    assert benchmark.returncode == 2 and "op_profile.py: error: --model=nope" in benchmark.stderr
    assert "cuInit" not in benchmark.stderr, benchmark.stderr[-2000:]


def test_a_run_of_the_fork_server_is_a_fresh_interpreters_run(tmp_path):
    """The tests' train.py runs are forks of a process that has imported TensorFlow
    (tests/forkserver.py): each gives the fresh interpreter's exit code, output and
    weights, and a run past its timeout is killed as subprocess.run kills it."""
    import helpers

    flags = ["--dataset=synthetic", "--synthetic_shape=8,8,1", "--train_steps=3",
             "--batch_size=16", "--log_every=1", "--deterministic", "--eval_every=3"]
    runs = {}
    for how in ("fork", "fresh"):
        proc = run_train(*flags, f"--model_dir={tmp_path / how}", fresh=how == "fresh")
        assert proc.returncode == 0, (how, proc.stderr[-2000:])
        runs[how] = proc
    if not helpers.FRESH:  # (TAPELOOP_TESTS_FRESH=1 makes both fresh)
        assert "oneDNN custom operations" not in runs["fork"].stderr  # TensorFlow's import
        assert "oneDNN custom operations" in runs["fresh"].stderr

    def logged(proc):  # the log lines without their time, thread id and speed
        return [line.split("] ", 1)[1].split(" ex/s")[0].rsplit("|", 1)[0]
                for line in proc.stderr.splitlines() if " | step " in line]

    assert logged(runs["fork"]) == logged(runs["fresh"]) and len(logged(runs["fork"])) == 4
    import numpy as np
    import tensorflow as tf

    fork, fresh = (tf.train.load_checkpoint(str(tmp_path / how / "ckpt-3")) for how in runs)
    names = fork.get_variable_to_shape_map()
    assert names == fresh.get_variable_to_shape_map()
    for name in names:
        assert np.array_equal(fork.get_tensor(name), fresh.get_tensor(name)), name
    bad = [run_train("--batch_size=0", fresh=how == "fresh") for how in runs]
    assert [p.returncode for p in bad] == [2, 2] and bad[0].stderr == bad[1].stderr
    assert bad[0].stdout == bad[1].stdout == ""
    with pytest.raises(subprocess.TimeoutExpired):
        run_train(*flags[:3], "--train_steps=100000", f"--model_dir={tmp_path / 'long'}",
                  timeout=15)
