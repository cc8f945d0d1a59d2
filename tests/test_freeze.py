"""--freeze=encoder|decoder: fine-tuning one part of the model on the other, kept as it is.
The frozen part's weights never move (on one device and over replicas with XLA), the
optimizer and the weight average hold the trained part's only, a frozen BatchNormalization
keeps its statistics, a resume keeps the setting or is refused in one line, and a run
started from a frozen run reads its partial weight average."""

import json
import re

import numpy as np
import pytest
import tensorflow as tf

import core
from core.config import Config
from core.errors import ConfigError
from layers.autoencoders import register
from helpers import FONTDIGITS_SLICES
from test_init_checkpoint import TINY, _files


keras = tf.keras


def _config(model_dir, **changes):
    settings = dict(model="seed", **FONTDIGITS_SLICES, train_steps=3, epochs=None,
                    batch_size=32, mode="train", model_dir=str(model_dir))
    return Config(**{**settings, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps: the trained weights the fine-tuning runs start from."""
    model_dir = tmp_path_factory.mktemp("freeze") / "trained"
    core.run(_config(model_dir, train_steps=4))
    return model_dir


def _variables(model_dir, step, *path) -> dict:
    """{object path: value} of the variables under `path` (default: the model) in the
    checkpoint's object graph, by their path from it (the file's keys for a variable
    differ with what the optimizer holds: Keras saves it under the optimizer's names)."""
    from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

    reader = tf.train.load_checkpoint(str(model_dir / f"ckpt-{step}"))
    graph = TrackableObjectGraph.FromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    node = 0
    for name in path or ("model",):
        node = next(c.node_id for c in graph.nodes[node].children if c.local_name == name)
    found, seen, todo = {}, set(), [(node, "")]
    while todo:  # breadth first, children by name: each variable by its shortest path
        node, at = todo.pop(0)
        if node in seen:
            continue
        seen.add(node)
        for attribute in graph.nodes[node].attributes:
            if attribute.name == "VARIABLE_VALUE":
                found[at] = reader.get_tensor(attribute.checkpoint_key)
        todo += sorted(((c.node_id, f"{at}/{c.local_name}") for c in graph.nodes[node].children),
                       key=lambda child: child[1])
    return dict(sorted(found.items()))


def _moved(before: dict, after: dict) -> list[float]:
    """The largest change of each variable, in the order of `before`."""
    assert list(before) == list(after)
    return [float(np.abs(after[name] - value).max()) for name, value in before.items()]


def _optimizer_slots(model_dir, step) -> list[tuple]:
    """The shapes of Adam's moments in the checkpoint (two per trained variable)."""
    reader = tf.train.load_checkpoint(str(model_dir / f"ckpt-{step}"))
    return sorted(tuple(shape) for key, shape in reader.get_variable_to_shape_map().items()
                  if re.fullmatch(r"optimizer/_variables/\d+/\.ATTRIBUTES/VARIABLE_VALUE", key))


@pytest.mark.parametrize("part, other", [("encoder", "decoder"), ("decoder", "encoder")])
def test_the_frozen_part_keeps_its_weights_and_the_other_trains(trained, tmp_path, part, other,
                                                                caplog):
    model_dir = tmp_path / "fine"
    before = _files(trained)
    with caplog.at_level("INFO", logger="absl"):
        core.run(_config(model_dir, init_checkpoint=str(trained), freeze=part, ema_decay=0.9))
    frozen = _moved(_variables(trained, 4, "model", part), _variables(model_dir, 3, "model", part))
    trained_part = _variables(trained, 4, "model", other)
    moved = _moved(trained_part, _variables(model_dir, 3, "model", other))
    assert frozen == [0.0] * len(frozen) and len(frozen) >= 6  # bit for bit the source's
    assert min(moved) > 1e-4  # every weight of the other part trained
    # The optimizer's moments and the weight average are the trained part's only.
    shapes = sorted(tuple(v.shape) for v in trained_part.values())
    assert _optimizer_slots(model_dir, 3) == sorted(shapes + shapes)
    assert sorted(tuple(v.shape) for v in _variables(model_dir, 3, "ema").values()) == shapes
    log = " ".join(r.getMessage() for r in caplog.records)
    assert f"--freeze={part}: its " in log and f"the optimizer trains the {other}'s" in log
    assert "stays at its random initialisation" not in log
    assert _files(trained) == before

    # The same command resumes it; the part stays frozen.
    core.run(_config(model_dir, init_checkpoint=str(trained), freeze=part, ema_decay=0.9,
                     train_steps=5))
    assert _moved(_variables(trained, 4, "model", part),
                  _variables(model_dir, 5, "model", part)) == frozen
    # Without --freeze, the optimizer would not match its checkpoint: one line, untouched.
    kept = _files(model_dir)
    with pytest.raises(ConfigError, match=re.escape(
            f"holds a different model (freeze: '{part}' -> 'none'): to resume it, give its "
            f"settings (--freeze={part};")):
        core.run(_config(model_dir, ema_decay=0.9, train_steps=6))
    assert _files(model_dir) == kept


def test_a_run_from_before_freeze_existed_resumes_only_unfrozen(tmp_path):
    """A config.json written before --freeze existed: its run trained every weight."""
    model_dir = tmp_path / "old"
    core.run(_config(model_dir, train_steps=1))
    config = json.loads((model_dir / "config.json").read_text())
    del config["freeze"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=re.escape(
            "holds a different model (freeze: 'none' -> 'encoder'): to resume it, give its "
            "settings (--freeze=none;")):
        core.run(_config(model_dir, train_steps=2, freeze="encoder"))
    core.run(_config(model_dir, train_steps=2))  # and resumes as it was
    assert (model_dir / "ckpt-2.index").exists()


def test_a_frozen_run_is_evaluated_and_exported_with_the_average_of_its_trained_part(
        trained, tmp_path):
    """Eval and export freeze the part the run froze (config.json says which, whatever
    --freeze they are given): its weight average lines up with the part it averaged."""
    model_dir = tmp_path / "fine"
    core.run(_config(model_dir, init_checkpoint=str(trained), freeze="encoder", ema_decay=0.5,
                     learning_rate=0.05))
    evaluated = core.run(_config(model_dir, mode="eval", ema_decay=0.5, freeze="none"))
    assert evaluated["step"] == 3 and evaluated["bce"] > 0
    exported = core.run(_config(model_dir, mode="export"))
    reader = tf.train.load_checkpoint(f"{exported['export_dir']}/variables/variables")
    served = [reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
              if key != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    average = list(_variables(model_dir, 3, "ema").values())
    expected = average + list(_variables(model_dir, 3, "model", "encoder").values())
    for value in expected:  # the decoder's average and the encoder's weights, each exported
        assert [v for v in served if v.shape == value.shape and np.array_equal(v, value)]
    decoder = list(_variables(model_dir, 3, "model", "decoder").values())
    assert not any(np.array_equal(v, d) for v in served for d in decoder if v.shape == d.shape)


def test_a_frozen_encoder_stays_frozen_over_two_replicas_with_xla(trained, tmp_path):
    model_dir = tmp_path / "mirrored"
    core.run(_config(model_dir, init_checkpoint=str(trained), freeze="encoder",
                     strategy="mirrored", num_cpu_devices=2, batch_shards=1, jit_compile=True))
    frozen = _moved(_variables(trained, 4, "model", "encoder"),
                    _variables(model_dir, 3, "model", "encoder"))
    assert frozen == [0.0] * len(frozen)
    assert min(_moved(_variables(trained, 4, "model", "decoder"),
                      _variables(model_dir, 3, "model", "decoder"))) > 1e-4


def test_a_run_from_a_frozen_run_reads_the_average_it_kept(tmp_path, trained, caplog):
    """A frozen run averages its trained part only (its frozen part is its own average):
    a run started from it reads that part's average and the other part's weights, as the
    frozen run evaluated and exported them."""
    source = tmp_path / "decoder_tuned"
    core.run(_config(source, init_checkpoint=str(trained), freeze="encoder", ema_decay=0.5,
                     learning_rate=0.05))
    with caplog.at_level("INFO", logger="absl"):
        core.run(_config(tmp_path / "next", init_checkpoint=str(source), learning_rate=TINY,
                         train_steps=1))
    assert "(its weight average, which its evaluation and export use" in " ".join(
        r.getMessage() for r in caplog.records)
    average = list(_variables(source, 3, "ema").values())
    raw_decoder = _variables(source, 3, "model", "decoder")
    read_decoder = _variables(tmp_path / "next", 1, "model", "decoder")
    assert len(average) == len(raw_decoder)
    for name, value in raw_decoder.items():  # each is one of the average's entries
        assert [a for a in average if a.shape == value.shape
                and np.abs(a - read_decoder[name]).max() < 1e-6], name
        assert np.abs(read_decoder[name] - value).max() > 1e-4, name  # not the raw weight
    np.testing.assert_allclose(  # the encoder: its weights, which never moved
        list(_variables(tmp_path / "next", 1, "model", "encoder").values())[0],
        list(_variables(trained, 4, "model", "encoder").values())[0], atol=1e-7)


def _bn(image_shape):
    """An encoder and a decoder, each with a BatchNormalization (momentum 0.5: one step
    moves its statistics far)."""
    encoder = keras.Sequential([
        keras.Input(image_shape),
        keras.layers.Conv2D(8, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(momentum=0.5, name="bn_enc"),
        keras.layers.ReLU(),
    ], name="bn_encoder")
    decoder = keras.Sequential([
        keras.Input((image_shape[0] // 2, image_shape[1] // 2, 8)),
        keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same"),
        keras.layers.BatchNormalization(momentum=0.5, name="bn_dec"),
        keras.layers.ReLU(),
        keras.layers.Conv2D(image_shape[2], 3, padding="same"),
    ], name="bn_decoder")
    return encoder, decoder


def _no_decoder_weights(image_shape):
    """An encoder whose code is the image's logits (2x - 1), and a decoder that returns it."""
    encoder = keras.Sequential([keras.Input(image_shape), keras.layers.Rescaling(2.0, offset=-1.0),
                                keras.layers.Conv2D(1, 1, kernel_initializer="ones")])
    decoder = keras.Sequential([keras.Input(image_shape), keras.layers.Identity()])
    return encoder, decoder


register("freeze_bn", _bn)
register("freeze_empty_decoder", _no_decoder_weights)


@pytest.mark.parametrize("freeze", ["none", "encoder"])
def test_a_frozen_batchnorm_normalises_with_its_statistics_and_keeps_them(tmp_path, freeze,
                                                                           caplog):
    model_dir = tmp_path / freeze
    with caplog.at_level("WARNING", logger="absl"):
        core.run(_config(model_dir, model="freeze_bn", freeze=freeze, train_steps=2,
                         strategy="mirrored", num_cpu_devices=2, batch_shards=1))
    statistics = {name.split("/")[-1]: value for name, value in
                  _variables(model_dir, 2, "model", "encoder").items() if "moving" in name}
    assert len(statistics) == 2
    at_start = {"moving_mean": 0.0, "moving_variance": 1.0}
    unchanged = [np.all(value == at_start[name]) for name, value in statistics.items()]
    assert unchanged == [freeze == "encoder"] * 2
    warned = [r.getMessage() for r in caplog.records if "random initialisation" in r.getMessage()]
    assert bool(warned) == (freeze == "encoder")
    if warned:
        assert warned[0].startswith("--freeze=encoder without --init_checkpoint: the encoder "
                                    "stays at its random initialisation (--seed)")


def test_freezing_the_only_part_with_weights_is_one_line_and_nothing_is_written(tmp_path):
    model_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(
            "--freeze=encoder leaves nothing to train: the decoder has no trainable weights")):
        core.run(_config(model_dir, model="freeze_empty_decoder", freeze="encoder"))
    assert not model_dir.exists()
    with pytest.raises(ConfigError, match=re.escape(
            "--freeze='both' is unknown: choose one of none, encoder, decoder")):
        _config(model_dir, freeze="both")
