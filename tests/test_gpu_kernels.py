"""Every op of the traced training loop has a GPU kernel for the dtypes it uses (the walk
is core/gpu_kernels.py), and the GPU decisions a CPU can check."""

import numpy as np
import pytest
import tensorflow as tf

from core import data, distribute, losses
from core.gpu_kernels import ops_without_gpu_kernel
from core.schedules import Multiplier
from core.trainer import Trainer
from layers import fast_forms
from layers.autoencoders import build_autoencoder, register

keras = tf.keras


def stateful(image_shape):
    """Your own model with what the loop has to keep in step across shards and replicas:
    BatchNormalization's moving statistics, Dropout's seed state, Keras regularizers."""
    encoder = keras.Sequential([
        keras.Input(image_shape),
        keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False,
                            kernel_regularizer=keras.regularizers.L2(1e-4)),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Dropout(0.1),
        keras.layers.Conv2D(4, 3, padding="same", activity_regularizer=keras.regularizers.L1(1e-4)),
    ])
    decoder = keras.Sequential([
        keras.Input((image_shape[0] // 2, image_shape[1] // 2, 4)),
        keras.layers.Conv2DTranspose(image_shape[2], 3, strides=2, padding="same")])
    return encoder, decoder


register("stateful", stateful)

# The training recipe's options together: a schedule, AdamW, clipping, accumulation, EMA.
RECIPE = dict(lr_multiplier=Multiplier("cosine", total_steps=100, warmup_steps=10),
              optimizer="adamw", weight_decay=0.01, clip_norm=1.0, clip_value=0.5,
              accum_steps=2, ema_decay=0.99)


def _loop(model="seed", precision="float32", device=False, shards=1, noise=0.0, jit=False,
          replicas=1, loss="bce", recipe=False, shape=(28, 28, 1), evaluation=False, augment=()):
    """The traced training loop (or, with `evaluation`, the eval batch), in the computation
    forms the runner chooses on a GPU machine (fast_forms.choose without oneDNN)."""
    strategy = (tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
                if replicas > 1 else tf.distribute.get_strategy())
    images = np.random.default_rng(0).integers(0, 256, (256, *shape), dtype=np.uint8)
    with strategy.scope():
        net = build_autoencoder(model, shape, precision)
        fast_forms.install(net, fast_forms.choose(jit, precision, onednn=False)[0])
        device_data = data.DeviceData(images, 32, replicas, 0) if device else None
        trainer = Trainer(net, strategy, 32, 1e-3, precision, jit_compile=jit,
                          device_data=device_data, noise_factor=noise, batch_shards=shards,
                          loss=losses.build(loss), augment=augment,
                          **(RECIPE if recipe else {}))
    if evaluation:
        spec = tf.TensorSpec([32, *shape], tf.float32)
        return trainer._eval_batch.get_concrete_function(spec, spec, tf.TensorSpec([32]))
    if device:
        return trainer._train_loop.get_concrete_function(None, tf.TensorSpec([], tf.int32))
    dist = iter(strategy.distribute_datasets_from_function(
        lambda ctx: data.train_dataset(images, 32, 0, 0, ctx)))
    return trainer._train_loop.get_concrete_function(dist, tf.TensorSpec([], tf.int32))


@pytest.mark.parametrize("path", [
    dict(), dict(device=True), dict(shards=2), dict(device=True, shards=2),
    dict(precision="mixed_bfloat16"), dict(precision="mixed_float16"),
    dict(model="vae"), dict(model="denoiser", noise=0.4), dict(jit=True, device=True),
    dict(replicas=2, device=True), dict(replicas=2, precision="mixed_float16"),
    dict(loss="mse+l1+charbonnier"),
    dict(loss="ssim", precision="mixed_float16"), dict(recipe=True, replicas=2),
    dict(recipe=True, jit=True, precision="mixed_float16"),
    dict(model="resnet", shape=(32, 32, 3), precision="mixed_float16", loss="l1+ssim"),
    dict(model="resnet", shape=(32, 32, 3), precision="mixed_bfloat16", jit=True, replicas=2),
    dict(model="resnet", shape=(32, 32, 3), precision="mixed_float16", evaluation=True),
    dict(precision="mixed_bfloat16", evaluation=True, shards=2),
    dict(augment=("flip", "crop"), device=True, replicas=2, shards=2),
    dict(augment=("flip", "crop"), precision="mixed_float16", noise=0.2),
    dict(model="stateful", replicas=2, shards=2, precision="mixed_float16"),
    dict(model="stateful", replicas=2, jit=True, precision="mixed_bfloat16"),
    dict(model="stateful", replicas=2, evaluation=True),
], ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "tf.data")
def test_every_op_of_the_training_loop_has_a_gpu_kernel(path):
    assert ops_without_gpu_kernel(_loop(**path)) == []


def test_the_walk_finds_an_op_without_a_gpu_kernel():
    """What the on-device path did before: tf.gather of a uint8 tensor (GatherV2)."""
    images = tf.Variable(np.zeros((8, 2, 2, 1), np.uint8))

    @tf.function
    def draw(rows):
        return tf.gather(images.read_value(), rows)

    missing = ops_without_gpu_kernel(draw.get_concrete_function(tf.TensorSpec([4], tf.int32)))
    assert [(op, attrs["Tparams"]) for _, op, attrs in missing] == [("GatherV2", "uint8")]


def test_data_on_device_has_no_per_step_branch_and_no_int32_order():
    """int32 tensors live in host memory on GPUs: the order is int64, and the epoch's
    reorder happens between loops, not as a tf.cond in every step."""
    loop = _loop(device=True)
    graph_def = loop.graph.as_graph_def()
    bodies = [f for f in graph_def.library.function if "while_body" in f.signature.name]
    assert bodies and not [n.op for f in bodies for n in f.node_def
                           if n.op in ("If", "StatelessIf")]
    images = np.zeros((64, 2, 2, 1), np.uint8)
    assert data.DeviceData(images, 8, 1, 0).order.dtype == tf.int64


@pytest.mark.parametrize("name, shape, pools", [
    ("seed", (28, 28, 1), True), ("keras_blog", (28, 28, 1), True), ("denoiser", (28, 28, 1), True),
    ("vae", (28, 28, 1), False),
    ("resnet", (16, 16, 3), False)])
def test_deterministic_xla_is_off_only_for_a_max_pool_gradient(name, shape, pools):
    """XLA with op determinism refuses select-and-scatter, max-pool's gradient. The
    decision is the trace's (MaxPoolGrad in the backward pass); the HLO that XLA compiles
    on this CPU shows the select-and-scatter exactly where the decision says so."""
    model = build_autoencoder(name, shape)
    found = distribute.has_max_pool_gradient(model, shape)
    assert found == pools

    def hlo():  # traced anew: the forms are Python, read when the model is traced
        @tf.function(jit_compile=True)
        def grads(x):
            with tf.GradientTape() as tape:
                y = tf.reduce_sum(model(x, training=True))
            return tape.gradient(y, model.trainable_variables)

        return grads.experimental_get_compiler_ir(tf.zeros((2, *shape)))(stage="hlo")

    assert ("select-and-scatter" in hlo()) == pools
    jit, why = distribute.deterministic_jit(True, True, found)
    assert jit is not pools and (why is not None) == pools
    # Not deterministic, or no XLA asked for: nothing changes.
    assert distribute.deterministic_jit(True, False, found) == (True, None)
    assert distribute.deterministic_jit(False, True, found) == (False, None)
    # In the forms a --deterministic XLA run installs, the blocks' max-pool has no such
    # gradient: XLA stays on, and its HLO has no select-and-scatter.
    forms, _ = fast_forms.choose(True, "float32", onednn=False, deterministic=True)
    assert bool(fast_forms.install(model, forms).deterministic_pool) == pools
    assert not distribute.has_max_pool_gradient(model, shape)
    assert "select-and-scatter" not in hlo()
