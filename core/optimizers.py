"""Adam with the update of each variable in one fused op.

Keras' Adam updates every variable with about a dozen element-wise ops (two
assign-adds for the moments, then the step). TensorFlow's `ResourceApplyAdam`
kernel (CPU, GPU and XLA) does the same arithmetic in one op: the same
formula, `var -= alpha * m / (sqrt(v) + epsilon)` with
`alpha = lr * sqrt(1 - beta2^t) / (1 - beta1^t)`, and the same slot variables,
so checkpoints are interchangeable with `keras.optimizers.Adam`. For a model
of a few thousand parameters the update is launch-bound, and ten ops instead
of a hundred is the difference (benchmarks/NOTES.md).
"""

from __future__ import annotations

import tensorflow as tf

keras = tf.keras


def _handle(variable):
    """The resource handle under a Keras variable; inside `strategy.extended.update`
    a distributed variable resolves to its copy on the current device."""
    if isinstance(variable, keras.Variable):
        variable = variable.value  # the tf.Variable (or distributed variable) it wraps
    return variable.handle


class Scheduled:
    """A learning-rate schedule on a Keras optimizer: `lr_multiplier`, a zero-argument
    callable returning this step's factor on the learning-rate variable
    (core/schedules.py), read wherever Keras reads the rate (the update, weight decay,
    `optimizer.learning_rate`). None: constant. And `aggregate_gradients` (below)."""

    lr_multiplier = None
    # False: the gradients given to `apply_gradients` are already the step's, summed over
    # the replicas (the trainer all-reduces them itself, to measure and clip the whole
    # step's gradient); the optimizer then skips its own all-reduce. True: Keras' default.
    aggregate_gradients = True

    def _all_reduce_sum_gradients(self, grads_and_vars):
        if self.aggregate_gradients:
            return super()._all_reduce_sum_gradients(grads_and_vars)
        return list(grads_and_vars)

    def _get_current_learning_rate(self):
        rate = super()._get_current_learning_rate()
        if self.lr_multiplier is None:
            return rate
        return rate * tf.cast(self.lr_multiplier(), rate.dtype)


@keras.utils.register_keras_serializable("tapeloop")
class ScheduledSGD(Scheduled, keras.optimizers.SGD):
    """Keras' SGD (momentum, Nesterov) with a schedule."""


@keras.utils.register_keras_serializable("tapeloop")
class FusedAdam(Scheduled, keras.optimizers.Adam):
    """`keras.optimizers.Adam` whose per-variable update is one `ResourceApplyAdam` op.

    Falls back to Keras' update for what the fused kernel does not cover:
    amsgrad and sparse (IndexedSlices) gradients. With `weight_decay` it is AdamW: Keras
    applies the decoupled decay (var -= lr * wd * var) before the fused update.
    """

    _scalars = None  # during an update: (dtype, device) -> the step's scalar inputs

    def _distributed_tf_update_step(self, distribution, grads_and_vars, learning_rate):
        # The scalars of the step (beta powers, casts) are computed once per dtype and
        # device for all variables, not once per variable: about 60 fewer ops per step
        # for the seed model's 14 variables (benchmarks/NOTES.md section 11).
        self._scalars = {}
        try:
            super()._distributed_tf_update_step(distribution, grads_and_vars, learning_rate)
        finally:
            self._scalars = None

    def _step_scalars(self, dtype, device: str, learning_rate) -> dict:
        key = (dtype, device)
        if self._scalars is not None and key in self._scalars:
            return self._scalars[key]
        step = tf.cast(self.iterations + 1, dtype)
        scalars = dict(beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
                       beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
                       lr=tf.cast(learning_rate, dtype),
                       beta1=tf.cast(self.beta_1, dtype),
                       beta2=tf.cast(self.beta_2, dtype),
                       epsilon=tf.cast(self.epsilon, dtype))
        if self._scalars is not None:
            self._scalars[key] = scalars
        return scalars

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        handle = _handle(variable)
        return tf.raw_ops.ResourceApplyAdam(
            var=handle,
            m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]),
            grad=tf.cast(gradient, dtype),
            use_locking=False,
            **self._step_scalars(dtype, handle.device, learning_rate))


# Normalisation scales and biases are not decayed (AdamW's usual rule): Keras matches
# these against variable names.
NO_DECAY = ("bias", "gamma", "beta")


def make(name: str, learning_rate: float, weight_decay: float = 0.0, momentum: float = 0.0,
         nesterov: bool = False):
    """The optimizer `--optimizer` names: adam (fused), adamw (fused, decoupled weight decay
    except biases and normalisation scales) or sgd (momentum, Nesterov)."""
    if name == "sgd":
        return ScheduledSGD(learning_rate, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        optimizer = FusedAdam(learning_rate, weight_decay=weight_decay)
        optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
        return optimizer
    return FusedAdam(learning_rate)
