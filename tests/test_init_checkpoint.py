"""--init_checkpoint: a new run starts from another run's weights (all of them, or its
encoder's or decoder's), with a fresh optimizer, step and schedule; a run with checkpoints
of its own resumes them; a checkpoint that does not fit is one line before anything is
written, and the other run's folder is only read."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import core
from core.config import Config
from core.errors import ConfigError
from helpers import FONTDIGITS_SLICES, ROOT

# A learning rate so small that one Adam step (which moves a weight by about the rate)
# leaves the weights where the checkpoint put them, to 1e-8.
TINY = 1e-9


def _config(model_dir, **changes):
    settings = dict(model="seed", **FONTDIGITS_SLICES, train_steps=1, epochs=None,
                    batch_size=32, mode="train", model_dir=str(model_dir))
    return Config(**{**settings, **changes})


def _variables(model_dir, step, *path):
    """{checkpoint key: value} of the variables under `path` (default: the model) in the
    checkpoint's object graph (Keras' variables are saved under the optimizer's names)."""
    from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

    reader = tf.train.load_checkpoint(os.path.join(model_dir, f"ckpt-{step}"))
    graph = TrackableObjectGraph.FromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    node = 0
    for name in path or ("model",):
        node = next(c.node_id for c in graph.nodes[node].children if c.local_name == name)
    found, seen, todo = {}, set(), [node]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for attribute in graph.nodes[node].attributes:
            if attribute.name == "VARIABLE_VALUE":
                found[attribute.checkpoint_key] = reader.get_tensor(attribute.checkpoint_key)
        todo += [c.node_id for c in graph.nodes[node].children]
    return found


def _files(folder):
    return {p: os.stat(os.path.join(folder, p)).st_mtime_ns for p in os.listdir(folder)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 6 steps: the checkpoint the others start from."""
    model_dir = tmp_path_factory.mktemp("init") / "trained"
    core.run(_config(model_dir, train_steps=6))
    return model_dir


def test_a_new_run_starts_from_the_weights_not_the_optimizer_or_the_step(trained, tmp_path):
    before = _files(trained)
    core.run(_config(tmp_path / "fine", init_checkpoint=str(trained), learning_rate=TINY))
    core.run(_config(tmp_path / "fresh", learning_rate=TINY))
    source = _variables(trained, 6)
    fine, fresh = _variables(tmp_path / "fine", 1), _variables(tmp_path / "fresh", 1)
    assert set(fine) == set(source) and len(source) >= 8
    for name, value in source.items():
        np.testing.assert_allclose(fine[name], value, atol=1e-7, err_msg=name)
    assert max(np.abs(fresh[n] - v).max() for n, v in source.items()) > 0.01  # 6 steps moved them
    # Its own step and a fresh optimizer: one Adam step, not seven.
    reader = tf.train.load_checkpoint(str(tmp_path / "fine" / "ckpt-1"))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 1
    assert _files(trained) == before  # only read


@pytest.mark.parametrize("modules", ["encoder", "decoder"])
def test_init_modules_reads_one_part_and_the_other_starts_from_its_initialisation(
        trained, tmp_path, modules):
    core.run(_config(tmp_path / "part", init_checkpoint=str(trained), init_modules=modules,
                     learning_rate=TINY))
    core.run(_config(tmp_path / "fresh", learning_rate=TINY))
    source, part, fresh = (_variables(d, s) for d, s in ((trained, 6), (tmp_path / "part", 1),
                                                          (tmp_path / "fresh", 1)))
    read = list(_variables(trained, 6, "model", modules))
    others = [n for n in source if n not in read]
    assert read and others
    for name in read:
        np.testing.assert_allclose(part[name], source[name], atol=1e-7, err_msg=name)
    for name in others:  # the same initialisation (--seed) as a run from scratch
        np.testing.assert_allclose(part[name], fresh[name], atol=1e-7, err_msg=name)
    assert max(np.abs(part[n] - source[n]).max() for n in others) > 0.01


def test_a_run_over_two_replicas_and_its_weight_average_start_from_the_checkpoint(trained, tmp_path):
    model_dir = tmp_path / "mirrored"
    core.run(_config(model_dir, init_checkpoint=str(trained), learning_rate=TINY,
                     strategy="mirrored", num_cpu_devices=2, batch_shards=1, ema_decay=0.5))
    source = _variables(trained, 6)
    fine = _variables(model_dir, 1)
    average = _variables(model_dir, 1, "ema")
    assert len(average) == len(source)
    for name, value in source.items():
        np.testing.assert_allclose(fine[name], value, atol=1e-7, err_msg=name)
    # The average starts from the weights read (from a fresh initialisation, half of it
    # would still be there after one step of decay 0.5).
    kernels = sorted(v.shape for v in source.values())
    assert sorted(v.shape for v in average.values()) == kernels
    for value in average.values():
        match = [v for v in source.values() if v.shape == value.shape
                 and np.abs(v - value).max() < 1e-6]
        assert match, value.shape


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    """A run of 6 steps with a weight average far from its raw weights (decay 0.5)."""
    model_dir = tmp_path_factory.mktemp("init") / "averaged"
    core.run(_config(model_dir, train_steps=6, ema_decay=0.5, learning_rate=0.05))
    return model_dir


@pytest.mark.parametrize("modules, ema", [("all", True), ("encoder", True), ("decoder", True),
                                          ("all", False)])
def test_a_source_with_a_weight_average_starts_the_run_from_its_average(
        averaged, tmp_path, caplog, modules, ema):
    """What the source run evaluates and exports (its average), not its raw weights;
    --noema reads the raw ones. A part reads its own entries of the average."""
    with caplog.at_level("INFO", logger="absl"):
        core.run(_config(tmp_path / "fine", init_checkpoint=str(averaged), init_modules=modules,
                         learning_rate=TINY, ema=ema))
    raw, fine = _variables(averaged, 6), _variables(tmp_path / "fine", 1)
    average = list(_variables(averaged, 6, "ema").values())
    read = list(_variables(averaged, 6, *(("model",) if modules == "all" else ("model", modules))))
    assert len(average) == len(raw) and read
    for name in read:
        expected = (raw[name] if not ema else
                    [a for a in average if a.shape == raw[name].shape
                     and np.abs(a - fine[name]).max() < 1e-6])
        if ema:
            assert expected, f"{name} is none of the average's entries"
            assert np.abs(fine[name] - raw[name]).max() > 1e-4, name  # not the raw weight
        else:
            np.testing.assert_allclose(fine[name], expected, atol=1e-7, err_msg=name)
    log = " ".join(r.getMessage() for r in caplog.records)
    assert ("(its weight average, which its evaluation and export use" in log) == ema


def test_a_run_with_checkpoints_of_its_own_resumes_them_and_reads_nothing_else(
        trained, tmp_path, caplog):
    model_dir = tmp_path / "run"
    core.run(_config(model_dir, train_steps=3))
    own = _variables(model_dir, 3)
    with caplog.at_level("INFO", logger="absl"):
        core.run(_config(model_dir, train_steps=4, init_checkpoint=str(trained),
                         learning_rate=TINY))
    assert any("is not read" in r.getMessage() and "checkpoints of its own" in r.getMessage()
               for r in caplog.records)
    resumed = _variables(model_dir, 4)
    for name, value in own.items():
        np.testing.assert_allclose(resumed[name], value, atol=1e-7, err_msg=name)


def test_a_fully_convolutional_model_starts_from_weights_trained_at_another_size(
        trained, tmp_path):
    """The seed model's weights do not depend on the image's height and width: weights
    trained on 28x28 digits start a run on 32x32 shapes (one channel, as they were)."""
    model_dir = tmp_path / "bigger"
    core.run(_config(model_dir, dataset="shapes", image_size=(32, 32), channels=1,
                     init_checkpoint=str(trained), learning_rate=TINY))
    source, fine = _variables(trained, 6), _variables(model_dir, 1)
    for name, value in source.items():
        np.testing.assert_allclose(fine[name], value, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("changes, message", [
    (dict(init_checkpoint="{missing}"), "--init_checkpoint={missing} does not exist: give a "
                                        "path like DIR/ckpt-1000"),
    (dict(init_checkpoint="{trained}", model="keras_blog"),
     r"--init_checkpoint={trained}: {trained}/ckpt-6 does not hold this model (keras_blog/kernel "
     r"has shape (3, 3, 1, 16) here, (4, 4, 1, 8) in the checkpoint): give the model flags it "
     r"was trained with"),
    (dict(init_checkpoint="{trained}", model="resnet", dataset="shapes", image_size=(32, 32)),
     "does not hold this model (76 of its variables are not there, e.g. resnet/"),
    (dict(init_checkpoint="{trained}", init_modules="decoder", dataset="shapes",
          image_size=(32, 32)),
     "does not hold this decoder (seed/kernel has shape (4, 4, 8, 3) here, (4, 4, 8, 1) in the "
     "checkpoint): its run trained on 28x28x1 images, these are 32x32x3: give "
     "--channels=1 (this model's weights depend on the image's channels), or --init_modules "
     "for the part that matches"),
    (dict(init_checkpoint="{weights}"), "--init_checkpoint={weights} is not a TensorFlow "
                                        "checkpoint: give a path like DIR/ckpt-1000"),
    (dict(init_checkpoint="{export}"), "--init_checkpoint={export} is a SavedModel export, not "
                                       "a training checkpoint: give the run's folder"),
    (dict(init_modules="encoder"), "--init_modules=encoder says what --init_checkpoint reads"),
    (dict(init_checkpoint="{trained}", mode="eval"),
     "--init_checkpoint starts a training run from a checkpoint; --mode=eval reads one with "
     "--checkpoint={trained}"),
], ids=["missing", "other-model", "other-family", "other-channels", "a-keras-file", "an-export",
        "modules-alone", "eval"])
def test_a_checkpoint_that_does_not_fit_is_one_line_and_nothing_is_written(
        trained, tmp_path, changes, message):
    paths = dict(missing=str(tmp_path / "nowhere"), trained=str(trained),
                 weights=str(tmp_path / "model.weights.h5"), export=str(tmp_path / "export"))
    (tmp_path / "model.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")  # Keras' weights file
    tf.saved_model.save(tf.Module(), paths["export"])  # what --mode=export writes
    changes = {k: v.format(**paths) if isinstance(v, str) else v for k, v in changes.items()}
    before = _files(trained)
    model_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(message.format(**paths))) as raised:
        core.run(_config(model_dir, **changes))
    assert "\n" not in str(raised.value)
    assert not model_dir.exists()
    assert _files(trained) == before


@pytest.mark.parametrize("flag", ["init_checkpoint", "checkpoint"])
def test_a_folder_inside_a_run_names_the_run(trained, tmp_path, flag):
    """The run's export/, export/20 or train/ folder, given for the run (the log names
    export/20 on export), is one line naming the run's folder, which reads."""
    run = tmp_path / "run"
    run.mkdir()
    for name in os.listdir(trained):
        if os.path.isfile(trained / name):
            (run / name).write_bytes((trained / name).read_bytes())
    tf.saved_model.save(tf.Module(), str(run / "export" / "6"))
    (run / "train").mkdir()
    before = _files(run)
    mode = dict(mode="train") if flag == "init_checkpoint" else dict(mode="eval")
    target = tmp_path / "new" if flag == "init_checkpoint" else run
    give = (f"give the run's folder, --{flag}={run} (its latest checkpoint), or one of its "
            "ckpt-* checkpoints")
    for inside, what in [("export/6", "is a SavedModel export, not a training checkpoint"),
                         ("export", f"is a folder inside the run {run}, without checkpoints"),
                         ("train", f"is a folder inside the run {run}, without checkpoints")]:
        with pytest.raises(ConfigError) as raised:
            core.run(_config(target, **mode, **{flag: str(run / inside)}))
        assert str(raised.value) == f"--{flag}={run / inside} {what}: {give}"
    assert _files(run) == before and not (tmp_path / "new").exists()
    core.run(_config(target, **mode, **{flag: str(run)}))  # what the line says reads


def test_train_py_exits_2_with_one_line(trained, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", f"--model_dir={tmp_path / 'run'}", "--train_steps=1",
         "--model=keras_blog", f"--init_checkpoint={trained}/ckpt-6.index"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: --init_checkpoint={trained}/ckpt-6.index: {trained}/ckpt-6 does not "
        "hold this model (keras_blog/kernel has shape")
    assert "Value in checkpoint could not be found" not in result.stderr
    assert not (tmp_path / "run").exists()
