"""The inner loop: model, optimizer, global step, and the compiled step functions.

`tf.function` and `jit_compile` are applied in one place, `Trainer.__init__`.
The step bodies (`forward_backward`, `train_step`, `eval_step`) are plain
methods that tests can call eagerly; they are traced when compiled.

What runs where (see DESIGN.md): under a multi-device MirroredStrategy an
XLA cluster that contains `strategy.run` (and so the gradient all-reduce)
fails with cross-device resource errors. So XLA compiles the per-replica
forward and backward pass, `forward_backward`, and the gradients' all-reduce
across replicas and the optimizer update run after it in the ordinary
`tf.function` that loops over K steps. With a single replica outside a mirrored
strategy there is no all-reduce, and XLA compiles the whole step, update included.

With `batch_shards` > 1 each replica's batch is split and `forward_backward`
runs once per shard (one XLA cluster each with --jit_compile); nothing orders
the shards, so with one thread per op they run on different cores at once.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf
from absl import logging

from core import augment as augment_lib
from core import data, losses, metrics, optimizers, signals

keras = tf.keras
SUM = tf.distribute.ReduceOp.SUM
# Evaluation: every batch is a compiled call of its own until a trainer has made this many
# such calls, about what the loop's one trace costs in their overhead (so a run never pays
# much more than twice the cheaper way); after that, batches past each evaluation's first
# go through a compiled loop, EVAL_BATCHES_PER_CALL a call. In one process on a CPU the
# loop paid after ~400-1,400 calls, between two workers after ~50
# (`benchmarks/eval_loop.py`, with and without --workers=2).
EVAL_CALLS_BEFORE_LOOP = 1024
EVAL_CALLS_BEFORE_LOOP_MULTI_WORKER = 64
EVAL_BATCHES_PER_CALL = 64


# A prime below Keras' seed modulus (2^31 - 2): replicas' seeds stay apart for any count.
_REPLICA_SEED_STRIDE = 1_000_003


def _split(parts: tuple, k: int) -> list[tuple]:
    """(images, draws, noise), any of the last two None, split into k along the batch."""
    pieces = [tf.split(p, k) if p is not None else [None] * k for p in parts]
    return list(zip(*pieces))


class Trainer:
    """Owns the model, the optimizer, the global step and the compiled loops.

    Build it inside `strategy.scope()`, after the model.

    Args:
      model: the autoencoder; `model(images)` returns logits.
      strategy: the distribution strategy the model was built under.
      global_batch_size: examples per step over all replicas.
      learning_rate: Adam's learning rate.
      precision: float32, mixed_float16 (adds dynamic loss scaling) or mixed_bfloat16.
      jit_compile: XLA-compile the per-replica step.
      eager: run everything eagerly (debugging); excludes jit_compile.
      device_data: if given, the training split held on every replica's device
        (`data.DeviceData`, built in the same strategy scope); each step's batch is
        drawn there and `train_loop` takes no iterator.
      seed: the seed of the denoising noise and
        the VAE's sampling; each step's draws are a function of (seed, step, replica).
      noise_factor: if > 0, train to denoise: each input gets Gaussian noise times this
        (clipped to [0, 1]) and the target is the clean image.
      augment: of `core.config.AUGMENTATIONS` (flip, crop), applied to each training
        batch (input and target), drawn per (seed, step, replica).
      xla_update: with jit_compile, also compile the optimizer update into the XLA
        cluster. None: only with one replica outside a mirrored strategy (under one it
        cannot be, see above). benchmarks/throughput.py measures both on one replica.
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
        device_data: data.DeviceData | None = None,
        seed: int = 0,
        noise_factor: float = 0.0,
        xla_update: bool | None = None,
        batch_shards: int = 1,
        loss: losses.Weighted | None = None,
        lr_multiplier=None,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        ema_decay: float | None = None,
        accum_steps: int = 1,
        augment: tuple[str, ...] = (),
    ):
        self.model = model
        self.loss = loss or losses.build("bce")
        self.strategy = strategy
        self.global_batch_size = int(global_batch_size)
        self.per_replica_batch = self.global_batch_size // strategy.num_replicas_in_sync
        self.batch_shards = int(batch_shards)
        self.accum_steps = int(accum_steps)
        micro = self.per_replica_batch // max(self.accum_steps, 1)
        if self.accum_steps < 1 or self.per_replica_batch % self.accum_steps:
            raise ValueError(f"accum_steps={accum_steps} must be >= 1 and divide the per-replica "
                             f"batch ({self.per_replica_batch})")
        if self.batch_shards < 1 or micro % self.batch_shards:
            raise ValueError(f"batch_shards={batch_shards} must be >= 1 and divide the per-replica "
                             f"micro-batch ({micro})")
        self.precision = precision
        self.jit_compile = jit_compile
        self.eager = eager
        self.seed = seed
        self.noise_factor = float(noise_factor)
        self.augment = tuple(augment)
        self.needs_seeds = (bool(self.noise_factor) or bool(self.augment)
                            or hasattr(model, "moments"))  # a VAE samples
        # What one step adds up: every replica's shards of every micro-batch.
        self.parts = strategy.num_replicas_in_sync * self.batch_shards * self.accum_steps
        # Your own model's BatchNormalization moving statistics: every batch shard and
        # replica updates them from its own examples; the step keeps the mean of those
        # updates, one value everywhere (see `_shards_forward_backward` and `train_step`).
        self.running = list(getattr(model, "running_statistics", ()))
        # Its random layers' seed generators (Dropout, ...): one copy per replica, which
        # would draw the same masks on every replica (see `replica_seeds`).
        self.random_states = list(getattr(model, "random_states", ()))
        with strategy.scope():
            optimizer = optimizers.make(optimizer, learning_rate, weight_decay, momentum,
                                        nesterov)
            if lr_multiplier is not None:  # the factor of the global step, read when applied
                optimizer.lr_multiplier = lambda: lr_multiplier(self.step)
            if precision == "mixed_float16":
                # Dynamic loss scaling keeps float16 gradients from underflowing;
                # bfloat16 has float32's exponent range and needs none.
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            # `train_step` all-reduces the gradients itself (see there): the optimizer that
            # updates the weights (under float16, the loss-scaled one's inner Adam) must not
            # sum them again.
            getattr(optimizer, "inner_optimizer", optimizer).aggregate_gradients = False
            # Create the slots now: XLA cannot lift variable creation out of a
            # compiled function, and a restored checkpoint needs them to exist.
            optimizer.build(model.trainable_variables)
            self.optimizer = optimizer
            self.step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            # Each replica adds its share of every step's loss to its own copy; reading it
            # after the loop sums the copies: one cross-replica reduce per loop, not one
            # per step (under MultiWorkerMirroredStrategy each is an all-reduce between
            # machines). Not checkpointed: it is reset at the start of every loop.
            self.loss_sum = tf.Variable(
                0.0, trainable=False, name="loss_sum",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM)
            # The sum of the loop's steps' gradient norms and the count of those steps whose
            # gradient was finite (float16 skips the others). Every replica computes the same
            # norm, of the all-reduced gradient: a read gives the first replica's copy, with
            # no communication. Not checkpointed either.
            first = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.grad_norm_sum = tf.Variable(0.0, name="grad_norm_sum", **first)
            self.grad_norm_steps = tf.Variable(0.0, name="grad_norm_steps", **first)
            self.device_data = device_data
        # (sum, count) of `grad_norm_sum` and `grad_norm_steps` over the last `train_loop`.
        self.last_grad_norms: tuple[float, int] = (0.0, 0)
        self.warned_untrained = False
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.ema_decay, self.ema = ema_decay, None
        if ema_decay:
            with strategy.scope():
                # Every replica updates its own copy from the same (all-reduced) weights, so
                # the copies agree without communication; a read gives the first replica's.
                self.ema = [tf.Variable(
                    keras.ops.convert_to_numpy(v.value).astype(np.float32), trainable=False,
                    name=f"ema_{i}", synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                    for i, v in enumerate(model.trainable_variables)]
        self.train_traces = 0  # how often the K-step loop was traced (a test reads it)
        self.eval_calls = 0  # evaluation batches that were a call of their own
        self.eval_looped = False  # whether an evaluation took the compiled loop
        self.train_graph: tf.Graph | None = None  # its last trace, for TensorBoard's Graphs tab

        # The one place where compilation is decided.
        if eager:
            compile_replica_step = compile_loop = compile_step = lambda f: f
        else:
            # No AutoGraph: nothing traced here has Python control flow on tensors (the loop
            # is a tf.while_loop), and converting the step's code cost ~2 s of every start.
            # Keras 3 traces its own train step the same way (do_not_convert).
            compile_loop = tf.function(autograph=False)
            xla = tf.function(jit_compile=True, autograph=False) if jit_compile else (lambda f: f)
            compile_replica_step = xla
            # One replica: no all-reduce, so the update can join the XLA cluster. Not under
            # a mirrored strategy, even over one device (one GPU with --strategy=mirrored):
            # its update is a merge_call, which cannot run inside a nested tf.function.
            if xla_update is None:
                mirrored = (tf.distribute.MirroredStrategy,
                            tf.distribute.MultiWorkerMirroredStrategy)
                xla_update = (strategy.num_replicas_in_sync == 1
                              and not isinstance(strategy, mirrored))
            compile_step = xla if xla_update else (lambda f: f)
        self._forward_backward = compile_replica_step(self.forward_backward)
        self._train_step = compile_step(self.train_step)
        self._eval_step = compile_replica_step(self.eval_step)
        self._train_loop = compile_loop(self._train_loop_body)
        self._eval_batch = compile_loop(self._eval_batch_body)
        self._eval_loop = compile_loop(self._eval_loop_body)

    # ----------------------------------------------------------- step bodies
    def step_seed(self, salt: int) -> tf.Tensor:
        """A stateless-RNG seed unique to (seed, salt, step, replica). Traced, per replica."""
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        draw = self.step.read_value() * self.strategy.num_replicas_in_sync + tf.cast(replica, tf.int64)
        return tf.stack([tf.constant(self.seed * 7919 + salt, tf.int64), draw])

    @staticmethod
    def noise(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Standard Gaussian noise of `shape` (stateless: a function of `seed`)."""
        return tf.random.stateless_normal(shape, seed=seed, alg="philox")

    def corrupt(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Images plus Gaussian noise times `noise_factor`, clipped to [0, 1]: a step's
        inputs, without augmentation."""
        return self.inputs_and_targets(images, None, self.noise(tf.shape(images), seed))[0]

    def forward_backward(self, inputs: tf.Tensor, targets: tf.Tensor,
                         seed: tf.Tensor) -> tuple[tf.Tensor, list]:
        """Loss and gradients for one shard of a replica's batch. Traced (XLA with --jit_compile).

        The loss is `self.loss` per example (plus the model's extra term: the VAE's
        KL), summed over the shard's examples and divided by the *global* batch size,
        so summing over shards and replicas (what the all-reduce does to the
        gradients) gives the global mean: compute_average_loss of the per-example loss.
        Your own model's Keras losses (`model.losses`: weight and activity regularizers,
        `add_loss`) are each a mean over the batch or do not depend on it, as in Keras'
        `fit`: every one of the step's `parts` adds its 1/parts share of them.
        """
        variables = self.model.trainable_variables
        targets = tf.cast(targets, tf.float32)
        with tf.GradientTape() as tape:
            logits, extra, _ = self.model.forward(inputs, training=True, seed=seed)
            logits = tf.cast(logits, tf.float32)
            taped = self.loss.taped_sum(targets, logits)  # the terms the tape differentiates
            keras_losses = self.keras_losses()  # on the tape: weight regularizers read weights
        # A term with a hand-written gradient (BCE) is computed off the tape; the tape
        # then differentiates only the model, starting from that gradient of the logits.
        hand = self.loss.hand_sum_and_gradient(targets, logits)
        # d loss / d (each example's loss), times the loss scale under mixed_float16.
        scale = self.optimizer.scale_loss(tf.constant(1.0 / self.global_batch_size))
        total, outputs, output_grads = tf.reduce_sum(extra), [extra], [tf.fill(tf.shape(extra),
                                                                               scale)]
        if hand is not None:
            total += hand[0]
            outputs.append(logits)
            output_grads.append(hand[1] * scale)
        if taped is not None:
            total += taped
            outputs.append(taped)
            output_grads.append(scale)
        mean = total / self.global_batch_size
        if keras_losses is not None:
            mean += keras_losses / self.parts
            outputs.append(keras_losses)
            output_grads.append(self.optimizer.scale_loss(tf.constant(1.0 / self.parts)))
        grads = tape.gradient(outputs, variables, output_gradients=output_grads)
        return mean, grads

    def keras_losses(self) -> tf.Tensor | None:
        """The sum of the model's Keras losses from its last call (float32), or None if it
        has none (the built-in models)."""
        found = self.model.losses
        return tf.add_n([tf.cast(x, tf.float32) for x in found]) if found else None

    def inputs_and_targets(self, images: tf.Tensor, draws: tf.Tensor | None,
                           noise: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """A shard's targets (the images, augmented by their `draws`) and inputs (the
        targets plus `noise` times `noise_factor`, clipped to [0, 1]). Traced per shard, so
        the augmentation runs side by side on every shard's core."""
        targets = augment_lib.apply(images, self.augment, draws) if draws is not None else images
        if noise is None:
            return targets, targets
        return tf.clip_by_value(targets + self.noise_factor * noise, 0.0, 1.0), targets

    def replica_forward_backward(self, images: tf.Tensor,
                                 seeds: tf.Tensor) -> tuple[tf.Tensor, list]:
        """The replica's loss and gradients: the sum over `accum_steps` micro-batches, one
        after another, each one pass or the sum over `batch_shards` shards side by side.

        The draws of the augmentation and the denoising noise are made for the replica's
        whole batch and split with it: each example's are the same for any split."""
        draws = (augment_lib.draws(tf.shape(images)[0], seeds[2]) if self.augment else None)
        noise = self.noise(tf.shape(images), seeds[0]) if self.noise_factor else None
        parts = (images, draws, noise)
        if self.accum_steps == 1:
            return self._shards_forward_backward(parts, seeds[1])
        loss, grads = None, None
        for i, micro in enumerate(_split(parts, self.accum_steps)):
            seed = tf.random.experimental.stateless_fold_in(seeds[1], 1000 + i) \
                if self.needs_seeds else seeds[1]
            # One micro-batch after another: each starts when the previous one's gradients
            # exist, so only one micro-batch's activations are alive at a time.
            with tf.control_dependencies(grads or []):
                micro = tuple(None if p is None else tf.identity(p) for p in micro)
            micro_loss, micro_grads = self._shards_forward_backward(micro, seed)
            loss = micro_loss if loss is None else loss + micro_loss
            grads = micro_grads if grads is None else [a + b for a, b in zip(grads, micro_grads)]
        return loss, grads

    def _shards_forward_backward(self, parts, seed) -> tuple[tf.Tensor, list]:
        """One micro-batch, `parts` = (images, draws, noise): one pass, or the sum over
        `batch_shards` shards."""
        if self.batch_shards == 1:
            return self._forward_backward(*self.inputs_and_targets(*parts), seed)
        losses, shard_grads = [], []
        # Running statistics: each shard updates them from the values before the step, and
        # they end as the mean of the shards' results (as replicas' are, in train_step), not
        # as one update after another. The reads and assigns run in the order written here
        # (tf.function orders the ops on one variable); the shards' other ops do not wait.
        before = [tf.identity(v.value) for v in self.running]
        updated = []
        for i, shard in enumerate(_split(parts, self.batch_shards)):
            shard_seed = tf.random.experimental.stateless_fold_in(seed, i) \
                if self.needs_seeds else seed
            if i and self.running:
                updated.append([tf.identity(v.value) for v in self.running])
                for v, value in zip(self.running, before):
                    v.assign(value)
            loss, grads = self._forward_backward(*self.inputs_and_targets(*shard), shard_seed)
            losses.append(loss)
            shard_grads.append(grads)
        if self.running:
            updated.append([tf.identity(v.value) for v in self.running])
            for v, *values in zip(self.running, *updated):
                v.assign(tf.add_n(values) / len(values))
        return tf.add_n(losses), [tf.add_n(list(g)) for g in zip(*shard_grads)]

    def train_step(self, images: tf.Tensor) -> tf.Tensor:
        """One optimisation step on one replica; returns its share of the loss. Traced."""
        if self.needs_seeds:
            # noise, VAE sampling, augmentation
            seeds = tf.stack([self.step_seed(1), self.step_seed(2), self.step_seed(3)])
        else:  # nothing random in this step: keep the seed ops off the hot path
            seeds = tf.zeros([3, 2], tf.int64)
        with self.replica_seeds():
            loss, grads = self.replica_forward_backward(images, seeds)
        variables = self.model.trainable_variables
        if any(g is None for g in grads):  # weights the loss does not depend on: not trained
            if not self.warned_untrained:  # tracing, once per replica: say it once
                self.warned_untrained = True
                paths = [v.path for v, g in zip(variables, grads) if g is None]
                logging.warning("the loss does not depend on %s: %s not trained (a layer "
                                "your model builds but never calls?)", ", ".join(paths),
                                "it is" if len(paths) == 1 else "they are")
            variables = [v for v, g in zip(variables, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if self.strategy.num_replicas_in_sync > 1:
            # The step's gradient, on every replica: the step's one all-reduce, made here
            # instead of inside the optimizer (aggregate_gradients=False), so that what
            # follows sees the whole step's gradient. Keras' optimizers would measure and
            # clip each replica's share before their all-reduce, and LossScaleOptimizer
            # would trust replica 0's verdict on finiteness (an overflow on replica 1 alone
            # went into the weights); a sum is non-finite if any replica's part is.
            grads = tf.distribute.get_replica_context().all_reduce(SUM, grads)
        scale = None
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32)
        norm = self.record_grad_norm(grads, scale)
        if self.clip_norm or self.clip_value:
            grads = self.clip(grads, norm, scale)
        self.optimizer.apply_gradients(zip(grads, variables))
        if self.running and self.strategy.num_replicas_in_sync > 1:
            # Keras' moving statistics are one copy per replica, each updated from its own
            # examples: without this they drift apart, a checkpoint keeps the first
            # replica's, and each replica evaluates with its own.
            context = tf.distribute.get_replica_context()
            means = context.all_reduce(tf.distribute.ReduceOp.MEAN,
                                       [tf.identity(v.value) for v in self.running])
            for v, mean in zip(self.running, means):
                v.assign(mean)
        if self.ema is not None:
            d = self.ema_decay
            for average, var in zip(self.ema, self.model.trainable_variables):
                average.assign(d * average + (1.0 - d) * tf.cast(var.value, tf.float32))
        self.loss_sum.assign_add(loss)  # this replica's copy only
        return loss

    @contextlib.contextmanager
    def replica_seeds(self):
        """Inside the block, each replica's copy of the random layers' seed generators draws
        its own numbers: the seed (the state's first element; a draw increments the second)
        is offset by the replica's index, and set back after the block, so the copies stay
        equal between steps and in checkpoints. Keras' `fit` draws the same Dropout masks
        on every replica."""
        replicas = self.strategy.num_replicas_in_sync
        if replicas == 1 or not self.random_states:
            yield
            return
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        offset = tf.stack([tf.cast(replica, tf.int64) * _REPLICA_SEED_STRIDE,
                           tf.constant(0, tf.int64)])
        for state in self.random_states:
            state.assign(state.value + tf.cast(offset, state.dtype))
        yield
        for state in self.random_states:
            state.assign(state.value - tf.cast(offset, state.dtype))

    def record_grad_norm(self, grads: list, scale: tf.Tensor | None) -> tf.Tensor:
        """The global norm of the step's gradient, `grads` (times the loss `scale`, if any),
        added to `grad_norm_sum` (unscaled; under loss scaling only if finite). Traced, per
        replica, after the all-reduce: one sum of squares per variable, and a few scalars
        (benchmarks/NOTES.md section 19)."""
        with tf.name_scope("grad_norm"):
            norm = tf.sqrt(2.0 * tf.add_n([tf.nn.l2_loss(tf.cast(g, tf.float32))
                                           for g in grads]))
            if scale is None:  # a non-finite gradient makes the loss non-finite: the run stops
                self.grad_norm_sum.assign_add(norm)
                self.grad_norm_steps.assign_add(1.0)
                return norm
            unscaled = norm / scale
            finite = tf.math.is_finite(unscaled)  # float16 skips the step, halves the scale
            self.grad_norm_sum.assign_add(tf.where(finite, unscaled, 0.0))
            self.grad_norm_steps.assign_add(tf.cast(finite, tf.float32))
            return norm

    def clip(self, grads: list, norm: tf.Tensor, scale: tf.Tensor | None) -> list:
        """The step's gradient (all-reduced), clipped to `clip_value` element by element and
        then to the global norm `clip_norm`; `norm` is its global norm. Traced, per replica.
        Under float16 the gradients are still multiplied by the loss `scale`, and so are the
        limits."""
        scale = tf.constant(1.0) if scale is None else scale
        if self.clip_value:
            grads = [tf.clip_by_value(g, -self.clip_value * scale, self.clip_value * scale)
                     for g in grads]
            norm = None  # changed by the value clip: clip_by_global_norm measures it again
        if self.clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm * scale, use_norm=norm)
        return grads

    def _train_loop_body(self, iterator, num_steps: tf.Tensor) -> tf.Tensor:
        """`num_steps` steps in one call; returns their mean loss (on the device). Traced once."""
        self.train_traces += 1  # Python side effect: runs only while tracing
        self.train_graph = tf.compat.v1.get_default_graph()  # the FuncGraph being traced
        def reset():
            self.loss_sum.assign(0.0)
            self.grad_norm_sum.assign(0.0)
            self.grad_norm_steps.assign(0.0)

        self.strategy.run(reset)

        def step(i):
            if self.device_data is not None:
                losses = self.strategy.run(
                    lambda: self._train_step(self.device_data.batch(self.step.read_value())))
            else:
                # A lambda, never the tf.function itself: strategy.run would lift a
                # jit-compiled tf.function around all replicas (the failure above).
                losses = self.strategy.run(lambda x: self._train_step(x), args=(next(iterator),))
            # The count follows the step: automatic control dependencies order only ops on
            # the same resource, so without this a batch that fails to load (a bad file)
            # was counted as a step, and the run resumed past it.
            with tf.control_dependencies(self.strategy.experimental_local_results(losses)):
                counted = self.step.assign_add(1)
            with tf.control_dependencies([counted]):
                return [i + 1]  # the loop variables' structure (eager mode checks it)

        tf.while_loop(lambda i: i < num_steps, step, [tf.constant(0, num_steps.dtype)])
        # Reading the on-read variable sums the replicas' copies: the loop's one reduce.
        return (self.loss_sum.read_value() / tf.cast(num_steps, tf.float32),
                self.grad_norm_sum.read_value(), self.grad_norm_steps.read_value())

    def eval_step(self, inputs: tf.Tensor, targets: tf.Tensor,
                  weights: tf.Tensor) -> dict[str, tf.Tensor]:
        """Per-replica weighted sums of every metric, and the weight total. Traced.

        `inputs` are the (possibly noisy) images the model sees, `targets` the
        clean ones it should return. A VAE adds its KL and the ELBO (nats per example).
        With `batch_shards` > 1 the batch is split into that many shards side by side, as
        the training step does: on a CPU with one thread per op, that keeps every core
        busy during evaluation too.
        """
        shards = self.batch_shards if inputs.shape[0] and inputs.shape[0] % self.batch_shards == 0 \
            else 1
        if shards == 1:
            return self._eval_sums(inputs, targets, weights)
        parts = [self._eval_sums(*part) for part in zip(*(tf.split(t, shards) for t in
                                                          (inputs, targets, weights)))]
        return {name: tf.add_n([part[name] for part in parts]) for name in parts[0]}

    def _eval_sums(self, inputs: tf.Tensor, targets: tf.Tensor,
                   weights: tf.Tensor) -> dict[str, tf.Tensor]:
        logits, extra_loss, extra = self.model.forward(inputs, training=False)
        per_example = metrics.reconstruction_metrics(targets, logits)
        # The training loss, as the training step computes it (with the VAE's weighted KL).
        per_example["loss"] = self.loss.per_example(targets, logits) + extra_loss
        keras_losses = self.keras_losses()  # and your model's regularizers, as fit's val_loss
        if keras_losses is not None:
            per_example["loss"] += keras_losses
        if "kl" in extra:
            pixels = float(np.prod(logits.shape[1:]))
            per_example["kl"] = extra["kl"]
            per_example["elbo"] = -(pixels * per_example["bce"] + extra["kl"])
        sums = {name: tf.reduce_sum(value * weights) for name, value in per_example.items()}
        sums["count"] = tf.reduce_sum(weights)
        return sums

    def _eval_batch_body(self, inputs, targets, weights) -> dict[str, tf.Tensor]:
        names = []

        def replica_sums(i, t, w):  # stacked: one all-reduce for them all
            sums = self._eval_step(i, t, w)
            names[:] = sorted(sums)
            return tf.stack([sums[name] for name in names])

        per_replica = self.strategy.run(replica_sums, args=(inputs, targets, weights))
        return dict(zip(names, tf.unstack(self.strategy.reduce(SUM, per_replica, axis=None))))

    def _eval_loop_body(self, iterator, max_batches: tf.Tensor,
                        totals: dict[str, tf.Tensor]) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """`totals` plus the sums of the next `max_batches` batches of `iterator`, or of as
        many as it has left, and how many that was. Traced once, when `evaluate` first
        takes the loop."""
        def body(read, totals, more):
            batch = iterator.get_next_as_optional()
            more = batch.has_value()
            # The batch function's body, traced again: under MultiWorkerMirroredStrategy,
            # the compiled function itself, called here, left its collectives' keys unfed.
            totals = tf.cond(more, lambda: {name: totals[name] + value for name, value in
                                            self._eval_batch_body(*batch.get_value()).items()},
                             lambda: totals)
            return read + tf.cast(more, read.dtype), totals, more

        read, totals, _ = tf.while_loop(lambda read, totals, more: more & (read < max_batches),
                                        body, [tf.zeros_like(max_batches), totals,
                                               tf.constant(True)])
        return totals, read

    # ------------------------------------------------------------- host API
    def train_loop(self, iterator, num_steps: int) -> float:
        """Runs `num_steps` steps and returns their mean loss; `last_grad_norms` holds the
        sum of their gradients' global norms and how many steps it sums (those whose
        gradient was finite).

        `num_steps` enters the compiled loop as a tensor, so changing it never
        retraces. Reading the loss with float() is the loop's one host-device
        sync: it waits for all `num_steps` steps to finish (with data on the device, a
        loop that crosses an epoch's end is two calls, and two syncs).
        """
        if self.device_data is None:
            loss, norms, steps = self._train_loop(iterator, tf.constant(num_steps, tf.int32))
            self.last_grad_norms = (float(norms), int(steps))
            return float(loss)
        # Data on the device: one compiled loop per epoch piece, each epoch's order put on
        # the device first, so the loop holds no per-step branch (see DeviceData).
        data_ = self.device_data
        total, done, norm_sum, norm_steps = 0.0, 0, 0.0, 0
        while done < num_steps:
            step = int(self.step.numpy())
            data_.reorder(self.strategy, step // data_.steps_per_epoch)
            n = min(num_steps - done, data_.steps_per_epoch - step % data_.steps_per_epoch)
            loss, norms, steps = self._train_loop(None, tf.constant(n, tf.int32))
            total += float(loss) * n
            norm_sum, norm_steps = norm_sum + float(norms), norm_steps + int(steps)
            done += n
        self.last_grad_norms = (norm_sum, norm_steps)
        return total / num_steps

    def evaluate(self, dist_dataset) -> dict[str, float]:
        """Means of every metric over a distributed `data.eval_dataset` of
        (inputs, targets, weights).

        Each batch is a compiled call of its own until this trainer has made
        `EVAL_CALLS_BEFORE_LOOP` of them (`..._MULTI_WORKER` between workers); then the
        batches past an evaluation's first go through a compiled loop,
        `EVAL_BATCHES_PER_CALL` a call. A call per batch costs a few ms on a CPU, most of an
        evaluation in small batches, but the loop's trace costs what several hundred such
        calls do: a run that evaluates little never traces it, one that evaluates much pays
        for it once (`benchmarks/eval_loop.py`); between workers a call costs more and the
        loop pays after a few dozen. The counts are fixed, never timed: every worker of a
        cluster makes the same calls, whose collectives must meet. The sums of a batch are
        one all-reduce, not one each. A deferred Ctrl-C waits for one call.
        """
        iterator = iter(dist_dataset)
        totals: dict[str, tf.Tensor] = {}
        per_call = tf.constant(EVAL_BATCHES_PER_CALL, tf.int32)
        calls_before_loop = (
            EVAL_CALLS_BEFORE_LOOP_MULTI_WORKER
            if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
            else EVAL_CALLS_BEFORE_LOOP)
        while True:
            signals.interruption_point()  # a deferred Ctrl-C, never inside a traced call
            if totals and self.eval_calls >= calls_before_loop:
                if not self.eval_looped:  # once: the loop's trace may pause the evaluation
                    self.eval_looped = True
                    logging.info("evaluation: after %s calls of one batch each, a compiled "
                                 "loop of %d batches a call from here", f"{calls_before_loop:,}",
                                 EVAL_BATCHES_PER_CALL)
                totals, read = self._eval_loop(iterator, per_call, totals)
                if int(read) < EVAL_BATCHES_PER_CALL:  # the call's one host sync
                    break
                continue
            batch = next(iterator, None)  # the first batch gives the sums' structure
            if batch is None:
                break
            self.eval_calls += 1
            for name, value in self._eval_batch(*batch).items():
                totals[name] = totals.get(name, 0.0) + value
        count = float(totals.pop("count"))  # host sync, once per evaluation
        return {name: float(value) / count for name, value in totals.items()}

    def reset_ema(self) -> None:
        """The average starts again from the current weights."""
        for average, var in zip(self.ema or [], self.model.trainable_variables):
            value = keras.ops.convert_to_numpy(var.value).astype(np.float32)
            self.strategy.run(lambda a=average, x=value: a.assign(x))

    def load_ema(self) -> None:
        """Puts the average into the model's weights (eval and export)."""
        for average, var in zip(self.ema or [], self.model.trainable_variables):
            var.assign(tf.cast(average.read_value(), var.dtype))

    @contextlib.contextmanager
    def ema_weights(self):
        """The model holds the average inside the block, its own weights again after it."""
        if self.ema is None:
            yield
            return
        raw = [keras.ops.convert_to_numpy(v.value) for v in self.model.trainable_variables]
        self.load_ema()
        try:
            yield
        finally:
            for var, value in zip(self.model.trainable_variables, raw):
                var.assign(value)

    def set_learning_rate(self, value: float) -> None:
        """Sets the base rate: the (checkpointed) variable a schedule multiplies."""
        self.optimizer.learning_rate = value  # assigns the variable

    @property
    def base_learning_rate(self) -> float:
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        return float(keras.ops.convert_to_numpy(inner._learning_rate))  # noqa: SLF001

    @property
    def learning_rate(self) -> float:
        """The rate of the next step: the base rate times the schedule's factor."""
        return float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
