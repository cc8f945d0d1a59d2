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


def test_fused_adam_falls_back_for_amsgrad():
    ours, _ = _run(optimizers.FusedAdam, tf.distribute.get_strategy(), amsgrad=True)
    ref, _ = _run(tf.keras.optimizers.Adam, tf.distribute.get_strategy(), amsgrad=True)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6)


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
