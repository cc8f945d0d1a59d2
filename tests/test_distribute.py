"""Several devices and the compiled loop: equivalence across replica counts, XLA,
steps per loop, on-device data and precisions; tracing; strategy choice; bad input."""

import numpy as np
import pytest
import tensorflow as tf

from core import data, distribute
from core.config import Config
from core.errors import ConfigError
from core import runner
from core.runner import Run
from core.trainer import Trainer
from layers.autoencoders import build_autoencoder

BATCH = 64


@pytest.fixture(scope="module")
def images(idx_dir):
    return data.load_split("test[:1024]", "mnist", idx_dir).images


@pytest.fixture(scope="module")
def weights():
    tf.keras.utils.set_random_seed(0)
    return build_autoencoder("seed").get_weights()


def _strategy(replicas):
    if replicas == 1:
        return tf.distribute.get_strategy()
    return distribute.make_strategy("mirrored", replicas)


def _train(images, weights, replicas=1, jit=False, loops=(5, 5, 5, 5), device=False,
           precision="float32", lr=3e-3, shards=1):
    """Per-loop mean losses and final weights of a fresh trainer."""
    strategy = _strategy(replicas)
    with strategy.scope():
        model = build_autoencoder("seed", precision=precision)
        model.set_weights(weights)
        trainer = Trainer(model, strategy, BATCH, lr, precision=precision, jit_compile=jit,
                          device_data=data.DeviceData(images, BATCH, replicas, 3) if device else None,
                          seed=3, batch_shards=shards)
    iterator = None if device else iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(images, BATCH, 3, 0, ctx)))
    losses = [trainer.train_loop(iterator, n) for n in loops]
    return np.array(losses), [v.numpy() for v in model.trainable_variables], trainer


@pytest.fixture(scope="module")
def reference(images, weights):
    return _train(images, weights)


# XLA over 2 replicas, not 4: the same cross-replica code, and 4 XLA replicas took 86 s
# of the suite beside the other pytest worker (25 s alone).
@pytest.mark.parametrize("replicas,jit", [(1, False), (2, False), (4, False), (1, True),
                                          (2, True)])
def test_replica_counts_and_xla_give_the_same_losses(images, weights, reference, replicas, jit):
    losses, final, trainer = _train(images, weights, replicas, jit)
    assert trainer.strategy.num_replicas_in_sync == replicas
    np.testing.assert_allclose(losses, reference[0], rtol=1e-4)  # 20 steps, 4 loops
    for a, b in zip(final, reference[1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # Adam amplifies round-off


@pytest.mark.parametrize("replicas,shards,jit,device", [
    (1, 2, False, False), (1, 4, False, True), (2, 2, False, False), (1, 2, True, False)])
def test_batch_shards_give_the_same_losses(images, weights, reference, replicas, shards, jit,
                                           device):
    """Shards split the replica's batch; their gradients sum to the unsplit step's."""
    losses, final, trainer = _train(images, weights, replicas, jit, device=device, shards=shards)
    assert trainer.batch_shards == shards
    np.testing.assert_allclose(losses, reference[0], rtol=1e-4)
    for a, b in zip(final, reference[1]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_batch_shards_run_side_by_side(weights):
    """Each shard's convolutions, forward and backward, depend on its own slice of the
    batch only: nothing orders one shard after the other, which is what lets the
    executor run them on different cores at once."""
    model = build_autoencoder("seed")
    trainer = Trainer(model, tf.distribute.get_strategy(), BATCH, 1e-3, batch_shards=2)
    graph = tf.function(trainer.replica_forward_backward).get_concrete_function(
        tf.TensorSpec((BATCH, 28, 28, 1)), tf.zeros([2, 2], tf.int64)).graph

    memo = {}

    def slices_read(op):
        """Which outputs (0 or 1) of the batch's Split ops `op` depends on."""
        if op.name not in memo:
            found = set()
            for t in op.inputs:
                found |= {t.value_index} if t.op.type == "Split" else slices_read(t.op)
            memo[op.name] = found
        return memo[op.name]

    convs = [op for op in graph.get_operations() if op.type.startswith("Conv2D")]
    by_shard = [slices_read(op) for op in convs]
    assert all(len(s) == 1 for s in by_shard), by_shard  # no conv reads both shards
    assert by_shard.count({0}) == by_shard.count({1}) > 10  # forward and backward, each shard


@pytest.mark.parametrize("model_name", ["seed", "vae"])
def test_batch_shards_with_noise_and_sampling(images, model_name):
    """Denoising noise is drawn for the whole batch before the split, so shards change
    nothing; a VAE's samples are drawn per shard (seeds folded with the shard index)."""
    def losses(shards):
        tf.keras.utils.set_random_seed(1)
        model = build_autoencoder(model_name)
        trainer = Trainer(model, tf.distribute.get_strategy(), BATCH, 3e-3, seed=5,
                          noise_factor=0.3, batch_shards=shards)
        iterator = iter(data.train_dataset(images, BATCH, 3, 0))
        return np.array([trainer.train_loop(iterator, 4) for _ in range(3)])

    one, two = losses(1), losses(2)
    assert two[-1] < two[0]  # it learns
    if model_name == "seed":
        np.testing.assert_allclose(two, one, rtol=1e-4)
    else:  # different draws, same objective
        assert not np.allclose(two, one, rtol=1e-6) and np.allclose(two, one, rtol=0.05)


def test_bad_batch_shards(images, weights):
    with pytest.raises(ValueError, match="batch_shards=3 must be >= 1 and divide the per-replica"):
        _train(images, weights, shards=3)
    with pytest.raises(ConfigError,
                       match=r"over 2 replicas x 3 shards \(--batch_shards\): use a multiple of 6"):
        distribute.check_batch(_strategy(2), 64, 3)


def test_thread_counts_are_fixed_once_tensorflow_started():
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    distribute.set_cpu_threads(intra, 0)  # what it already is: fine
    with pytest.raises(ConfigError, match="--num_intra_threads=7: TensorFlow already started"):
        distribute.set_cpu_threads(7, 0)


def test_steps_per_loop_1_and_8_are_identical(images, weights):
    one, w_one, _ = _train(images, weights, loops=[1] * 16)
    eight, w_eight, _ = _train(images, weights, loops=[8, 8])
    np.testing.assert_allclose(eight, [one[:8].mean(), one[8:].mean()], rtol=1e-6)
    for a, b in zip(w_one, w_eight):
        np.testing.assert_array_equal(a, b)


def test_the_loop_is_traced_once(images, weights):
    # 1024 // 64 = 16 steps per epoch: these loops cross two epoch boundaries.
    _, _, trainer = _train(images, weights, loops=[1, 7, 3, 16, 8, 2])
    assert int(trainer.step.numpy()) == 37
    assert trainer.train_traces == 1


def test_the_controller_traces_once_through_a_whole_run(tmp_path, idx_dir):
    config = Config(dataset="mnist", data_dir=idx_dir, train_split="test[:640]",
                    eval_split="test[9900:]", model_dir=str(tmp_path), batch_size=64, epochs=3,
                    steps_per_loop=4, log_every=7, eval_every=10, strategy="default")
    run = Run(config)
    try:
        result = runner.train(run)
    finally:
        run.close()
    assert result["step"] == 30
    assert run.trainer.train_traces == 1


@pytest.mark.parametrize("replicas", [1, 2])
def test_data_on_device_draws_the_tf_data_batches(images, weights, reference, replicas):
    losses, _, _ = _train(images, weights, replicas, device=True)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-4)


def test_data_on_device_epoch_is_a_permutation_equal_to_tf_data():
    n = 96
    ids = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    strategy = _strategy(2)
    with strategy.scope():
        device_data = data.DeviceData(ids, 16, strategy.num_replicas_in_sync, 9)
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def batch_and_advance():
        per_replica = strategy.run(lambda: device_data.batch(step.read_value()))
        step.assign_add(1)
        return strategy.gather(per_replica, axis=0)

    device = []
    for i in range(12):
        device_data.reorder(strategy, i // 6)  # the trainer does this between loops
        device.append(np.rint(batch_and_advance().numpy()[:, 0, 0, 0] * 255))
    host = [np.rint(x.numpy()[:, 0, 0, 0] * 255)
            for x in data.train_dataset(ids, 16, 9).take(12)]
    for epoch in (slice(0, 6), slice(6, 12)):  # same multiset per epoch, all 96 examples
        assert sorted(np.concatenate(device[epoch])) == list(range(n))
    np.testing.assert_array_equal(np.concatenate(device), np.concatenate(host))


@pytest.mark.parametrize("precision,tolerance", [("mixed_bfloat16", 0.02), ("mixed_float16", 0.03)])
def test_mixed_precision_converges_near_float32(images, weights, precision, tolerance):
    loops = [20] * 6
    f32, _, _ = _train(images, weights, loops=loops)
    mixed, final, trainer = _train(images, weights, loops=loops, precision=precision)
    assert mixed[-1] < 0.75 * mixed[0]  # it learns
    assert abs(mixed[-1] - f32[-1]) <= tolerance, (mixed, f32)
    assert all(v.dtype == np.float32 for v in final)  # variables stay float32
    if precision == "mixed_float16":
        assert isinstance(trainer.optimizer, tf.keras.optimizers.LossScaleOptimizer)


def test_strategy_choice_on_cpu():
    assert distribute.default_jit_compile() is False
    assert isinstance(distribute.make_strategy("auto", 2), tf.distribute.MirroredStrategy)
    assert distribute.make_strategy("auto", 0) is tf.distribute.get_strategy()
    assert isinstance(distribute.make_strategy("one_device", 1), tf.distribute.OneDeviceStrategy)


def test_mirrored_over_one_device_with_xla_is_the_single_device_step(images, weights, reference):
    """One GPU under --strategy=mirrored: a MirroredStrategy over one device, with XLA."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = build_autoencoder("seed")
        model.set_weights(weights)
        trainer = Trainer(model, strategy, BATCH, 3e-3, jit_compile=True, seed=3)
    iterator = iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(images, BATCH, 3, 0, ctx)))
    losses = [trainer.train_loop(iterator, n) for n in (5, 5, 5, 5)]
    np.testing.assert_allclose(losses, reference[0], rtol=2e-5)
    for a, b in zip([v.numpy() for v in model.trainable_variables], reference[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_float16_overflow_on_one_replica_skips_the_step_everywhere():
    """Replica 1's inputs overflow float16, replica 0's do not: the step is skipped (the
    weights stay as they were, and finite) and the loss scale halves. Keras'
    LossScaleOptimizer alone trusted replica 0 and put the overflow into the weights."""
    strategy = _strategy(2)
    with strategy.scope():
        model = build_autoencoder("seed", precision="mixed_float16")
        trainer = Trainer(model, strategy, 16, 1e-3, precision="mixed_float16")
    images = np.random.default_rng(0).random((8, 28, 28, 1)).astype(np.float32)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(images * (1e4 if ctx.replica_id_in_sync_group == 1 else 1.0)))

    @tf.function
    def step(x):
        return strategy.run(lambda x: trainer._train_step(x), args=(x,))

    before = [v.numpy() for v in model.trainable_variables]
    scale = float(trainer.optimizer.dynamic_scale.numpy())
    step(per_replica)
    for old, var in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(var.numpy(), old)
    assert float(trainer.optimizer.dynamic_scale.numpy()) == scale / 2
    assert float(trainer.grad_norm_steps.read_value()) == 0  # the skipped step's norm: not counted
    # Both replicas' inputs fine: the step is taken.
    step(strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant(images)))
    assert not np.array_equal(model.trainable_variables[0].numpy(), before[0])
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)
    assert float(trainer.grad_norm_steps.read_value()) == 1
    assert 0 < float(trainer.grad_norm_sum.read_value()) < 10  # unscaled (the scale is 2^14)


def test_multi_worker_all_reduce_is_nccl_with_gpus():
    implementation = tf.distribute.experimental.CommunicationImplementation
    assert distribute.communication_options(8).implementation == implementation.NCCL
    assert distribute.communication_options(0).implementation == implementation.AUTO


@pytest.mark.parametrize("precision, clip_norm", [("float32", None), ("float32", 1.0),
                                                  ("mixed_float16", 1.0)])
def test_the_logged_loss_is_reduced_once_per_loop_not_every_step(images, precision, clip_norm):
    """Mirrored over 2 devices (ReductionToOneDevice): the loop body holds one AddN per
    gradient (the all-reduce) and one per replica (the sum of squares of the gradient's
    norm), and none for the loss, which is summed once after the loop. Clipping and
    float16's finiteness verdict add no all-reduce: they see the one the step makes."""
    strategy = _strategy(2)
    with strategy.scope():
        model = build_autoencoder("seed", precision=precision)
        trainer = Trainer(model, strategy, BATCH, 1e-3, precision=precision, clip_norm=clip_norm)
    dist = iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(images, BATCH, 3, 0, ctx)))
    loop = trainer._train_loop.get_concrete_function(dist, tf.TensorSpec([], tf.int32))
    bodies = [f for f in loop.graph.as_graph_def().library.function
              if "while_body" in f.signature.name]
    adds = sum(1 for f in bodies for n in f.node_def if n.op == "AddN")
    assert adds == len(model.trainable_variables) + 2
    # And the value is still every replica's share: the mean loss of the steps.
    first = trainer.train_loop(dist, 3)
    assert 0.1 < first < 1.0


def test_gpu_defaults():
    assert distribute.default_precision(None) == "float32"
    assert distribute.default_precision((6, 1)) == "float32"
    assert distribute.default_precision((7, 5)) == "mixed_float16"
    assert distribute.default_precision((8, 0)) == "mixed_bfloat16"
    assert distribute.default_precision((9, 0)) == "mixed_bfloat16"


def test_bad_distribution_input(tmp_path, idx_dir):
    with pytest.raises(ConfigError, match="found no GPU: on a CPU-only machine add --num_cpu_devices"):
        distribute.make_strategy("mirrored", 0)
    with pytest.raises(ConfigError, match="one_device found no GPU"):
        distribute.make_strategy("one_device", 0)
    with pytest.raises(ConfigError, match=r"--batch_size=30 does not divide evenly over 4 replicas"):
        distribute.check_batch(distribute.make_strategy("mirrored", 4), 30)
    config = Config(dataset="mnist", data_dir=idx_dir, train_split="test[:2000]",
                    eval_split="test[9900:]", model_dir=str(tmp_path), train_steps=1, epochs=None,
                    data_on_device=True, data_on_device_max_mb=1)
    # 2,000 MNIST images are 1.5 MB: over a 1 MB budget.
    with pytest.raises(ConfigError, match=r"the training split is 1.5 MB per device, over "
                                          r"--data_on_device_max_mb=1"):
        Run(config)


@pytest.mark.parametrize("text,message", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "no cluster with workers"),
    ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}',
     "must be a list of 'host:port' strings"),
    ('{"cluster": {"worker": ["a:1"]}}', "needs a task with type and index"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     "task worker:3 is not in the cluster"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
     "cluster has 'ps' tasks, which MultiWorkerMirroredStrategy has no role for"),
    ('{"cluster": {"chief": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}',
     "cluster has 2 chiefs: name one"),
    ('{"cluster": {"worker": ["a:1"], "evaluator": ["b:2"]}, '
     '"task": {"type": "evaluator", "index": 0}}',
     "task is the evaluator, which does not train: run it with --mode=continuous_eval"),
])
def test_malformed_tf_config(text, message):
    with pytest.raises(ConfigError, match=message):
        distribute.parse_tf_config(text)


def test_auto_joins_the_cluster_tf_config_names_in_training_only(monkeypatch):
    """A cluster manager sets TF_CONFIG on each machine: auto joins a cluster of several
    training tasks (test_multi_worker.py trains two so); one task, evaluation, an explicit
    strategy and no TF_CONFIG stay on this machine; one it cannot read is one line."""
    cluster = '{"cluster": {"chief": ["c:0"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}'
    monkeypatch.setenv("TF_CONFIG", cluster)
    assert distribute.strategy_of_cluster(Config()).strategy == "multi_worker"
    for config in (Config(mode="eval"), Config(mode="continuous_eval"), Config(mode="export"),
                   Config(strategy="mirrored"), Config(strategy="default")):
        assert distribute.strategy_of_cluster(config) == config
    for text in ('{"cluster": {"chief": ["c:0"]}, "task": {"type": "chief", "index": 0}}',
                 "{}", " "):  # one machine (Vertex AI sets this), or no cluster
        monkeypatch.setenv("TF_CONFIG", text)
        assert distribute.strategy_of_cluster(Config()).strategy == "auto"
    for text in ("{not json", '["a"]', '{"cluster": ["a:1", "b:2"]}'):
        monkeypatch.setenv("TF_CONFIG", text)  # silently trained each machine alone
        with pytest.raises(ConfigError, match="TF_CONFIG is not .*: --strategy=auto reads it to "
                           "join a cluster; fix it, or unset TF_CONFIG to train on this machine"):
            distribute.strategy_of_cluster(Config())
        assert distribute.strategy_of_cluster(Config(mode="eval")).strategy == "auto"
    # A cluster manager starts the evaluator with the trainers' command: it trained too, alone
    # into the chief's --model_dir, where the cluster had one training task.
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"chief": ["c:0"], "evaluator": ["e:0"]}, '
                                    '"task": {"type": "evaluator", "index": 0}}')
    with pytest.raises(ConfigError, match="TF_CONFIG's task is the evaluator, which does not "
                       "train: run it with --mode=continuous_eval"):
        distribute.strategy_of_cluster(Config())
    assert distribute.strategy_of_cluster(Config(mode="continuous_eval")).strategy == "auto"
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.strategy_of_cluster(Config()).strategy == "auto"


def test_valid_tf_config():
    cfg = distribute.parse_tf_config(
        '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}')
    assert cfg["task"]["index"] == 1
    # An evaluator beside the workers is theirs to ignore (it runs --mode=continuous_eval).
    assert distribute.parse_tf_config(
        '{"cluster": {"chief": ["c:0"], "worker": ["a:1"], "evaluator": ["e:3"]}, '
        '"task": {"type": "worker", "index": 0}}')["task"]["type"] == "worker"


def test_cpu_defaults_pick_the_recipe_only_where_it_pays():
    base = Config(batch_size=256, mode="train")
    recipe, line = distribute.cpu_defaults(base, num_gpus=0, cores=2)
    assert (recipe.batch_shards, recipe.num_intra_threads, recipe.num_inter_threads) == (2, 1, 2)
    assert recipe.data_on_device is None  # on if the split fits, decided once it is loaded
    assert "the CPU recipe: 2 batch shards" in line
    assert line.endswith("training data held in memory goes on the device (flags given "
                         "explicitly win)")  # not yet known: a folder's files are not
    _, line = distribute.cpu_defaults(base.replace(data_on_device=False), num_gpus=0, cores=2)
    assert "on the device" not in line
    gpu, line = distribute.cpu_defaults(base, num_gpus=1, cores=2)
    assert (gpu.batch_shards, gpu.num_intra_threads, gpu.num_inter_threads,
            gpu.data_on_device) == (1, 0, 0, False)
    assert "1 GPU(s)" in line
    small, _ = distribute.cpu_defaults(base.replace(batch_size=6), num_gpus=0, cores=2)
    assert small.batch_shards == 1 and small.num_intra_threads == 0  # 3 per core: unmeasured
    assert distribute.cpu_defaults(base.replace(batch_size=8), 0, 2)[0].batch_shards == 2
    odd, _ = distribute.cpu_defaults(base.replace(batch_size=250), num_gpus=0, cores=4)
    assert odd.batch_shards == 1  # does not divide over the cores
    mirrored, _ = distribute.cpu_defaults(base.replace(num_cpu_devices=2), num_gpus=0, cores=2)
    assert mirrored.batch_shards == 1
    evaluation, _ = distribute.cpu_defaults(base.replace(mode="eval"), num_gpus=0, cores=2)
    assert evaluation.batch_shards == 1 and evaluation.num_intra_threads == 0
    # Explicit flags win, and the rest follow them.
    given, _ = distribute.cpu_defaults(base.replace(batch_shards=4), num_gpus=0, cores=2)
    assert (given.batch_shards, given.num_intra_threads, given.num_inter_threads) == (4, 1, 4)
    threads, _ = distribute.cpu_defaults(base.replace(num_intra_threads=2), num_gpus=0, cores=2)
    assert threads.batch_shards == 1 and threads.num_intra_threads == 2
    off, _ = distribute.cpu_defaults(base.replace(data_on_device=False), num_gpus=0, cores=2)
    assert off.batch_shards == 2 and off.data_on_device is False
