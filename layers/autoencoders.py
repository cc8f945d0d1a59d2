"""Encoder, Decoder and Autoencoder as subclassed Keras models, and the registry.

The registry maps a `--model` name to keyword arguments of `build_autoencoder`.
Every entry is a configuration of the same blocks (`layers.blocks`), never a
copy of code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from layers import blocks, resnet
from layers.registry import FACTORIES, MODELS, import_module_attr
from layers.registry import ModelSpec, register  # noqa: F401 - live there, imported from here too

keras = tf.keras


class _Stack(keras.Model):
    """Holds its blocks as attributes `block0`, `block1`, ...: TensorFlow checkpoints track
    attributes, but not the lists Keras 3 wraps (a list would leave the blocks' weights
    out of a model-only checkpoint)."""

    def _set_blocks(self, layers) -> None:
        self._num_blocks = len(layers)
        for i, layer in enumerate(layers):
            setattr(self, f"block{i}", layer)

    @property
    def blocks(self) -> list:
        return [getattr(self, f"block{i}") for i in range(self._num_blocks)]

    # How the stack computes: None, as its layers say; or faster forms of the same
    # function, chosen once by the runner (layers/fast_forms.py).
    forms = None


def downsampled_size(size: int, times: int) -> int:
    """Size after `times` 'same'-padded halvings (each rounds up)."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


@keras.utils.register_keras_serializable("tapeloop")
class Encoder(_Stack):
    """Stack of down-sampling blocks: (B, H, W, C) -> (B, ceil(H/2^n), ceil(W/2^n), filters[-1])."""

    def __init__(self, filters: Sequence[int] = (8, 4, 4), kernel_size: int = 4,
                 down: str = "pool", activation: str = "relu", **kwargs):
        super().__init__(**kwargs)
        if down not in blocks.DOWN_BLOCKS:
            raise ValueError(f"down={down!r}: expected one of {sorted(blocks.DOWN_BLOCKS)}")
        self.filters = tuple(int(f) for f in filters)
        self.kernel_size = int(kernel_size)
        self.down = down
        self.activation = activation
        block = blocks.DOWN_BLOCKS[down]
        self._set_blocks([
            block(f, self.kernel_size, activation, dtype=self.dtype_policy, name=f"down{i}")
            for i, f in enumerate(self.filters)
        ])

    def call(self, inputs, training=None):
        if self.forms is not None:
            return self.forms(self.blocks, inputs)
        x = inputs
        for block in self.blocks:
            x = block(x, training=training)  # each halves H and W, rounding up
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "down": self.down, "activation": self.activation}


@keras.utils.register_keras_serializable("tapeloop")
class Decoder(_Stack):
    """From the code back to the image, retracing the encoder's sizes in reverse, and
    returning logits (float32, also under mixed precision, so the loss and the
    sigmoid stay numerically safe).

    up='upsample' (the tutorial's decoder): conv, then (2x upsample, conv) per
      stage, the last conv linear with `channels` filters: the logits.
    up='transpose': one stride-2 Conv2DTranspose per stage, then a 'same' conv
      to `channels` logits (the keras.io denoiser).
    """

    def __init__(self, filters: Sequence[int] = (4, 4, 8), kernel_size: int = 4,
                 output_shape: Sequence[int] = (28, 28, 1), up: str = "upsample",
                 activation: str = "relu", **kwargs):
        super().__init__(**kwargs)
        if up not in blocks.UP_BLOCKS:
            raise ValueError(f"up={up!r}: expected one of {sorted(blocks.UP_BLOCKS)}")
        self.filters = tuple(int(f) for f in filters)
        self.kernel_size = int(kernel_size)
        self.image_shape = tuple(int(d) for d in output_shape)
        self.up = up
        self.activation = activation
        height, width, channels = self.image_shape
        n = len(self.filters)
        # sizes[j]: the encoder's size after j halvings; stage i of n restores sizes[n - i].
        sizes = [(downsampled_size(height, j), downsampled_size(width, j)) for j in range(n + 1)]
        k, act, policy = self.kernel_size, activation, self.dtype_policy
        if up == "upsample":
            stages = [blocks.ConvPool(self.filters[0], k, act, pool=False, dtype=policy,
                                      name="up0")]
            stages += [
                blocks.UpsampleConv(f, k, act, target_size=sizes[n - i], dtype=policy, name=f"up{i}")
                for i, f in enumerate(self.filters[1:], start=1)]
            self.to_logits = blocks.UpsampleConv(channels, k, None, target_size=sizes[0],
                                                 dtype="float32", name="logits")
        else:
            stages = [
                blocks.ConvTransposeUp(f, k, act, target_size=sizes[n - 1 - i], dtype=policy,
                                       name=f"up{i}")
                for i, f in enumerate(self.filters)]
            self.to_logits = keras.layers.Conv2D(channels, k, padding="same", dtype="float32",
                                                 name="logits")
        self._set_blocks(stages)

    def call(self, inputs, training=None):
        if self.forms is not None:
            return self.forms([*self.blocks, self.to_logits], inputs)
        x = inputs
        for block in self.blocks:
            x = block(x, training=training)  # (B, 7, 7, 4), (B, 14, 14, 8) for the seed model
        return self.to_logits(x)  # (B, H, W, C), float32 logits

    def get_config(self) -> dict:
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "output_shape": self.image_shape, "up": self.up, "activation": self.activation}


@keras.utils.register_keras_serializable("tapeloop")
class Autoencoder(keras.Model):
    """Encoder and decoder. `call` returns logits; the decoder sees only the code."""

    def __init__(self, encoder: Encoder, decoder: Decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        # Paths of the float variables that the training pass itself updates (Keras'
        # BatchNormalization moving statistics): set by `build_user_model`, which finds them
        # in the traced pass; the built-in models have none.
        self.running_paths = frozenset()
        # The stateful random ops of its training pass (tf.random.normal, ...): their state
        # is inside the kernels, not in any variable a checkpoint could keep.
        self.stateful_random_ops = ()

    @property
    def running_statistics(self) -> list:
        """The float variables a training pass updates, not the optimizer: moving averages
        of batch statistics. The trainer keeps one value of them over batch shards and
        replicas (the mean of their updates)."""
        return [v for v in self.non_trainable_variables if v.path in self.running_paths]

    @property
    def random_states(self) -> list:
        """The states of the random layers' seed generators (Keras' Dropout, GaussianNoise,
        random augmentation layers): part of the model's state, though not of its weights,
        so that a resumed run draws what the uninterrupted one would have."""
        weights = {id(w) for w in self.weights}
        return [v for v in self.variables if id(v) not in weights]

    def call(self, inputs, training=None):
        return self.decode_logits(self.encode(inputs, training=training), training=training)

    def encode(self, images, training=None):
        """Images in [0, 1], (B, H, W, C) -> code (B, h, w, c)."""
        return self.encoder(images, training=training)

    def decode_logits(self, code, training=None):
        """Code -> logits (float32)."""
        return tf.cast(self.decoder(code, training=training), tf.float32)

    def decode(self, code, training=None):
        """Code -> images in [0, 1] (float32)."""
        return tf.sigmoid(self.decode_logits(code, training=training))

    def forward(self, images, training=None, seed=None):
        """What the training step needs: (logits, extra loss per example, extra metrics).

        A plain autoencoder has no extra term; the VAE adds its KL divergence.
        `seed` (a [2] int tensor) drives any sampling, statelessly.
        """
        del seed
        logits = self(images, training=training)
        return logits, tf.zeros(tf.shape(logits)[:1], tf.float32), {}

    def reconstruct(self, images, training=None):
        """Images -> reconstructed images in [0, 1] (float32)."""
        return tf.sigmoid(self(images, training=training))

    def get_config(self) -> dict:
        return {**super().get_config(),
                "encoder": keras.utils.serialize_keras_object(self.encoder),
                "decoder": keras.utils.serialize_keras_object(self.decoder)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = keras.utils.deserialize_keras_object(config.pop("encoder"))
        decoder = keras.utils.deserialize_keras_object(config.pop("decoder"))
        return cls(encoder, decoder, **config)


@keras.utils.register_keras_serializable("tapeloop")
class VariationalAutoencoder(Autoencoder):
    """Convolutional VAE: the encoder's feature map -> Dense -> (mean, log-variance) of a
    `latent_dim` Gaussian; a reparameterised sample while training (the mean otherwise)
    -> Dense back to the feature map's shape -> the decoder.

    The code (`encode`) is the mean, (B, latent_dim). The loss per example is the
    per-pixel BCE plus kl_weight * KL / pixels: with kl_weight=1 that is the
    negative ELBO per pixel.
    """

    def __init__(self, encoder, decoder, latent_dim=16, kl_weight=1.0, feature_shape=(7, 7, 64),
                 **kwargs):
        super().__init__(encoder, decoder, **kwargs)
        self.latent_dim = int(latent_dim)
        self.kl_weight = float(kl_weight)
        self.feature_shape = tuple(int(d) for d in feature_shape)
        self.flatten = keras.layers.Flatten(dtype=self.dtype_policy, name="flatten")
        # Moments in float32: exp(log-variance) overflows bfloat16/float16 early.
        self.to_moments = keras.layers.Dense(2 * self.latent_dim, dtype="float32", name="moments")
        self.from_latent = keras.layers.Dense(int(np.prod(self.feature_shape)), activation="relu",
                                              dtype=self.dtype_policy, name="from_latent")

    def moments(self, images, training=None):
        h = self.flatten(self.encoder(images, training=training))  # (B, h*w*c)
        mean, log_var = tf.split(self.to_moments(h), 2, axis=-1)  # (B, latent) each
        return mean, log_var

    def encode(self, images, training=None):
        return self.moments(images, training=training)[0]

    def decode_logits(self, code, training=None):
        x = tf.reshape(self.from_latent(code), (-1, *self.feature_shape))
        return self.decoder(x, training=training)

    def forward(self, images, training=None, seed=None):
        mean, log_var = self.moments(images, training=training)
        z = mean
        if training and seed is not None:
            eps = tf.random.stateless_normal(tf.shape(mean), seed=seed, alg="philox")
            z = mean + tf.exp(0.5 * log_var) * eps
        logits = self.decode_logits(z, training=training)
        kl = kl_divergence(mean, log_var)  # (B,) nats
        pixels = float(np.prod(logits.shape[1:]))
        return logits, self.kl_weight * kl / pixels, {"kl": kl}

    def get_config(self) -> dict:
        return {**super().get_config(), "latent_dim": self.latent_dim, "kl_weight": self.kl_weight,
                "feature_shape": self.feature_shape}


def kl_divergence(mean, log_var):
    """KL(N(mean, exp(log_var)) || N(0, I)) per example, summed over the latent, in nats."""
    return 0.5 * tf.reduce_sum(tf.exp(log_var) + tf.square(mean) - 1.0 - log_var, axis=-1)


def build_autoencoder(
    name: str = "seed",
    input_shape: Sequence[int] = (28, 28, 1),
    precision: str = "float32",
    encoder_filters: Sequence[int] | None = None,
    decoder_filters: Sequence[int] | None = None,
    kernel_size: int | None = None,
    latent_dim: int = 16,
    kl_weight: float = 1.0,
    blocks_per_stage: int = 1,
    latent_channels: int = 4,
) -> Autoencoder:
    """Builds the registered model `name`, with weights, for images of `input_shape`.

    Args:
      name: a key of `MODELS`.
      input_shape: (H, W, C) of the images.
      precision: a Keras dtype policy name: float32, mixed_float16 or mixed_bfloat16.
      encoder_filters, decoder_filters, kernel_size: override the registered values.
      latent_dim, kl_weight: the VAE's latent size and KL weight (variational models only).
      blocks_per_stage, latent_channels: the resnet's residual blocks per stage and code
        channels.

    Raises:
      KeyError: unknown `name`.
      ModelError: a user's model (registered, or MODULE:FACTORY) could not be built.
    """
    if name not in MODELS:
        return build_user_model(name, input_shape, precision)
    spec = MODELS[name]
    enc_filters = tuple(encoder_filters or spec.encoder_filters)
    dec_filters = tuple(decoder_filters or spec.decoder_filters)
    if len(enc_filters) != len(dec_filters):
        raise ValueError(
            f"encoder has {len(enc_filters)} stages and decoder {len(dec_filters)}: "
            "give both the same number of filters")
    kernel = kernel_size or spec.kernel_size
    policy = keras.DTypePolicy(precision)
    if spec.family == "resnet":
        model = Autoencoder(
            resnet.ResnetEncoder(enc_filters, blocks_per_stage, latent_channels, dtype=policy,
                                 name="encoder"),
            resnet.ResnetDecoder(dec_filters, blocks_per_stage, input_shape[2], dtype=policy,
                                 name="decoder"), dtype=policy, name=name)
        model(tf.zeros((1, *input_shape)))
        return model
    encoder = Encoder(enc_filters, kernel, spec.down, dtype=policy, name="encoder")
    decoder = Decoder(dec_filters, kernel, input_shape, spec.up, dtype=policy, name="decoder")
    if spec.variational:
        h, w = (downsampled_size(d, len(enc_filters)) for d in input_shape[:2])
        model = VariationalAutoencoder(encoder, decoder, latent_dim, kl_weight,
                                       (h, w, enc_filters[-1]), dtype=policy, name=name)
    else:
        model = Autoencoder(encoder, decoder, dtype=policy, name=name)
    model(tf.zeros((1, *input_shape)))  # creates the weights
    return model


class ModelError(ValueError):
    """A user's model factory could not be imported, failed, or returned the wrong thing."""


def find_factory(name: str) -> Callable:
    """The factory registered as `name`, or the one `MODULE:FACTORY` names, imported from
    PYTHONPATH or the working directory."""
    if name in FACTORIES:
        return FACTORIES[name]
    try:
        return import_module_attr("--model", name, "(image_shape) -> (encoder, decoder)")
    except ImportError as e:
        raise ModelError(str(e)) from e


_LOSS_IN_OWN_FUNCTION = (
    "a loss of a layer (an activity_regularizer or add_loss) is made inside a tf.function of "
    "the model's own and cannot reach the training step's loss: drop the tf.function around "
    "call(), or keep those layers outside it")


def build_user_model(name: str, input_shape: Sequence[int], precision: str = "float32"
                     ) -> Autoencoder:
    """Calls the user's factory with the image shape and wraps its (encoder, decoder) in an
    `Autoencoder`, with weights; checks what it returned.

    The factory runs with `precision` as Keras' global dtype policy, so its layers compute
    in it (unless they ask for a dtype of their own); the logits are cast to float32.
    """
    factory = find_factory(name)
    shape = tuple(int(d) for d in input_shape)
    call = f"{name}(image_shape={shape})"
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        made = factory(shape)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{call} raised {type(e).__name__}: {e}") from e
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if not (isinstance(made, (tuple, list)) and len(made) == 2
            and all(isinstance(m, keras.Model) for m in made)):
        got = (f"({', '.join(type(m).__name__ for m in made)})"
               if isinstance(made, (tuple, list)) else type(made).__name__)
        raise ModelError(f"{call} returned {got}: return (encoder, decoder), two tf.keras.Model")
    encoder, decoder = made
    images = tf.zeros((1, *shape))
    # Random images, not zeros: a decoder's logits on them have both signs unless it ends
    # in a non-negative activation (checked below).
    probe = tf.random.stateless_uniform((2, *shape), seed=(0, 0))
    try:
        code = encoder(probe)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{call}: the encoder {encoder.name!r} failed on images of shape "
                         f"{(None, *shape)} ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(code, tf.Tensor):
        # A dict is what a SavedModel's signature returns (keras.layers.TFSMLayer).
        keys = (f" with keys {', '.join(map(repr, code))}: return one of them, e.g. "
                f"outputs[{next(iter(code))!r}]" if isinstance(code, dict) and code else "")
        raise ModelError(f"{call}: the encoder {encoder.name!r} returned {type(code).__name__}"
                         f"{keys}; it must return one tensor, the code")
    try:
        logits = decoder(code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"{call}: the decoder {decoder.name!r} failed on the encoder's code of "
                         f"shape {(None, *code.shape[1:])} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from e
    got = tuple(getattr(logits, "shape", ())[1:])
    if not isinstance(logits, tf.Tensor) or got != shape:
        raise ModelError(f"{call}: the decoder {decoder.name!r} returns shape {(None, *got)}, the "
                         f"images are {(None, *shape)}: its output must be logits of the image's "
                         "shape")
    low, high = (float(tf.reduce_min(tf.cast(logits, tf.float32))),
                 float(tf.reduce_max(tf.cast(logits, tf.float32))))
    if low >= 0:  # a sigmoid (as in Keras' tutorial decoder) or a relu at the end
        raise ModelError(f"{call}: the decoder {decoder.name!r} returns only values >= 0 ({low:.3g} "
                         f"to {high:.3g} on random images), so it ends in an activation such as "
                         "sigmoid or relu; it must return logits, which tapeloop passes through a "
                         "sigmoid (after a second one no pixel could be darker than 0.5): drop "
                         "the final activation")
    model = Autoencoder(encoder, decoder, dtype=keras.DTypePolicy(precision),
                        name=re.sub(r"\W", "_", name))
    model(images)
    # Called eagerly, a model's Keras losses are values; one made inside a tf.function of
    # the model's own is that function's graph tensor, which the step cannot reach.
    if any(tf.is_symbolic_tensor(loss) for loss in model.losses):
        raise ModelError(f"{call}: {_LOSS_IN_OWN_FUNCTION}")
    # The step traces the model into a graph without AutoGraph: a Python `if` on a tensor
    # (or .numpy()) runs eagerly above and fails there, at the first step, after the run
    # has started writing. Traced here (not run), it is one line before anything is written.
    # It takes the model's Keras losses (regularizers, add_loss) as the step adds them to
    # the loss: one made inside a tf.function of the model's own stays in its graph.
    passed = []

    def training_pass(images):
        logits = model(images, training=True)
        passed.append(True)
        return logits, [tf.identity(loss) for loss in model.losses]

    try:
        traced = tf.function(training_pass, autograph=False
                             ).get_concrete_function(tf.TensorSpec((2, *shape)))
    except Exception as e:  # noqa: BLE001
        if passed:  # the model's pass traced; its losses could not be taken
            raise ModelError(f"{call}: {_LOSS_IN_OWN_FUNCTION}") from e
        raise ModelError(f"{call} fails when traced into the training step's graph "
                         f"({describe_trace_error(e)}): use TensorFlow ops on tensors in call() "
                         "(tf.where or tf.cond, not a Python if; no .numpy())") from e
    model.running_paths = frozenset(
        v.path for v in written_variables(traced.graph, model.non_trainable_variables)
        if v.dtype.startswith(("float", "bfloat")))
    model.stateful_random_ops = tuple(sorted(_STATEFUL_RANDOM & op_types(traced.graph)))
    return model


# TensorFlow's random ops whose state lives in the kernel (tf.random.normal, uniform, ...);
# Keras' random layers and keras.random with a SeedGenerator draw with stateless ops.
_STATEFUL_RANDOM = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
    "ParameterizedTruncatedNormal", "RandomShuffle", "Multinomial", "RandomGamma",
    "RandomPoisson", "RandomPoissonV2"})


def op_types(graph) -> set:
    """The types of the ops of a traced `graph` and of the functions it calls."""
    return ({op.type for op in graph.get_operations()}
            | {node.op for f in graph.as_graph_def().library.function for node in f.node_def})


_WRITES = ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")
# Ops whose first input is not passed to the functions they call (the branch index or the
# condition); a While passes all its inputs to its body, a call all to its function.
_BRANCHES = ("If", "StatelessIf", "Case", "StatelessCase")


def written_variables(graph, variables) -> list:
    """Those of `variables` (Keras variables) that ops of the traced `graph` assign to.

    A variable enters a traced function as a captured resource handle; under a
    distribution strategy a mirrored variable has one handle per replica. An assign inside
    a function the graph calls (a tf.cond's branch, a tf.while_loop's body, a nested
    tf.function) is followed to the handle passed in, through the graph's function library.
    """
    library = {f.signature.name: f for f in graph.as_graph_def().library.function}
    written_args = {}  # function name -> indices of its arguments it assigns to

    def positions(op_type, node_def):
        """Indices of an op's inputs that it, or a function it calls, assigns to."""
        if op_type in _WRITES:
            return {0}
        called = [op_type] if op_type in library else []
        for attr in node_def.attr.values():
            called += ([attr.func.name] if attr.HasField("func") else []) + [
                f.name for f in attr.list.func]
        offset = 1 if op_type in _BRANCHES else 0
        return {i + offset for name in called if name in library for i in arguments(name)}

    def arguments(name):
        if name not in written_args:
            written_args[name] = set()  # a function that calls itself adds nothing more
            function = library[name]
            index = {a.name: i for i, a in enumerate(function.signature.input_arg)}
            found = set()
            for node in function.node_def:
                inputs = [i for i in node.input if not i.startswith("^")]
                found |= {index[inputs[p]] for p in positions(node.op, node)
                          if p < len(inputs) and inputs[p] in index}
            written_args[name] = found
        return written_args[name]

    outside = {inside.ref(): outer for outer, inside in graph.captures}
    handles = {outside[op.inputs[p].ref()].ref() for op in graph.get_operations()
               for p in positions(op.type, op.node_def)
               if p < len(op.inputs) and op.inputs[p].ref() in outside}
    found = []
    for variable in variables:
        value = variable.value
        if any(c.handle.ref() in handles for c in getattr(value, "values", None) or (value,)):
            found.append(variable)
    return found


def describe_trace_error(error: Exception) -> str:
    """'TypeName in Layer.call(): first sentence' of an error raised while tracing. Keras
    wraps it ("Exception encountered when calling Enc.call()."), then TensorFlow's own
    first line (in ANSI bold) and its long advice."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    where = re.search(r"when calling (\S+?)\.?$", lines[0]) if lines else None
    why = next((line for line in lines if line and not line.startswith("Exception encount")), "")
    first = why.split(". ")[0].rstrip(".")
    if len(first) > 160:  # cut at a word, and say so (as core.errors.first_line does)
        first = first[:157].rsplit(" ", 1)[0] + "..."
    return f"{type(error).__name__}{' in ' + where.group(1) if where else ''}: {first}"
