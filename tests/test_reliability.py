"""Never lose a run: kill -9 and SIGTERM then resume, NaN policies, the model-dir lock,
config compatibility, damaged checkpoints and a full disk. Subprocesses, bounded in time."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import core
from core.checkpoints import ModelDirLock
from core.config import Config
from core import prepare
from core.errors import CheckpointError, ConfigError, WriteError
from core.summaries import read_scalars
from conftest import fill, random_images, tmpfs
from helpers import ROOT, Notebook, checkpoint_files, event_tags, run_train
from layers.autoencoders import build_autoencoder


def _flags(idx_dir, model_dir, steps, *extra):
    return ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:1024]",
            "--eval_split=test[9900:]", f"--model_dir={model_dir}", f"--train_steps={steps}",
            "--batch_size=32", "--steps_per_loop=5", "--log_every=50", "--eval_every=100000",
            "--deterministic", "--seed=3", *extra]


def _weights(checkpoint):
    """The model's weights in `checkpoint`, by variable path (restored into a fresh model)."""
    model = build_autoencoder("seed")
    tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial().assert_existing_objects_matched()
    return {v.path: v.numpy() for v in model.weights}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _start(flags, env=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(model_dir, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tf.train.latest_checkpoint(str(model_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError("run ended before its first checkpoint: "
                                 + proc.stderr.read()[-2000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint in time")


STEPS = 1500


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, idx_dir):
    model_dir = tmp_path_factory.mktemp("whole")
    proc = run_train(*_flags(idx_dir, model_dir, STEPS, "--checkpoint_every_steps=50"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _weights(tf.train.latest_checkpoint(str(model_dir)))


def test_kill_9_at_a_random_moment_then_resume_is_exact(tmp_path, idx_dir, uninterrupted):
    flags = _flags(idx_dir, tmp_path, STEPS, "--checkpoint_every_steps=50")
    proc = _start(flags)
    _wait_for_checkpoint(tmp_path, proc)
    time.sleep(random.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = int(tf.train.latest_checkpoint(str(tmp_path)).rsplit("-", 1)[1])
    assert killed_at < STEPS, "the run finished before the kill: nothing was tested"
    resumed = run_train(*flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {killed_at})" in resumed.stderr  # restored where it was killed
    final = _weights(tf.train.latest_checkpoint(str(tmp_path)))
    assert _max_diff(final, uninterrupted) <= 1e-6


def test_sigterm_checkpoints_exits_75_and_resumes(tmp_path, idx_dir, uninterrupted):
    flags = _flags(idx_dir, tmp_path, STEPS, "--checkpoint_every_steps=50")
    proc = _start(flags)
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("train.py: stopped by SIGTERM at step")]
    assert len(line) == 1 and "resume" in line[0]
    stopped_at = int(line[0].split("at step ")[1].split()[0])
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith(f"-{stopped_at}")
    resumed = run_train(*flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {stopped_at})" in resumed.stderr
    assert _max_diff(_weights(tf.train.latest_checkpoint(str(tmp_path))), uninterrupted) <= 1e-6


def test_sigterm_exits_75_when_stderr_is_a_closed_pipe(tmp_path, idx_dir):
    """`train.py ... 2>&1 | head`, once head has exited: the stop's line cannot be
    written, and the exit code is still 75 (checkpoint saved: resume), not Python's 1
    for the BrokenPipeError, which it was."""
    proc = _start(_flags(idx_dir, tmp_path, 100000, "--checkpoint_every_steps=50"))
    try:
        _wait_for_checkpoint(tmp_path, proc)
        proc.stderr.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75
    finally:
        proc.kill()
        proc.wait()
    assert tf.train.latest_checkpoint(str(tmp_path))


def test_second_signal_exits_at_once_even_inside_a_long_loop(tmp_path, tmp_path_factory,
                                                              idx_dir):
    """A loop of 3000 steps takes many seconds; the second SIGINT must not wait for it. The
    exit skips Python's atexit handlers, yet leaves none of AutoGraph's temporary files."""
    first = run_train(*_flags(idx_dir, tmp_path, 20, "--model=denoiser"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = checkpoint_files(tmp_path)
    temp = tmp_path_factory.mktemp("temp")  # the run's temporary dir (Python's tempfile)
    proc = _start(_flags(idx_dir, tmp_path, 20_000, "--steps_per_loop=3000",
                         "--model=denoiser", "--log_every=3000",
                         "--nodata_on_device"),  # tf.data's map functions: AutoGraph's
                   env={"TMPDIR": str(temp)})
    for line in proc.stderr:  # the first step ran alone: the long loop starts now
        if "compiled in" in line:
            break
    time.sleep(1.0)
    assert list(temp.glob("__autograph_generated_file*.py"))  # the functions it converted
    proc.send_signal(signal.SIGINT)
    acknowledged = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "SIGINT received" in acknowledged
    # 130, and no checkpoint at the loop's end: the process did not wait for the loop to
    # finish (a run that did would save ckpt-3021 and exit 75).
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "second signal (SIGINT): exiting now" in err and "train | step" not in err
    assert checkpoint_files(tmp_path) == before  # the last complete checkpoint, intact
    assert not list(temp.glob("__autograph_generated_file*"))
    resumed = run_train(*_flags(idx_dir, tmp_path, 25, "--model=denoiser"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 20)" in resumed.stderr


_NOTEBOOK_TRAINING = """
import sys, traceback
from absl import logging
logging.set_verbosity(logging.INFO)
import core
from core.config import Config

def config(steps, **more):
    return Config(dataset="mnist", data_dir=sys.argv[1], train_split="test[:1024]",
                  eval_split="test[9900:]", model_dir=sys.argv[2], model="denoiser",
                  train_steps=steps, epochs=None, batch_size=32, eval_every=100000,
                  deterministic=True, seed=3, **more)

# A notebook's cells: training interrupted by two Ctrl-Cs, then training on.
try:
    core.run(config(20_000, steps_per_loop=1000, log_every=1000))
    print("first finished", flush=True)
except KeyboardInterrupt:
    frames = traceback.extract_tb(sys.exc_info()[2])
    print("first interrupted in", " < ".join(f.name for f in frames[::-1][:2]), flush=True)
print("again finished at step", core.run(config(25))["step"], flush=True)
"""


def test_two_ctrl_cs_from_python_interrupt_training_and_the_process_goes_on(tmp_path, idx_dir):
    """From Python (a notebook), the second Ctrl-C of a training run raised
    KeyboardInterrupt wherever the run was, or, since the first was taken over, exited the
    process: the kernel, and all the notebook held, gone. Now it raises KeyboardInterrupt
    without saving as soon as the compiled loop returns (at the controller's safe point),
    and the same process resumes from the last complete checkpoint."""
    first = run_train(*_flags(idx_dir, tmp_path, 20, "--model=denoiser"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = checkpoint_files(tmp_path)
    with Notebook(_NOTEBOOK_TRAINING, idx_dir, tmp_path) as notebook:
        notebook.wait_for("compiled in")  # the first step ran alone: the long loop starts now
        notebook.ctrl_c()
        assert "press it again to interrupt without saving" in notebook.wait_for(
            "SIGINT received")
        notebook.ctrl_c()
        notebook.wait_for("first interrupted", "first finished")
        interrupted = checkpoint_files(tmp_path)
        code, out = notebook.finish()
    assert code == 0, out[-3000:]
    assert "second Ctrl-C: KeyboardInterrupt, without saving" in out
    assert "first interrupted in interruption_point < train\n" in out, out[-3000:]
    assert interrupted == before  # no save at the loop's end
    assert "(step 20)" in out.split("first interrupted")[1]  # resumed there
    assert "again finished at step 25\n" in out, out[-3000:]


@pytest.mark.parametrize("policy", ["stop", "rollback"])
def test_nan_guard(tmp_path, idx_dir, policy):
    """A learning rate of 1e30 from step 20 on makes the loss blow up in the next loop:
    the policy sees a real non-finite loss, through the command line alone."""
    good = run_train(*_flags(idx_dir, tmp_path, 20, "--checkpoint_every_steps=10",
                             "--learning_rate=0.004", "--log_every=5"))
    assert good.returncode == 0, good.stderr[-2000:]
    before = checkpoint_files(tmp_path)
    flags = _flags(idx_dir, tmp_path, 60, "--checkpoint_every_steps=10", f"--nan_policy={policy}",
                   "--learning_rate=1e30", "--nan_lr_factor=0.5", "--log_every=5")
    proc = run_train(*flags)
    if policy == "stop":
        assert proc.returncode == 4, proc.stderr[-2000:]
        line = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")][0]
        # Step 21 ran alone (the first, compiling call), with a still-finite loss.
        assert "the training loss became" in line and "between step 21 and 25" in line
        assert "last good checkpoint" in line and "ckpt-20" in line
        assert checkpoint_files(tmp_path) == before  # nothing saved after the NaN, nothing lost
        assert all(np.isfinite(w).all() for w in _weights(str(tmp_path / "ckpt-20")).values())
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "rollback 1/3" in proc.stderr and "restored" in proc.stderr
        latest = tf.train.latest_checkpoint(str(tmp_path))
        assert latest.endswith("ckpt-60")
        assert all(np.isfinite(w).all() for w in _weights(latest).values())
        # The rollback restored ckpt-20's rate (0.004) and halved it.
        rates = [v for s, v in event_tags(str(tmp_path / "train"))["learning_rate"] if s > 25]
        assert rates and all(r == pytest.approx(0.002) for r in rates)


def _tensorboard_scalars(folder, tag):
    """[(step, value)] of `tag` as TensorBoard's Python loader (`--load_fast=false`) serves
    them: its own accumulator, orphaned data purged as TensorBoard does by default."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    acc = plugin_event_accumulator.EventAccumulator(folder, size_guidance={"tensors": 0},
                                                    purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


def test_each_rollback_lowers_the_rate_again_and_tensorboard_keeps_the_last_steps(
        tmp_path, idx_dir):
    """The rate jumps to 1e30 at step 27, so every retry of steps 26-30 blows up: both
    rollbacks go back to ckpt-20, and each lowers the rate again (the checkpoint's rate
    halved twice would repeat the first retry's NaN). Each retry, and then a resume from
    ckpt-20, logs step 25 again: TensorBoard shows it once, as last written."""
    schedule = ["--checkpoint_every_steps=10", "--log_every=5", "--lr_schedule=piecewise",
                "--lr_boundaries=27", "--lr_values=0.004,1e30", "--nan_policy=rollback",
                "--nan_max_retries=2", "--nan_lr_factor=0.5", "--mode=train"]
    failed = run_train(*_flags(idx_dir, tmp_path, 40, *schedule))
    assert failed.returncode == 4, failed.stderr[-2000:]
    rates = re.findall(r"rollback (\d)/2: .* restored \S+ckpt-20 \(step 20\), learning rate now "
                       r"(\S+)", failed.stderr)
    # The base rate is --learning_rate's 0.003; the schedule's 0.004 before step 27 is 4/3 of it.
    assert rates == [("1", "0.0015"), ("2", "0.00075")], failed.stderr[-2000:]
    assert _tensorboard_scalars(str(tmp_path / "train"), "learning_rate")[4:] == [
        (25, pytest.approx(0.001))]  # the second retry's, 0.00075 x 4/3
    resumed = run_train(*_flags(idx_dir, tmp_path, 25, *schedule))  # stops before step 27
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 20" in resumed.stderr
    shown = _tensorboard_scalars(str(tmp_path / "train"), "learning_rate")
    assert shown == [(s, pytest.approx(0.004)) for s in (5, 10, 15, 20, 25)]
    losses = _tensorboard_scalars(str(tmp_path / "train"), "loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20, 25]
    # What the run's own curves figure reads: the same points.
    assert read_scalars(str(tmp_path / "train"), "loss") == losses


def test_nan_before_any_checkpoint_says_so(tmp_path, idx_dir):
    proc = run_train(*_flags(idx_dir, tmp_path, 30, "--learning_rate=1e30",
                             "--nan_policy=rollback"))
    assert proc.returncode == 4, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")][0]
    assert "before any checkpoint" in line and "no checkpoint to roll back to" in line
    assert "--nan_policy=rollback" not in line.split("roll back to")[1]
    assert not checkpoint_files(tmp_path)


def test_a_live_run_holds_the_model_dir(tmp_path, idx_dir):
    lock = ModelDirLock(str(tmp_path))
    lock.acquire()
    try:
        proc = run_train(*_flags(idx_dir, tmp_path, 5))
    finally:
        lock.release()
    assert proc.returncode == 5
    assert f"is in use by a live run (pid {os.getpid()}" in proc.stderr
    assert not tf.train.latest_checkpoint(str(tmp_path))


def test_two_concurrent_runs(tmp_path, idx_dir):
    # Long enough to be training still when the last command below starts.
    first = _start(_flags(idx_dir, tmp_path, 100 * STEPS, "--checkpoint_every_steps=2000"))
    try:
        _wait_for_checkpoint(tmp_path, first)
        second = run_train(*_flags(idx_dir, tmp_path, 5))
        assert second.returncode == 5 and "is in use by a live run" in second.stderr
        # Eval and export of it while it trains: the line says how, and that works.
        for mode, how in (("eval", "evaluate it while it trains, run --mode=continuous_eval "
                                   "beside it, or "), ("export", "export it while it trains, ")):
            # The run's folder as --model_dir, or as --checkpoint (whose run is the model dir).
            for given in (f"--model_dir={tmp_path}", f"--checkpoint={tmp_path}"):
                proc = run_train(f"--mode={mode}", given)
                assert proc.returncode == 5, proc.stderr[-2000:]
                assert proc.stderr.splitlines()[-1].endswith(
                    f"or choose another --model_dir; to {how}--checkpoint={tmp_path} "
                    "--model_dir=YOUR_FOLDER reads its latest checkpoint and writes into your "
                    "folder"), proc.stderr[-2000:]
            proc = run_train(f"--mode={mode}", f"--checkpoint={tmp_path}",
                             f"--model_dir={tmp_path / 'mine'}")
            assert proc.returncode == 0, proc.stderr[-2000:]
        assert list((tmp_path / "mine" / "export").iterdir())
        assert list((tmp_path / "mine").glob("eval_ckpt-*/eval_results.json"))
    finally:
        first.kill()
        first.communicate(timeout=60)


def test_a_stale_lock_is_taken_over(tmp_path, idx_dir):
    (tmp_path / ".lock").write_text("pid 999999 on a-crashed-host")
    proc = run_train(*_flags(idx_dir, tmp_path, 5))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "taking over the stale lock" in proc.stderr and "999999" in proc.stderr


def test_incompatible_and_harmless_resume(tmp_path, idx_dir):
    assert run_train(*_flags(idx_dir, tmp_path, 10)).returncode == 0
    before = checkpoint_files(tmp_path)
    bad = run_train(*_flags(idx_dir, tmp_path, 20, "--kernel_size=3", "--encoder_filters=8,8,4"))
    assert bad.returncode == 2
    line = [x for x in bad.stderr.splitlines() if x.startswith("train.py: error:")][0]
    assert "holds a different model" in line
    assert "encoder_filters: None -> [8, 8, 4]" in line and "kernel_size: None -> 3" in line
    assert "to resume it, give its settings (without --encoder_filters, --kernel_size;" in line
    assert checkpoint_files(tmp_path) == before
    ok = run_train(*_flags(idx_dir, tmp_path, 20, "--log_every=7"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "resuming with train_steps changed: 10 -> 20" in ok.stderr
    assert "resuming with log_every changed: 50 -> 7" in ok.stderr
    # What the saved run resolved is not a change this run asked for.
    assert "resuming with resolved_" not in ok.stderr
    assert "trained on other data" not in ok.stderr
    # Other data in the same dir: most often a forgotten --model_dir, so a warning says so.
    other = run_train(*_flags(idx_dir, tmp_path, 30, "--train_split=test[512:1024]"))
    assert other.returncode == 0, other.stderr[-2000:]
    assert (f"--model_dir={tmp_path} was trained on other data (train_split 'test[:1024]' -> "
            "'test[512:1024]')") in other.stderr
    # A new batch size moves the data's position (step x examples a step): said, with the
    # count skipped and the flags that keep the order.
    bigger = run_train(*_flags(idx_dir, tmp_path, 36, "--train_split=test[512:1024]",
                               "--batch_size=16", "--grad_accum_steps=4"))
    assert bigger.returncode == 0, bigger.stderr[-2000:]
    assert ("resuming with 64 examples a step where the run had 32: the data order goes on "
            "from step 30, which is example 1,920 of the epochs' order at 64 a step and was 960 "
            "at 32, so 960 examples of it are skipped; the epoch column and --epochs count "
            "steps of 64 from here. Resume with --batch_size=32 for the run's own order"
            ) in bigger.stderr
    assert "examples a step where" not in ok.stderr + other.stderr


def _config(tmp_path, idx_dir, **kw):
    base = dict(dataset="mnist", data_dir=idx_dir, train_split="test[:512]",
                eval_split="test[9900:]", model_dir=str(tmp_path), batch_size=32, train_steps=10,
                epochs=None, log_every=5, eval_every=100000, strategy="default")
    base.update(kw)
    return Config(**base)


def test_corrupted_and_deleted_checkpoints(tmp_path, idx_dir):
    core.run(_config(tmp_path, idx_dir, checkpoint_every_steps=5))
    latest = tf.train.latest_checkpoint(str(tmp_path))
    data_file = latest + ".data-00000-of-00001"
    raw = open(data_file, "rb").read()
    open(data_file, "wb").write(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"checkpoint .*ckpt-10 is damaged: its files do "
                                              r"not read back"):
        core.run(_config(tmp_path, idx_dir, train_steps=20))
    # What the message says to do works: the state file and the damaged files moved away.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in [n for n in os.listdir(tmp_path) if n.startswith("ckpt-10.") or n == "checkpoint"]:
        os.rename(tmp_path / name, moved / name)
    assert core.run(_config(tmp_path, idx_dir, train_steps=20))["step"] == 20  # from ckpt-5
    for name in os.listdir(moved):
        os.rename(moved / name, tmp_path / name)
    open(data_file, "wb").write(raw)
    for name in os.listdir(tmp_path):  # every checkpoint file gone, the state file left
        if name.startswith("ckpt-"):
            os.remove(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"checkpoint names .*ckpt-10, whose files are missing"):
        core.run(_config(tmp_path, idx_dir, train_steps=20))


def _leftovers(folder):
    return [name for _, dirs, files in os.walk(folder) for name in dirs + files
            if "tmp" in name or "_temp" in name or name.startswith(".write-test")]


def test_a_full_disk_loses_nothing(small_disk, tmp_path, idx_dir):
    """A disk that fills up: each write that fails is one line naming the file and the
    system's reason, leaves no half-written file, and the checkpoints stay as they were."""
    run = small_disk / "run"
    core.run(_config(run, idx_dir))
    before = checkpoint_files(run)
    fill(small_disk, 20)  # the run starts; a write after it fails, and the checkpoint too
    with pytest.raises(CheckpointError, match=r"^could not write the checkpoint at step \d+ in "
                       r".*run \(No space left on device\): free space or fix permissions, then "
                       r"rerun to resume from .*run/ckpt-10, which is intact$"):
        core.run(_config(run, idx_dir, train_steps=20))
    assert checkpoint_files(run) == before
    assert _leftovers(run) == []
    os.remove(small_disk / "filler")
    fill(small_disk, 20)
    with pytest.raises(WriteError, match=r"^could not write the export .*run/export/10 \(No "
                       r"space left on device\): free space or fix permissions, then run the "
                       r"same command again$"):
        core.run(_config(run, idx_dir, mode="export"))
    assert os.listdir(run / "export") == []
    assert checkpoint_files(run) == before

    os.remove(small_disk / "filler")
    fill(small_disk, 0)
    with pytest.raises(ConfigError, match=r"is not writable \(No space left on device\): free "
                                          r"space on it, then run the same command again$"):
        core.run(_config(run, idx_dir, train_steps=20))
    # --cache's shards and core.prepare's: nothing half written is left to be read later.
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, image in enumerate(random_images(40, (32, 32, 3))):
        tf.io.write_file(str(photos / f"{i}.png"),
                         tf.io.encode_png(tf.image.convert_image_dtype(image, tf.uint8)))
    cache = small_disk / "cache"
    with pytest.raises(WriteError, match=r"^could not write the --cache shards of train\[.*\] in "
                       r".*cache \(No space left on device\): free space there or give another "
                       r"--cache, then run the same command again$"):
        core.run(Config(dataset="folder", data_dir=str(photos), model_dir=str(tmp_path / "c"),
                        cache=str(cache), train_steps=2, batch_size=4, strategy="default"))
    assert os.listdir(cache) == []
    with pytest.raises(WriteError, match=r"^could not write the shards in .*prepared \(No space "
                       r"left on device\): free space there, then run the same command again "
                       r"\(the shards written are removed\)$"):
        prepare.convert("folder", str(small_disk / "prepared"), str(photos), progress=None)
    assert os.listdir(small_disk / "prepared") == []
    assert checkpoint_files(run) == before

    os.remove(small_disk / "filler")  # space again: the same command resumes from ckpt-10
    assert core.run(_config(run, idx_dir, train_steps=20))["step"] == 20

    # A new run whose first checkpoint does not fit: nothing of it is left, state file or not.
    shutil.rmtree(run)
    fill(small_disk, 20)
    with pytest.raises(CheckpointError, match=r"^could not write the checkpoint at step \d+ in "
                       r".*run \(No space left on device\): free space or fix permissions, then "
                       r"run the same command again \(the run had saved no checkpoint yet\)$"):
        core.run(_config(run, idx_dir))
    assert checkpoint_files(run) == {} and _leftovers(run) == []


def test_summaries_that_cannot_be_written_save_the_steps(tmp_path, idx_dir):
    """TensorBoard's events file passes the size a process may write (`ulimit -f`, as a
    quota or a FAT32 disk's 4 GB would stop it) while a checkpoint still fits: the run
    saves the steps it trained, says so in one line, exit 5, and the same command resumes
    there."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    flags = [f"--data_dir={idx_dir}", "--dataset=mnist", "--train_split=test[:512]",
             "--eval_split=test[9900:]", "--train_steps=40", "--log_every=5",
             "--histogram_every=1", f"--model_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), preexec_fn=limited)
    assert proc.returncode == 5, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    saved = re.fullmatch(
        r"train.py: error: could not write TensorBoard summaries to .*/train \(File too "
        r"large\): saved (.*/ckpt-(\d+)); free space or fix permissions, then run the same "
        r"command to resume", last)
    assert saved, last
    assert tf.train.latest_checkpoint(str(tmp_path)) == saved[1]
    proc = run_train(*flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"restored {saved[1]} (step {saved[2]})" in proc.stderr
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-40")

def test_a_best_checkpoint_that_cannot_be_written(tmp_path, idx_dir):
    """--keep_best's folder refuses the best checkpoint (a read-only mount here; a full disk
    alike): one line naming it and the reason, and the steps trained saved in the model
    dir; once it takes writes again, the same command goes on and keeps its best."""
    best = tmp_path / "best"
    best.mkdir()
    kw = dict(mode="train_and_eval", eval_every=10, keep_best="eval/psnr")
    with tmpfs(best, "ro,size=1m"), pytest.raises(
            WriteError, match=r"^could not write the best checkpoint at step 10 "
            r"in .*best \(Read-only file system\): saved .*/ckpt-10; free space "
            r"or fix permissions, then run the same command to resume$"):
        core.run(_config(tmp_path, idx_dir, **kw))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-10")
    assert core.run(_config(tmp_path, idx_dir, train_steps=20, **kw))["step"] == 20
    assert json.load(open(best / "best.json"))["path"].endswith("ckpt-20")



def test_unwritable_model_dir(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("x")
    proc = run_train(f"--model_dir={parent}/run", "--dataset=synthetic", "--train_steps=1")
    assert proc.returncode == 2
    assert f"--model_dir={parent}/run cannot be created" in proc.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    with tmpfs(ro, "ro,size=1m"):
        proc = run_train(f"--model_dir={ro}", "--dataset=synthetic", "--train_steps=1")
    assert proc.returncode == 2
    assert f"--model_dir={ro} is not writable (Read-only file system)" in proc.stderr


def test_a_run_that_cannot_be_written_is_evaluated_and_exported_into_a_folder_of_your_own(
        tmp_path):
    """Eval and export write their results into the model dir: of a run you cannot write to
    (a read-only mount, another user's), the line said only to choose another folder; it
    now names the flags that read its checkpoint and write elsewhere, which work."""
    run = tmp_path / "shared"
    run.mkdir()
    with tmpfs(run, "size=8m"):
        trained = run_train(f"--model_dir={run}", "--dataset=synthetic", "--train_steps=2",
                            "--eval_every=2", "--batch_size=8")
        assert trained.returncode == 0, trained.stderr[-2000:]
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(run)], capture_output=True,
                                   text=True)
        assert remounted.returncode == 0, remounted.stderr
        before = sorted(os.listdir(run))
        mine = tmp_path / "mine"
        for mode, verb, then in (
                ("eval", "evaluate", "reads its latest checkpoint and writes into your folder"),
                ("export", "export", "reads its latest checkpoint and writes into your folder"),
                ("continuous_eval", "evaluate",
                 "evaluates each new checkpoint of it into your folder")):
            proc = run_train(f"--mode={mode}", f"--model_dir={run}")
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert proc.stderr.splitlines()[-1] == (
                f"train.py: error: --model_dir={run} is not writable (Read-only file system): "
                "choose a folder you can write to or fix its permissions; to "
                f"{verb} a run you cannot write to, --checkpoint={run} --model_dir=YOUR_FOLDER "
                + then)
            # As the line says.
            proc = run_train(f"--mode={mode}", f"--checkpoint={run}", f"--model_dir={mine}")
            assert proc.returncode == 0, proc.stderr[-2000:]
        assert sorted(os.listdir(run)) == before
        assert (mine / "eval_ckpt-2" / "reconstructions.png").exists()
        assert (mine / "export" / "2" / "saved_model.pb").exists()
        assert json.loads((mine / "eval_results.json").read_text())["step"] == 2  # continuous


class GreedyDecoder(tf.keras.Model):
    """A decoder that, on batches of `greedy_from` images or more, also asks TensorFlow's
    allocator for 4 TiB: it refuses at once with the ResourceExhaustedError a GPU gives a
    batch too large for its memory."""

    def __init__(self, channels, greedy_from):
        super().__init__()
        self.up = tf.keras.layers.Conv2DTranspose(channels, 3, strides=2, padding="same")
        self.greedy_from = greedy_from

    def call(self, code):
        logits = self.up(code)
        corner = tf.reshape(logits[0, 0, 0, 0], (1, 1))
        big = tf.cond(tf.shape(code)[0] >= self.greedy_from,
                      lambda: tf.reduce_max(tf.tile(corner, (2**20, 2**20))),
                      lambda: tf.zeros((), logits.dtype))
        return logits + 0 * big


def _greedy(greedy_from):
    return lambda shape: (tf.keras.Sequential([tf.keras.layers.Conv2D(4, 3, strides=2,
                                                                      padding="same")]),
                          GreedyDecoder(shape[2], greedy_from))


def test_out_of_memory_is_one_line_and_keeps_the_steps_trained(tmp_path):
    """Out of memory in the first step: one line naming the batch (exit 6), nothing to save.
    In an evaluation after 2 steps: the line names --eval_batch_size, and the 2 steps are
    saved first. --mode=eval out of memory: one line, and no checkpoint file changes."""
    from core.errors import OutOfMemoryError
    from layers.autoencoders import register

    register("greedy", _greedy(16))
    base = Config(model="greedy", dataset="synthetic", synthetic_shape=(8, 8, 1), epochs=None,
                  train_steps=4, batch_size=16, batch_shards=1, steps_per_loop=2,
                  eval_batch_size=8, eval_every=2)
    with pytest.raises(OutOfMemoryError, match=r"^out of memory in a training step \(OOM when "
                       r"allocating tensor with shape\[1048576,1048576\] .*\): lower --batch_size "
                       r"\(now 16; --grad_accum_steps=N") as raised:
        core.run(base.replace(model_dir=str(tmp_path / "first")))
    assert raised.value.exit_code == 6 and "\n" not in str(raised.value)
    assert str(raised.value).endswith("or on a GPU train in --precision=mixed_bfloat16 or "
                                      "mixed_float16, which halves the activations")
    assert "saved" not in str(raised.value) and not tf.train.latest_checkpoint(
        str(tmp_path / "first"))
    run = base.replace(model_dir=str(tmp_path / "eval"), batch_size=8, eval_batch_size=16)
    with pytest.raises(OutOfMemoryError, match=r"^out of memory evaluating at step 2 \(OOM .*\): "
                       r"lower --eval_batch_size \(now 16; .*; the steps before it are saved in "
                       r".*ckpt-2$"):
        core.run(run)
    assert tf.train.latest_checkpoint(str(tmp_path / "eval")).endswith("ckpt-2")
    before = checkpoint_files(tmp_path / "eval")
    with pytest.raises(OutOfMemoryError, match=r"^out of memory evaluating at step 2 "):
        core.run(Config(mode="eval", model_dir=str(tmp_path / "eval"), eval_batch_size=16))
    assert checkpoint_files(tmp_path / "eval") == before
    assert core.run(Config(mode="eval", model_dir=str(tmp_path / "eval"), eval_batch_size=8)
                    )["step"] == 2


def test_two_writers_of_one_file_never_take_each_others_half_written_file(tmp_path):
    """eval_results.json, best.json, config.json and the figures are written beside and
    renamed (`core.process.write_file`). Two writers of one file at once (an --mode=eval
    beside a continuous evaluation) once shared the name written beside: one renamed the
    other's half-written file, whose own rename then failed (NotFoundError: 130 of these
    300 writes). Each writer now has a name of its own."""
    import threading

    from core.process import write_file

    path = str(tmp_path / "eval_results.json")
    texts = {i: f"writer {i}\n" * 20000 for i in range(2)}
    errors = []

    def write(i):
        for _ in range(150):
            try:
                write_file(path, texts[i] if i == 0 else texts[i].encode())
            except Exception as e:  # noqa: BLE001 -- the failure this test looks for
                errors.append(repr(e)[:200])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert open(path).read() in texts.values()  # one writer's whole file
    assert os.listdir(tmp_path) == ["eval_results.json"]  # nothing left beside


@pytest.mark.parametrize("watcher", ["StopSignals", "DeferredInterrupt"])
def test_the_signal_watchers_pass_other_signals_on_to_an_asyncio_loop(watcher):
    """A notebook's kernel runs an asyncio loop, whose signal handlers wait for the signal's
    number on the wakeup pipe that a run's watcher takes over while it runs: the watcher
    passes the numbers of signals not its own on to that pipe (before, a SIGUSR1 sent
    during a run never reached the loop's handler)."""
    import asyncio

    from core import signals

    loop = asyncio.new_event_loop()
    called = []
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda: called.append("SIGUSR1"))
        with getattr(signals, watcher)():
            os.kill(os.getpid(), signal.SIGUSR1)  # its number is in the pipe on return
        loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        loop.close()
    assert called == ["SIGUSR1"]


def test_the_exit_line_is_the_last_line_while_another_thread_logs():
    """On the command line outside training a signal exits with one line, written by the
    watcher thread while the main thread runs on. Here the main thread logs without pause
    into a pipe the test lets fill, so it waits inside a write when the signal comes: its
    line was finished after the exit line, and more lines followed (9 runs in 10 before).
    Now the exit line is the last, every time."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from absl import logging\n"
            "from core import signals\n"
            "logging.use_absl_handler(); logging.set_verbosity(logging.INFO)\n"
            "with signals.ExitOnSignals('stopped by {signal}'):\n"
            "    i = 0\n"
            "    while True:\n"
            "        logging.info('busy %d', i); i += 1\n")
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        try:
            assert "busy 0" in proc.stderr.readline() + proc.stderr.readline()
            time.sleep(0.5)  # settle: the pipe fills and the main thread waits in a write
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # settle: the watcher thread takes the signal
            err = proc.stderr.read()
            assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            proc.kill()  # it logs forever otherwise (no-op once it has exited)
            proc.wait()
        lines = err.strip().splitlines()
        assert lines[-1] == "stopped by SIGTERM" and len(lines) > 10, lines[-3:]


def test_a_signal_exits_when_stderr_is_a_closed_pipe():
    """`train.py ... 2>&1 | head`: once head has exited, stderr is a closed pipe. The exit
    line could not be written, and the watcher thread died of the BrokenPipeError before
    it exited: the process logged on, and Ctrl-C or SIGTERM never ended it."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from absl import logging\n"
            "from core import signals\n"
            "with signals.ExitOnSignals('stopped by {signal}'):\n"
            "    print('ready', file=sys.stderr, flush=True)\n"
            "    while True:\n"
            "        logging.warning('busy')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        assert "ready" in proc.stderr.readline()
        proc.stderr.close()  # as head does
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_an_exit_on_a_signal_leaves_no_autograph_files(tmp_path):
    """AutoGraph writes each function it converts (a tf.data map's, say) to a temporary
    `__autograph_generated_file*.py`, which an atexit handler removes; the exit on a
    signal (`os._exit`) skips atexit, and every Ctrl-C outside training left a few in
    /tmp. Now they are removed before the exit."""
    script = tmp_path / "script.py"  # a file: AutoGraph reads the function's source
    script.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n"
                      "import time\n"
                      "import tensorflow as tf\n"
                      "from core import signals\n"
                      "def double_past_one(x):\n"
                      "    return x * 2 if x > 1 else x\n"
                      "with signals.ExitOnSignals('stopped by {signal}'):\n"
                      "    ds = tf.data.Dataset.range(4).map(double_past_one)\n"
                      "    print('ready', [int(x) for x in ds], file=sys.stderr,\n"
                      "          flush=True)\n"
                      "    while True:\n"
                      "        time.sleep(0.1)\n")
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(temp), TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        for line in proc.stderr:
            if line.startswith("ready"):
                break
        assert line.strip() == "ready [0, 1, 4, 6]"  # AutoGraph converted the `if`
        assert list(temp.glob("__autograph_generated_file*.py"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert "stopped by SIGTERM" in proc.stderr.read()
    assert not list(temp.glob("__autograph_generated_file*"))


def test_a_stop_while_a_cache_is_decoded_leaves_no_part_of_it(tmp_path):
    """Ctrl-C while --cache=DIR decodes a split: the exit at once left its staging folder
    (NAME.tmp-XXXX, the whole part decoded so far) in DIR for good; every later run
    decodes into one of its own name. Now the stop removes it, and a run that finds one
    (another run's, or left by a kill -9) says so."""
    from PIL import Image

    photos = tmp_path / "photos" / "a"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3000):  # about a second of decoding for the training split
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(
            photos / f"{i}.png", compress_level=0)
    cache = tmp_path / "cache"
    flags = ["--dataset=folder", f"--data_dir={tmp_path / 'photos'}", f"--cache={cache}",
             f"--model_dir={tmp_path / 'run'}", "--train_steps=2", "--batch_size=8"]
    proc = _start(flags)
    deadline = time.monotonic() + 120
    while not (cache.exists() and any(".tmp-" in p.name for p in cache.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.splitlines()[-1] == ("train.py: stopped by SIGINT outside training: the "
                                    "checkpoints are as they were")
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) < 2 and not any(".tmp-" in n for n in names), names  # stopped part way
    again = run_train(*flags)
    assert again.returncode == 0, again.stderr[-2000:]
    done = sorted(p.name for p in cache.iterdir())
    assert len(done) == 2 and not any(".tmp-" in n for n in done), done
    # A staging folder a kill -9 left is named, and the run decodes into one of its own.
    shutil.rmtree(cache / done[0])
    (cache / f"{done[0]}.tmp-dead0000").mkdir()
    again = run_train(*flags)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"--cache={cache} holds {done[0]}.tmp-dead0000, the same cache being decoded by "
            "another run, or left by a run that was killed: remove it if no run is writing "
            "it") in again.stderr
    assert sorted(p.name for p in cache.iterdir()) == sorted([*done, f"{done[0]}.tmp-dead0000"])
