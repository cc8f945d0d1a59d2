"""The inner loop: model, optimizer, global step, and the compiled step functions.

`tf.function` and `jit_compile` are applied in one place, `Trainer.__init__`.
The step bodies (`forward_backward`, `train_step`, `eval_step`) are plain
methods that tests can call eagerly; they are traced when compiled.

What runs where (see DESIGN.md): under a multi-device MirroredStrategy an
XLA cluster that contains `strategy.run` (and so the gradient all-reduce)
fails with cross-device resource errors. So XLA compiles the per-replica
forward and backward pass, `forward_backward`, and the optimizer update, which
all-reduces the gradients across replicas, runs after it in the ordinary
`tf.function` that loops over K steps.
"""

from __future__ import annotations

import tensorflow as tf

from core import metrics

keras = tf.keras


class Trainer:
    """Owns the model, the optimizer, the global step and the compiled loops.

    Build it inside `strategy.scope()`, after the model.
    """

    def __init__(
        self,
        model: keras.Model,
        strategy: tf.distribute.Strategy,
        global_batch_size: int,
        learning_rate: float,
        precision: str = "float32",
        jit_compile: bool = False,
        eager: bool = False,
    ):
        self.model = model
        self.strategy = strategy
        self.global_batch_size = int(global_batch_size)
        self.precision = precision
        self.jit_compile = jit_compile
        self.eager = eager
        with strategy.scope():
            optimizer = keras.optimizers.Adam(learning_rate)
            if precision == "mixed_float16":
                # Dynamic loss scaling keeps float16 gradients from underflowing;
                # bfloat16 has float32's exponent range and needs none.
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            # Create the slots now: XLA cannot lift variable creation out of a
            # compiled function, and a restored checkpoint needs them to exist.
            optimizer.build(model.trainable_variables)
            self.optimizer = optimizer
            self.step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.train_traces = 0  # how often the K-step loop was traced (a test reads it)

        # The one place where compilation is decided.
        if eager:
            self._forward_backward = self.forward_backward
            self._eval_step = self.eval_step
            self._train_loop = self._train_loop_body
            self._eval_batch = self._eval_batch_body
        else:
            xla = tf.function(jit_compile=True) if jit_compile else (lambda f: f)
            self._forward_backward = xla(self.forward_backward)
            self._eval_step = xla(self.eval_step)
            self._train_loop = tf.function(self._train_loop_body)
            self._eval_batch = tf.function(self._eval_batch_body)

    # ----------------------------------------------------------- step bodies
    def forward_backward(self, images: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """Per-replica loss and gradients for a batch of images. Traced (XLA with --jit_compile).

        The loss is the per-pixel BCE averaged per example, then summed over the
        replica's examples and divided by the *global* batch size, so summing over
        replicas (what the all-reduce does to the gradients) gives the global mean.
        """
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)  # (b, H, W, C) float32
            per_example = metrics.bce_from_logits(images, logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.global_batch_size)
            scaled = self.optimizer.scale_loss(loss)  # identity unless mixed_float16
        return loss, tape.gradient(scaled, variables)

    def train_step(self, images: tf.Tensor) -> tf.Tensor:
        """One optimisation step on one replica; returns its share of the loss. Traced."""
        loss, grads = self._forward_backward(images)
        # In replica context, apply_gradients all-reduces (sums) the gradients.
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss

    def _train_loop_body(self, iterator, num_steps: tf.Tensor) -> tf.Tensor:
        """`num_steps` steps in one call; returns their mean loss (on the device). Traced once."""
        self.train_traces += 1  # Python side effect: runs only while tracing
        total = tf.constant(0.0, tf.float32)
        for _ in tf.range(num_steps):
            per_replica = self.strategy.run(self.train_step, args=(next(iterator),))
            total += self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        self.step.assign_add(tf.cast(num_steps, tf.int64))
        return total / tf.cast(num_steps, tf.float32)

    def eval_step(self, images: tf.Tensor, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        """Per-replica weighted sums of every metric, and the weight total. Traced."""
        logits = self.model(images, training=False)
        per_example = metrics.reconstruction_metrics(images, logits)
        sums = {name: tf.reduce_sum(value * weights) for name, value in per_example.items()}
        sums["count"] = tf.reduce_sum(weights)
        return sums

    def _eval_batch_body(self, images, weights) -> dict[str, tf.Tensor]:
        # A plain lambda, not the tf.function itself: strategy.run would lift a
        # jit-compiled tf.function around all replicas, the failing case above.
        per_replica = self.strategy.run(lambda i, w: self._eval_step(i, w), args=(images, weights))
        return {name: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for name, value in per_replica.items()}

    # ------------------------------------------------------------- host API
    def train_loop(self, iterator, num_steps: int) -> float:
        """Runs `num_steps` steps and returns their mean loss.

        `num_steps` enters the compiled loop as a tensor, so changing it never
        retraces. Reading the loss with float() is the loop's one host-device
        sync: it waits for all `num_steps` steps to finish.
        """
        loss = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
        return float(loss)

    def evaluate(self, dist_dataset) -> dict[str, float]:
        """Means of every metric over a distributed `data.eval_dataset`."""
        totals: dict[str, tf.Tensor] = {}
        for images, weights in dist_dataset:
            for name, value in self._eval_batch(images, weights).items():
                totals[name] = totals.get(name, 0.0) + value
        count = float(totals.pop("count"))  # host sync, once per evaluation
        return {name: float(value) / count for name, value in totals.items()}

    @property
    def learning_rate(self) -> float:
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
