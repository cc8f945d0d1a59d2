"""FusedAdam: Keras' Adam, one ResourceApplyAdam op per variable."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from core import distribute, optimizers


def _run(cls, strategy, steps=6, **kwargs):
    """Final variables after `steps` updates with gradients that depend on the variables."""
    with strategy.scope():
        variables = [tf.keras.Variable(np.linspace(-2, 3, 12, dtype=np.float32).reshape(3, 4)),
                     tf.keras.Variable(np.ones(5, np.float32))]
        optimizer = cls(0.05, **kwargs)
        optimizer.build(variables)

    @tf.function
    def step(i):
        def replica_step():
            grads = [tf.sin(variables[0] * tf.cast(i + 1, tf.float32)), tf.cos(variables[1]) - 2.0]
            optimizer.apply_gradients(zip(grads, variables))

        strategy.run(replica_step)

    for i in range(steps):
        step(tf.constant(i))
    graph = step.get_concrete_function(tf.constant(0)).graph
    optimizer.op_types = collections.Counter(op.type for op in graph.get_operations())
    return [v.numpy() for v in variables], optimizer


@pytest.mark.parametrize("replicas", [1, 2])
def test_fused_adam_matches_keras_adam(replicas):
    strategy = (tf.distribute.get_strategy() if replicas == 1
                else distribute.make_strategy("mirrored", replicas))
    ours, optimizer = _run(optimizers.FusedAdam, strategy)
    ref, adam = _run(tf.keras.optimizers.Adam, strategy)
    assert "ResourceApplyAdam" in optimizer.op_types  # the fused kernel ran...
    assert "ResourceApplyAdam" not in adam.op_types  # ...where Keras uses its own ops
    # The beta powers once per device for both variables, not once per variable.
    assert optimizer.op_types["Pow"] == 2 * replicas
    for a, b in zip(ours, ref):
        assert not np.allclose(a, np.ones_like(a))  # it moved
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # float round-off only
    assert int(optimizer.iterations.numpy()) == 6


def _numpy_amsgrad(steps=6, lr=0.05, b1=0.9, b2=0.5, eps=1e-7):
    """AMSGrad written out (Keras 3's form), on _run's variables and gradients."""
    v0 = np.linspace(-2, 3, 12, dtype=np.float64).reshape(3, 4)
    v1 = np.ones(5, np.float64)
    variables = [v0, v1]
    m = [np.zeros_like(v) for v in variables]
    v = [np.zeros_like(v) for v in variables]
    v_hat = [np.zeros_like(v) for v in variables]
    for i in range(steps):
        grads = [np.sin(variables[0] * (i + 1)), np.cos(variables[1]) - 2.0]
        t = i + 1
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for k, g in enumerate(grads):
            m[k] += (g - m[k]) * (1 - b1)
            v[k] += (g * g - v[k]) * (1 - b2)
            v_hat[k] = np.maximum(v_hat[k], v[k])
            variables[k] = variables[k] - alpha * m[k] / (np.sqrt(v_hat[k]) + eps)
    return variables


def test_fused_adam_falls_back_for_amsgrad():
    """The fused kernel has no AMSGrad: FusedAdam must leave it to Keras' update, which
    computes AMSGrad (against the formula in NumPy), not the plain Adam the kernel would.
    beta_2 = 0.5 lets the second moment fall, where AMSGrad's running maximum differs."""
    strategy = tf.distribute.get_strategy()
    ours, optimizer = _run(optimizers.FusedAdam, strategy, amsgrad=True, beta_2=0.5)
    assert "ResourceApplyAdam" not in optimizer.op_types
    expected = _numpy_amsgrad()
    plain, _ = _run(optimizers.FusedAdam, strategy, beta_2=0.5)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert any(not np.allclose(a, c, atol=1e-4) for a, c in zip(ours, plain))  # not plain Adam


def test_checkpoints_are_interchangeable_with_keras_adam(tmp_path):
    """Same slot variables: an Adam checkpoint restores into FusedAdam and training goes on
    as it would have with Adam."""
    strategy = tf.distribute.get_strategy()
    _, adam = _run(tf.keras.optimizers.Adam, strategy, steps=3)
    path = tf.train.Checkpoint(optimizer=adam).save(str(tmp_path / "adam"))
    _, fused = _run(optimizers.FusedAdam, strategy, steps=0)
    tf.train.Checkpoint(optimizer=fused).restore(path).assert_existing_objects_matched()
    assert int(fused.iterations.numpy()) == 3
    for a, b in zip(fused.variables, adam.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------- --optimizer, clipping (Trainer)
def _first_step(optimizer="adam", replicas=1, jit=False, precision="float32", **kw):
    """(trainer, weights before, after) one Trainer step of the seed model on a fixed batch
    of 16."""
    from core.trainer import Trainer
    from layers.autoencoders import build_autoencoder

    images = np.random.default_rng(0).random((16, 28, 28, 1)).astype(np.float32)
    strategy = (distribute.make_strategy("mirrored", replicas) if replicas > 1
                else tf.distribute.get_strategy())
    tf.keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_autoencoder("seed", precision=precision)
        trainer = Trainer(model, strategy, 16, 1e-2, precision, jit_compile=jit,
                          optimizer=optimizer, **kw)
    before = [v.numpy() for v in model.trainable_variables]
    batches = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(np.split(images, replicas)[ctx.replica_id_in_sync_group]))

    @tf.function
    def step(x):
        strategy.run(lambda x: trainer._train_step(x), args=(x,))

    step(batches)
    return trainer, before, [v.numpy() for v in model.trainable_variables]


def _gradients():
    """The seed model's gradient of the step's loss on that batch, from the same weights."""
    from core import losses
    from layers.autoencoders import build_autoencoder

    images = np.random.default_rng(0).random((16, 28, 28, 1)).astype(np.float32)
    tf.keras.utils.set_random_seed(0)
    model = build_autoencoder("seed")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.build("bce").per_example(images, model(images)))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def test_adamw_decays_kernels_not_biases():
    _, before, adam = _first_step("adam")
    trainer, _, adamw = _first_step("adamw", weight_decay=0.1)
    model = trainer.model
    for var, b, a, w in zip(model.trainable_variables, before, adam, adamw):
        decay = w - a  # decoupled: -lr * wd * var, applied before the same Adam update
        if "bias" in var.path:
            np.testing.assert_allclose(decay, 0, atol=1e-8)
        else:
            np.testing.assert_allclose(decay, -1e-2 * 0.1 * b, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_plain_gradient_descent_on_its_first_step(nesterov):
    g = _gradients()
    _, before, after = _first_step("sgd", momentum=0.9, nesterov=nesterov)
    # The first step from zero velocity: v = -lr g; plain w += v, Nesterov w += 0.9 v - lr g.
    factor = 1.9 if nesterov else 1.0
    for b, a, grad in zip(before, after, g):
        np.testing.assert_allclose(a - b, -1e-2 * factor * grad, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("replicas, jit, precision", [(1, False, "float32"), (1, True, "float32"),
                                                      (2, False, "float32"),
                                                      (2, False, "mixed_float16")])
def test_clip_norm_clips_the_whole_steps_gradient(replicas, jit, precision):
    """SGD without momentum shows the clipped gradient itself: after one step, w - w0 =
    -lr * g * min(1, clip / |g|) with |g| the global norm of the whole step's gradient,
    the same on 2 replicas (each holds half of it) as on one, and under loss scaling."""
    g = _gradients()
    norm = float(np.sqrt(sum(np.sum(x**2) for x in g)))
    clip = norm / 4
    _, before, after = _first_step("sgd", replicas=replicas, jit=jit, precision=precision,
                                   momentum=0.0, clip_norm=clip)
    tol = dict(rtol=2e-2, atol=1e-6) if precision == "mixed_float16" else dict(rtol=1e-3,
                                                                                 atol=1e-8)
    for b, a, grad in zip(before, after, g):
        np.testing.assert_allclose(a - b, -1e-2 * grad * clip / norm, **tol)


@pytest.mark.parametrize("replicas, jit, precision, clipped", [
    (1, False, "float32", False), (1, True, "float32", False), (2, False, "float32", False),
    (2, False, "mixed_float16", False), (2, False, "float32", True),
    (2, False, "mixed_float16", True)])
def test_grad_norm_is_the_whole_steps_before_clipping(replicas, jit, precision, clipped):
    """train/grad_norm's value: the global norm of the whole step's gradient (each replica
    holds half of it), unscaled under loss scaling, before --clip_norm (to a quarter)."""
    g = _gradients()
    norm = float(np.sqrt(sum(np.sum(x**2) for x in g)))
    trainer, before, after = _first_step("sgd", replicas=replicas, jit=jit, precision=precision,
                                         momentum=0.0, clip_norm=norm / 4 if clipped else None)
    assert float(trainer.grad_norm_steps.read_value()) == 1
    rtol = 2e-2 if precision == "mixed_float16" else 1e-4
    np.testing.assert_allclose(float(trainer.grad_norm_sum.read_value()), norm, rtol=rtol)
    step = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(after, before)))
    # The update's length (float32 round-off of w - w0: ~1e-3 of it).
    np.testing.assert_allclose(step, 1e-2 * norm / (4 if clipped else 1), rtol=max(rtol, 3e-3))


def test_clip_value_clips_each_element():
    g = _gradients()
    limit = float(np.median(np.abs(np.concatenate([x.ravel() for x in g]))))
    _, before, after = _first_step("sgd", replicas=2, momentum=0.0, clip_value=limit)
    for b, a, grad in zip(before, after, g):
        np.testing.assert_allclose(a - b, -1e-2 * np.clip(grad, -limit, limit), rtol=1e-3,
                                   atol=1e-8)


@pytest.mark.parametrize("changes, message", [
    (dict(weight_decay=0.01), "--weight_decay is AdamW's (decoupled); --optimizer=adam"),
    (dict(optimizer="adamw", weight_decay=1.5), "--weight_decay=1.5: must be in [0, 1)"),
    (dict(momentum=0.9), "--momentum and --nesterov are SGD's"),
    (dict(optimizer="sgd", momentum=1.0), "--momentum=1.0: must be in [0, 1)"),
    (dict(clip_norm=0.0), "--clip_norm=0.0: must be a positive, finite number"),
    (dict(optimizer="lamb"), "--optimizer='lamb' is unknown"),
])
def test_bad_optimizer_flags(changes, message):
    import re

    from core.config import Config
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        Config(**changes)


@pytest.mark.parametrize("replicas, jit, shards", [(1, False, 1), (1, True, 2), (2, True, 1),
                                                   (2, False, 2)])
def test_grad_accumulation_is_one_update_on_the_larger_batch(replicas, jit, shards):
    """4 micro-batches of 8 per update = one update on the batch of 32 (Adam, 3 updates)."""
    from core import data
    from core.trainer import Trainer
    from layers.autoencoders import build_autoencoder

    images = np.random.default_rng(0).integers(0, 256, (256, 28, 28, 1), dtype=np.uint8)
    strategy = (distribute.make_strategy("mirrored", replicas) if replicas > 1
                else tf.distribute.get_strategy())
    finals = []
    for accum in (1, 4):
        tf.keras.utils.set_random_seed(0)
        with strategy.scope():
            model = build_autoencoder("seed")
            trainer = Trainer(model, strategy, 32, 3e-3, jit_compile=jit, accum_steps=accum,
                              batch_shards=shards)
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: data.train_dataset(images, 32, 0, 0, ctx)))
        losses = trainer.train_loop(iterator, 3)
        finals.append((losses, [v.numpy() for v in model.trainable_variables]))
    (one_loss, one), (acc_loss, acc) = finals
    assert acc_loss == pytest.approx(one_loss, rel=1e-5)
    for a, b in zip(acc, one):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_grad_accumulation_runs_its_micro_batches_one_after_another():
    """Each micro-batch's forward pass waits for the previous one's gradients."""
    from core.trainer import Trainer
    from layers.autoencoders import build_autoencoder

    trainer = Trainer(build_autoencoder("seed"), tf.distribute.get_strategy(), 32, 1e-3,
                      accum_steps=4)
    fn = tf.function(trainer.replica_forward_backward).get_concrete_function(
        tf.TensorSpec([32, 28, 28, 1], tf.float32), tf.TensorSpec([2, 2], tf.int64))
    identities = [op for op in fn.graph.get_operations()
                  if op.type == "Identity" and op.control_inputs]
    assert len(identities) >= 3  # micro-batches 2, 3 and 4 wait
