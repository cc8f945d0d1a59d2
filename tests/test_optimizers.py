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
