"""Checkpoints are never lost: read-only modes write and delete nothing, a cleanup removes
only what a cut-off save provably left, and an unreadable state file deletes nothing."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import tensorflow as tf

from core import checkpoints
from core.checkpoints import Checkpointer
from core.errors import CheckpointError
from helpers import ROOT, checkpoint_files, run_train, run_unprivileged


def _flags(idx_dir, model_dir, *extra):
    return ["--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:512]",
            "--eval_split=test[9900:]", f"--model_dir={model_dir}", "--batch_size=32",
            "--log_every=10", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, idx_dir):
    """A run with ckpt-10, ckpt-20 and ckpt-30 and its state file."""
    model_dir = tmp_path_factory.mktemp("trained")
    proc = run_train(*_flags(idx_dir, model_dir, "--train_steps=30", "--eval_every=10"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [os.path.basename(p) for p in checkpoints.checkpoints_on_disk(str(model_dir))] == [
        "ckpt-10", "ckpt-20", "ckpt-30"]
    return str(model_dir)


@pytest.fixture
def copy(trained, tmp_path):
    """A fresh copy of the trained run, to break as each test likes."""
    path = str(tmp_path / "run")
    shutil.copytree(trained, path)
    return path


def test_eval_of_a_checkpoint_without_state_file_deletes_nothing(copy):
    os.remove(os.path.join(copy, "checkpoint"))  # copied from elsewhere, or deleted by hand
    before = checkpoint_files(copy)
    # (a bare step is the model dir's checkpoint: train.py runs in the repo, without a "30")
    for path, step in (("30", 30), (f"{copy}/ckpt-20.index", 20),
                       (f"{copy}/ckpt-10.data-00000-of-00001", 10)):
        proc = run_train("--mode=eval", f"--model_dir={copy}", f"--checkpoint={path}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"restored {copy}/ckpt-{step} (step {step})" in proc.stderr
        assert "removing" not in proc.stderr
    assert checkpoint_files(copy) == before
    # Without --checkpoint, the newest checkpoint is found by its files.
    proc = run_train("--mode=eval", f"--model_dir={copy}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "restored" in proc.stderr and "ckpt-30 (step 30)" in proc.stderr
    assert checkpoint_files(copy) == before


def test_eval_and_export_never_touch_checkpoints(copy):
    # An unrecorded, unreadable newer save: a training run would remove it; these must not.
    for suffix in (".index", ".data-00000-of-00001"):
        open(os.path.join(copy, f"ckpt-40{suffix}"), "wb").write(b"cut off")
    os.mkdir(os.path.join(copy, "ckpt-40_temp"))
    before = checkpoint_files(copy)
    for mode in ("eval", "export"):
        proc = run_train(f"--mode={mode}", f"--model_dir={copy}")
        assert proc.returncode == 0, (mode, proc.stderr[-2000:])
        assert checkpoint_files(copy) == before, mode
        assert os.path.isdir(os.path.join(copy, "ckpt-40_temp"))


def test_a_garbage_state_file_is_an_error_that_deletes_nothing(copy):
    open(os.path.join(copy, "checkpoint"), "w").write("this is not a checkpoint state\n")
    before = checkpoint_files(copy)
    for mode in ("train_and_eval", "eval"):
        proc = run_train(*_flags("unused", copy, "--train_steps=40", f"--mode={mode}",
                                 "--dataset=fontdigits", "--data_dir="))
        assert proc.returncode == 5, (mode, proc.stderr[-2000:])
        line = [x for x in proc.stderr.splitlines() if x.startswith("train.py: error:")][0]
        assert f"{copy}/checkpoint is unreadable" in line and "nothing was deleted" in line
        assert checkpoint_files(copy) == before, mode


def test_training_resumes_from_the_newest_files_without_a_state_file(copy, idx_dir):
    os.remove(os.path.join(copy, "checkpoint"))
    proc = run_train(*_flags(idx_dir, copy, "--train_steps=40", "--eval_every=10"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no 'checkpoint' state file: using" in proc.stderr and "(step 30)" in proc.stderr
    assert os.path.exists(os.path.join(copy, "ckpt-10.index"))  # nothing removed
    assert tf.train.latest_checkpoint(copy).endswith("ckpt-40")


# A Checkpointer's state (model, optimizer, step) with one big variable, so that a save
# takes long enough to be killed in the middle.
_SAVER = textwrap.dedent("""
    import sys
    import tensorflow as tf
    sys.path.insert(0, {root!r})
    from core.checkpoints import Checkpointer

    class State:
        model = tf.Module()
        model.weights = tf.Variable(tf.zeros([{size}]))
        optimizer = tf.Module()
        step = tf.Variable(0, dtype=tf.int64)

    checkpointer = Checkpointer({model_dir!r}, State, keep=5)
    for step in (1, 2):
        State.step.assign(step)
        State.model.weights.assign_add(tf.ones([{size}]))
        print("saving", step, flush=True)
        checkpointer.save()
        print("saved", step, flush=True)
""")


def test_a_save_killed_midway_is_cleaned_up_and_the_last_whole_one_resumes(tmp_path):
    """A real cut-off save: a process killed with SIGKILL while TensorFlow writes ckpt-2."""
    model_dir = str(tmp_path / "run")
    script = _SAVER.format(root=ROOT, model_dir=model_dir, size=150_000_000)  # 600 MB
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    try:
        while proc.stdout.readline().strip() != "saving 2":
            assert proc.poll() is None, proc.stderr.read()[-2000:]
        deadline = time.monotonic() + 60
        temp = os.path.join(model_dir, "ckpt-2_temp")
        while not os.path.exists(temp):  # TensorFlow is writing ckpt-2's shards
            assert time.monotonic() < deadline and proc.poll() is None, "the save never started"
            time.sleep(0.001)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-1")
    left = set(os.listdir(model_dir)) - {"checkpoint", "ckpt-1.index", "ckpt-1.data-00000-of-00001"}
    assert "ckpt-2_temp" in left, left  # the kill landed during the save

    class State:
        model = tf.Module()
        optimizer = tf.Module()
        step = tf.Variable(0, dtype=tf.int64)

    State.model.weights = tf.Variable(tf.zeros([150_000_000]))
    checkpointer = Checkpointer(model_dir, State, keep=5)
    assert sorted(os.listdir(model_dir)) == ["checkpoint", "ckpt-1.data-00000-of-00001",
                                             "ckpt-1.index"]
    assert checkpointer.restore() == 1
    assert float(State.model.weights[0]) == 1.0


def test_a_whole_unrecorded_save_is_kept_and_a_broken_one_removed(copy):
    """ckpt-30 whole but cut off before the state file named it: kept. A broken ckpt-40: removed."""
    open(os.path.join(copy, "checkpoint"), "w").write(
        'model_checkpoint_path: "ckpt-20"\nall_model_checkpoint_paths: "ckpt-10"\n'
        'all_model_checkpoint_paths: "ckpt-20"\n')
    assert checkpoints.read_state(copy).model_checkpoint_path.endswith("ckpt-20")
    open(os.path.join(copy, "ckpt-40.index"), "wb").write(b"half an index")
    open(os.path.join(copy, "checkpoint.tmp0123abcd"), "w").write("partial state")

    class State:
        model = tf.Module()
        optimizer = tf.Module()
        step = tf.Variable(0, dtype=tf.int64)

    Checkpointer(copy, State, keep=5).remove_orphans()
    names = set(os.listdir(copy))
    assert {"ckpt-30.index", "ckpt-30.data-00000-of-00001"} <= names  # whole: kept
    assert "ckpt-40.index" not in names and "checkpoint.tmp0123abcd" not in names


def test_read_only_checkpointer_refuses_to_write(copy):
    class State:
        model = tf.Module()
        step = tf.Variable(0, dtype=tf.int64)

    ro = Checkpointer(copy, State, read_only=True)
    with pytest.raises(RuntimeError, match="never saves"):
        ro.save()
    with pytest.raises(RuntimeError, match="never deletes"):
        ro.remove_orphans()


def test_checkpoint_paths_a_user_may_give(copy, tmp_path, monkeypatch):
    assert checkpoints.resolve_path(f"{copy}/ckpt-20.index") == f"{copy}/ckpt-20"
    assert checkpoints.resolve_path(f"{copy}/ckpt-20.data-00000-of-00001") == f"{copy}/ckpt-20"
    assert checkpoints.resolve_path(copy + "/") == f"{copy}/ckpt-30"
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="ckpt-99 does not exist"):
        checkpoints.resolve_path(f"{copy}/ckpt-99")
    # A bare name or step that is nothing in the working directory: the model dir's.
    monkeypatch.chdir(tmp_path)
    for name in ("ckpt-20", "ckpt-20.index", "20"):
        assert checkpoints.resolve_path(name, model_dir=copy) == f"{copy}/ckpt-20", name
    with pytest.raises(ConfigError, match=r"^--checkpoint=ckpt-99 is neither a path here nor a "
                       rf"checkpoint of --model_dir={copy}, which has ckpt-10, ckpt-20, ckpt-30: "
                       r"give one of those \(e.g. --checkpoint=ckpt-30\)"):
        checkpoints.resolve_path("ckpt-99", model_dir=copy)
    with pytest.raises(ConfigError, match="^--checkpoint=20 does not exist"):
        checkpoints.resolve_path("20")  # without a model dir, a path only
    # A name that is a path here stays that path, though the model dir has one of that name.
    shutil.copytree(copy, tmp_path / "ckpt-20")
    assert checkpoints.resolve_path("ckpt-20", model_dir=copy) == "ckpt-20/ckpt-30"
    os.remove(os.path.join(copy, "checkpoint"))
    assert checkpoints.resolve_path(copy) == f"{copy}/ckpt-30"
    with pytest.raises(CheckpointError):
        open(os.path.join(copy, "checkpoint"), "w").write("garbage")
        checkpoints.resolve_path(copy)


def test_a_config_json_that_is_not_an_object_is_one_line(copy):
    open(os.path.join(copy, "config.json"), "w").write("[1, 2]")
    before = checkpoint_files(copy)
    for mode in ("eval", "train_and_eval"):
        proc = run_train(f"--mode={mode}", f"--model_dir={copy}", "--train_steps=40")
        assert proc.returncode == 5, (mode, proc.stderr[-2000:])
        assert "config.json holds a JSON list, not the run's config object" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert checkpoint_files(copy) == before


def _rewrite_in_the_layout_before_upsample_conv_held_a_conv2d(prefix):
    """Rewrites checkpoint `prefix` (a seed model's) as tapeloop wrote it while UpsampleConv
    held its kernel and bias itself: in the object graph, model/decoder/block1 has the
    children kernel and bias, not conv (with _kernel and bias) and upsample. Every tensor
    keeps its key and value."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(prefix)
    key = "_CHECKPOINTABLE_OBJECT_GRAPH"
    graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(reader.get_tensor(key))

    def child(node_id, name):
        return next(c.node_id for c in graph.nodes[node_id].children if c.local_name == name)

    decoder = child(child(0, "model"), "decoder")
    for block in ("block1", "block2", "to_logits"):
        node = graph.nodes[child(decoder, block)]
        conv = child(child(decoder, block), "conv")
        kernel, bias = child(conv, "_kernel"), child(conv, "bias")
        del node.children[:]
        node.children.add(node_id=kernel, local_name="kernel")
        node.children.add(node_id=bias, local_name="bias")
    names = sorted(n for n in reader.get_variable_to_shape_map() if n != key)
    tensors = [reader.get_tensor(n) for n in names]
    for f in tf.io.gfile.glob(prefix + ".*"):
        tf.io.gfile.remove(f)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=[*names, key],
                      shape_and_slices=[""] * (len(names) + 1),
                      tensors=[*tensors, tf.constant(graph.SerializeToString())])


def test_a_checkpoint_from_before_upsample_conv_held_a_conv2d_evaluates_and_resumes(tmp_path):
    """Checkpoints written before the blocks became the Keras layers they name keep their
    weights and Adam's state: eval gives the same numbers, training resumes from them."""
    import core
    from core.config import Config

    model_dir = str(tmp_path / "run")
    config = Config(dataset="fontdigits", train_split="train[:256]", eval_split="test[:64]",
                    model_dir=model_dir, train_steps=4, epochs=None, batch_size=32, mode="train")
    core.run(config)
    evaluate = Config(mode="eval", model_dir=model_dir)
    before = core.run(evaluate, given={"mode", "model_dir"})
    path = os.path.join(model_dir, "ckpt-4")
    _rewrite_in_the_layout_before_upsample_conv_held_a_conv2d(path)
    after = core.run(evaluate, given={"mode", "model_dir"})
    assert after["step"] == 4 and after["bce"] == before["bce"] and after["ssim"] == before["ssim"]
    resumed = core.run(config.replace(train_steps=5))
    assert resumed["step"] == 5 and [h["step"] for h in resumed["history"]] == [5]
    assert int(tf.train.load_variable(os.path.join(model_dir, "ckpt-5"),
                                      "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == 5


def test_a_checkpoint_this_user_may_not_read_is_named_so_and_nothing_changes(tmp_path):
    """A run's files that this user may not read (another user's run, a mount's): its
    checkpoint was 'damaged ... move its files and the state file away', which would throw
    its steps away for a permission, and config.json and the state file 'unreadable:
    restore it'. Each is now a permission to fix, with nothing changed."""
    trained = run_train(f"--model_dir={tmp_path / 'run'}", "--dataset=synthetic",
                        "--train_steps=2", "--eval_every=2", "--batch_size=8")
    assert trained.returncode == 0, trained.stderr[-2000:]
    for copy in ("data", "config", "state"):
        shutil.copytree(tmp_path / "run", tmp_path / copy)
    locked = [tmp_path / "data" / "ckpt-2.data-00000-of-00001",
              tmp_path / "config" / "config.json", tmp_path / "state" / "checkpoint"]
    common = dict(dataset="synthetic", train_steps=4, eval_every=2, batch_size=8)
    cases = [dict(common, model_dir=str(tmp_path / "data")),
             dict(common, model_dir=str(tmp_path / "fresh"),
                  init_checkpoint=str(tmp_path / "data")),
             dict(mode="eval", model_dir=str(tmp_path / "config")),
             dict(common, model_dir=str(tmp_path / "state"))]
    before = {copy: checkpoint_files(str(tmp_path / copy)) for copy in ("data", "config", "state")}
    for path in locked:
        path.chmod(0)
    try:
        seen = run_unprivileged(cases)
    finally:
        for path in locked:
            path.chmod(0o644)
    data, config, state = locked
    assert seen == [
        f"checkpoint {tmp_path}/data/ckpt-2 is not readable ({data}; Permission denied): fix "
        "its permissions; nothing was changed (exit 5)",
        f"--init_checkpoint={tmp_path}/data: {tmp_path}/data/ckpt-2 is not readable ({data}; "
        "Permission denied): fix its permissions; nothing was changed (exit 2)",
        f"{config} is not readable ({config}; Permission denied): fix its permissions; nothing "
        "was changed (exit 5)",
        f"{state} is not readable ({state}; Permission denied): fix its permissions; nothing "
        "was changed (exit 5)"]
    assert {copy: checkpoint_files(str(tmp_path / copy))
            for copy in ("data", "config", "state")} == before
    assert not (tmp_path / "fresh").exists()
