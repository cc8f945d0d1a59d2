"""End-to-end: tiny real runs in temporary dirs, in-process and through train.py."""

import os

import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf

import core
from core import data
from core.config import Config
from core.trainer import Trainer
from helpers import FONTDIGITS_SLICES, ROOT, event_tags, graph_nodes, run_script, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from layers.autoencoders import build_autoencoder, register


def _config(tmp_path, idx_dir, **overrides):
    base = dict(dataset="mnist", data_dir=idx_dir, train_split="test[:2000]",
                eval_split="test[9000:9500]", model_dir=str(tmp_path / "run"), batch_size=32,
                train_steps=60, epochs=None, log_every=10, eval_every=30, steps_per_loop=10,
                learning_rate=3e-3, strategy="default")
    base.update(overrides)
    return Config(**base)


def test_trains_writes_everything_and_resumes(tmp_path, idx_dir):
    config = _config(tmp_path, idx_dir)
    result = core.run(config)
    assert result["step"] == 60
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0], losses  # the loss falls
    model_dir = config.model_dir
    files = os.listdir(model_dir)
    assert {"ckpt-30.index", "ckpt-60.index", "checkpoint", "config.json",
            "reconstructions.png"} <= set(files)
    train_tags = event_tags(os.path.join(model_dir, "train"))
    eval_tags = event_tags(os.path.join(model_dir, "eval"))
    assert {"loss", "examples_per_sec", "learning_rate", "compile_seconds"} <= set(train_tags)
    assert {"loss", "mse", "psnr", "ssim", "reconstructions"} <= set(eval_tags)
    assert [s for s, _ in eval_tags["loss"]] == [30, 60]
    assert [s for s, _ in train_tags["loss"]] == [10, 20, 30, 40, 50, 60]
    assert train_tags["learning_rate"][0][1] == pytest.approx(3e-3)
    nodes, xla = graph_nodes(os.path.join(model_dir, "train"))  # the Graphs tab: the K-step loop
    assert {"Conv2D", "Conv2DBackpropFilter", "ResourceApplyAdam"} <= set(nodes.values())
    assert any("/encoder" in n for n in nodes) and any("/decoder" in n for n in nodes)
    assert not xla
    image = matplotlib.image.imread(os.path.join(model_dir, "reconstructions.png"))
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # a wide two-row grid

    # Same model_dir, more steps: resumes at 60 instead of starting over.
    resumed = core.run(config.replace(train_steps=80))
    assert resumed["step"] == 80
    assert [h["step"] for h in resumed["history"]] == [70, 80]
    assert resumed["history"][0]["loss"] < losses[0]  # trained weights, not fresh ones
    assert "ckpt-80.index" in os.listdir(model_dir)


def test_every_evaluation_gets_a_training_point(tmp_path, idx_dir):
    """An epoch shorter than --log_every (a small folder) still gives the curves and
    TensorBoard a training loss at every evaluation, as Keras logs one per epoch."""
    result = core.run(_config(tmp_path, idx_dir, log_every=20, eval_every=30))
    train_tags = event_tags(str(tmp_path / "run" / "train"))
    assert [s for s, _ in train_tags["loss"]] == [20, 30, 40, 60]
    assert [h["step"] for h in result["history"]] == [20, 30, 40, 60]
    assert [s for s, _ in event_tags(str(tmp_path / "run" / "eval"))["loss"]] == [30, 60]
    # Without an evaluation (--mode=train) only --log_every counts.
    trained = core.run(_config(tmp_path, idx_dir, mode="train", log_every=20, eval_every=30,
                               model_dir=str(tmp_path / "train_only")))
    assert [h["step"] for h in trained["history"]] == [20, 40, 60]


def test_eval_mode_restores_and_reports(tmp_path, idx_dir):
    config = _config(tmp_path, idx_dir, train_steps=20, eval_every=20)
    core.run(config)
    result = core.run(config.replace(mode="eval"))
    assert result["step"] == 20
    assert 0 < result["bce"] < 0.7 and 0 < result["mse"] < 0.2 and result["psnr"] > 5
    with pytest.raises(core.ConfigError, match="found no checkpoint"):
        core.run(config.replace(mode="eval", model_dir=str(tmp_path / "empty")))


def _first_step_loss(jit_compile, weights, batch):
    strategy = tf.distribute.get_strategy()
    model = build_autoencoder("seed")
    model.set_weights(weights)
    trainer = Trainer(model, strategy, 32, 1e-3, jit_compile=jit_compile)
    iterator = iter(tf.data.Dataset.from_tensors(batch).repeat())
    return trainer.train_loop(iterator, 1), [v.numpy() for v in model.trainable_variables]


def test_xla_path_matches_the_default_path(idx_dir):
    images = data.load_split("test[:32]", "mnist", idx_dir).images
    batch = data.to_float(images)
    weights = build_autoencoder("seed").get_weights()
    loss_tf, after_tf = _first_step_loss(False, weights, batch)
    loss_xla, after_xla = _first_step_loss(True, weights, batch)
    assert abs(loss_tf - loss_xla) <= 1e-5
    for a, b in zip(after_tf, after_xla):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_xla_training_run(tmp_path, idx_dir):
    result = core.run(_config(tmp_path, idx_dir, jit_compile=True, train_steps=30))
    losses = [h["loss"] for h in result["history"]]
    assert losses[-1] < losses[0]
    nodes, xla = graph_nodes(str(tmp_path / "run" / "train"))
    assert any("train_step" in f for f in xla) and "Conv2D" in nodes.values()  # XLA's step


def _pooled(image_shape):
    """Your own model with Keras' MaxPooling2D, which has no deterministic form."""
    encoder = tf.keras.Sequential([tf.keras.Input(image_shape),
                                   tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                                   tf.keras.layers.MaxPooling2D()])
    decoder = tf.keras.Sequential([tf.keras.Input((image_shape[0] // 2, image_shape[1] // 2, 4)),
                                   tf.keras.layers.Conv2DTranspose(image_shape[2], 3, strides=2,
                                                                   padding="same")])
    return encoder, decoder


def test_deterministic_xla_keeps_xla_for_the_blocks_max_pool_and_repeats_bit_for_bit(
        tmp_path, caplog):
    """XLA has no deterministic form of max-pool's gradient and refuses it under op
    determinism, on this CPU as on GPUs. The seed model's pool runs in a form without it
    (layers/fast_forms.max_pool), so --deterministic keeps XLA, and two runs are equal to
    the bit. Your own MaxPooling2D trains without XLA, and the log says why. A later run of
    the same process that does not ask for determinism compiles its step with XLA."""
    settings = dict(**FONTDIGITS_SLICES, train_steps=4, epochs=None, batch_size=16,
                    mode="train", jit_compile=True, log_every=1, eval_every=4)
    runs = []
    for name in ("a", "b"):
        with caplog.at_level("INFO", logger="absl"):
            runs.append(core.run(Config(**settings, model="seed", deterministic=True,
                                        model_dir=str(tmp_path / name))))
        _, xla = graph_nodes(str(tmp_path / name / "train"))
        assert any("train_step" in f for f in xla)
    assert runs[0]["step"] == runs[1]["step"] == 4
    assert [h["loss"] for h in runs[0]["history"]] == [h["loss"] for h in runs[1]["history"]]
    first, second = (tf.train.load_checkpoint(str(tmp_path / name)) for name in "ab")
    weights = [n for n in first.get_variable_to_shape_map() if "VARIABLE_VALUE" in n]
    assert len(weights) > 10
    for n in weights:
        np.testing.assert_array_equal(first.get_tensor(n), second.get_tensor(n))
    assert any("max-pool by reshape (deterministic under XLA)" in r.getMessage()
               for r in caplog.records)
    assert not any("XLA has no deterministic" in r.getMessage() and r.levelname == "WARNING"
                   for r in caplog.records)

    register("pooled", _pooled)
    caplog.clear()
    with caplog.at_level("WARNING", logger="absl"):
        result = core.run(Config(**settings, model="pooled", deterministic=True,
                                 model_dir=str(tmp_path / "pooled")))
    assert result["step"] == 4
    assert any("--deterministic with XLA: XLA has no deterministic gradient for this model's "
               "max-pooling" in r.getMessage() for r in caplog.records)
    _, xla = graph_nodes(str(tmp_path / "pooled" / "train"))
    assert not any("train_step" in f for f in xla)
    assert core.run(Config(**settings, model="pooled",
                           model_dir=str(tmp_path / "xla")))["step"] == 4
    _, xla = graph_nodes(str(tmp_path / "xla" / "train"))
    assert any("train_step" in f for f in xla)


def test_cli_mnist_split(tmp_path, idx_dir):
    """The README's MNIST command (test-split files, sliced), shortened."""
    model_dir = tmp_path / "mnist"
    proc = run_train("--dataset=mnist", f"--data_dir={idx_dir}", "--train_split=test[:8000]",
                     "--eval_split=test[8000:]", f"--model_dir={model_dir}", "--train_steps=40",
                     "--log_every=20", "--eval_every=40", "--batch_size=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train | step 40/40" in proc.stderr
    assert "eval | step 40" in proc.stderr
    assert (model_dir / "ckpt-40.index").exists()
    assert (model_dir / "reconstructions.png").exists()


def test_cli_cpu_recipe_threads_and_shards(tmp_path):
    """The README's CPU recipe: one thread per op, two shards side by side."""
    proc = run_train("--dataset=synthetic", "--train_steps=6", "--batch_size=16", "--log_every=3",
                     f"--model_dir={tmp_path / 'run'}", "--num_intra_threads=1",
                     "--num_inter_threads=2", "--batch_shards=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 replica(s) x 2 shard(s)" in proc.stderr
    assert "threads intra 1, inter 2" in proc.stderr
    assert "train | step 6/6" in proc.stderr


def test_cli_flagfile(tmp_path):
    flagfile = tmp_path / "tiny.cfg"
    flagfile.write_text("--dataset=synthetic\n--synthetic_shape=16,16,3\n--train_steps=5\n"
                        f"--model_dir={tmp_path / 'run'}\n--batch_size=8\n--log_every=5\n")
    proc = run_train(f"--flagfile={flagfile}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train | step 5/5" in proc.stderr
    assert (tmp_path / "run" / "ckpt-5.index").exists()


def test_summary_and_time_based_checkpoint_cadences(tmp_path, idx_dir):
    config = _config(tmp_path, idx_dir, train_steps=12, log_every=6, summary_every=3,
                     steps_per_loop=1, eval_every=1000, keep_checkpoints=20,
                     checkpoint_every_secs=1e-6, mode="train")
    core.run(config)
    tags = event_tags(os.path.join(config.model_dir, "train"))
    assert [s for s, _ in tags["loss"]] == [3, 6, 9, 12]  # --summary_every, not --log_every
    # Every loop is a step and more than 1e-6 s: a checkpoint after each.
    steps = sorted(int(f[5:-6]) for f in os.listdir(config.model_dir) if f.endswith(".index"))
    assert steps == list(range(1, 13))
    off = _config(tmp_path / "off", idx_dir, train_steps=12, steps_per_loop=1, eval_every=1000,
                  keep_checkpoints=20, checkpoint_every_secs=0, mode="train")
    core.run(off)
    assert sorted(f for f in os.listdir(off.model_dir) if f.endswith(".index")) == ["ckpt-12.index"]


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_weight_histograms_every_n_steps(tmp_path, idx_dir, strategy):
    """--histogram_every: every trainable weight, tagged by its path, at every N-th step and
    the last; each histogram counts all of the weight's values, and they move as the
    weights train. Off by default."""
    config = _config(tmp_path, idx_dir, train_steps=12, steps_per_loop=4, eval_every=1000,
                     histogram_every=5, mode="train", strategy=strategy,
                     num_cpu_devices=2 if strategy == "mirrored" else 0)
    core.run(config)
    sizes = {v.path: int(np.prod(v.shape))
             for v in build_autoencoder("seed", (28, 28, 1)).trainable_variables}
    acc = EventAccumulator(os.path.join(config.model_dir, "train"),
                           size_guidance={"tensors": 0})
    acc.Reload()
    assert set(sizes) <= set(acc.Tags()["tensors"])
    for tag, size in sizes.items():
        events = acc.Tensors(tag)
        assert [e.step for e in events] == [5, 10, 12], tag
        first, last = (tf.make_ndarray(e.tensor_proto) for e in (events[0], events[-1]))
        assert first[:, 2].sum() == last[:, 2].sum() == size, tag  # (k, 3): left, right, count
        assert not np.array_equal(first, last), tag
    off = _config(tmp_path / "off", idx_dir, train_steps=4, steps_per_loop=4, mode="train")
    core.run(off)
    assert not set(sizes) & set(event_tags(os.path.join(off.model_dir, "train")))


def test_vae_reports_kl_and_elbo_and_draws_samples(tmp_path, idx_dir):
    config = _config(tmp_path, idx_dir, model="vae", train_steps=20, eval_every=20)
    core.run(config)
    assert os.path.exists(os.path.join(config.model_dir, "vae_samples.png"))
    result = core.run(config.replace(mode="eval"))
    assert result["kl"] > 0
    assert result["elbo"] == pytest.approx(-(28 * 28 * result["bce"] + result["kl"]), rel=1e-5)
    tags = event_tags(os.path.join(config.model_dir, "eval"))
    assert {"kl", "elbo"} <= set(tags)


_SWEEP = """
import sys

sys.path.insert(0, sys.argv[1])
import tensorflow as tf

import core
from core import trainer

# Each run's evaluations take the compiled loop past their first batch, as a run's do once
# it has made 1,024 calls of a batch each (a sweep of such runs would take minutes here).
trainer.EVAL_CALLS_BEFORE_LOOP = 0
for i in range(6):  # a sweep in a notebook: six runs in one process
    config = core.Config(dataset="synthetic", synthetic_shape=(8, 8, 1), batch_size=16,
                         train_split="train[:256]", eval_split="test[:256]", eval_batch_size=4,
                         train_steps=4, epochs=None, eval_every=2, data_on_device=True,
                         model_dir=f"{sys.argv[2]}/run{i}", mode="train_and_eval")
    print("evaluated", len(core.run(config)["evaluations"]), flush=True)
mine = tf.function(lambda x: x + 1)  # the user's own function, retraced on every call
for n in range(1, 7):
    mine(tf.zeros([n]))
tf.get_logger().warning("a warning of the script's own")
"""


def test_a_sweep_of_runs_in_one_process_warns_of_no_retracing(tmp_path):
    """TensorFlow counts the traces of all tf.functions made from the same code together:
    each new run's own training loop, evaluation (64 batches: the first one call, the rest
    one call of the compiled eval loop), device-data reorder and figure reconstruction,
    traced once, would read as excessive retracing from the fifth run on.
    Only those warnings are dropped; a user's own function that retraces still warns, and
    once: TensorFlow's logger, given a handler of its own when imported before logging was
    configured, printed every warning twice after absl configured the root logger."""
    script = tmp_path / "sweep.py"
    script.write_text(_SWEEP)
    proc = run_script(str(script), ROOT, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("evaluated 2") == 6
    retracing = [line for line in proc.stderr.splitlines() if "triggered tf.function retracing" in line]
    assert retracing and all("calls to <function <lambda> at" in line for line in retracing), \
        retracing
    assert len(set(retracing)) == len(retracing), retracing
    assert proc.stderr.count("a warning of the script's own") == 1, proc.stderr[-3000:]
