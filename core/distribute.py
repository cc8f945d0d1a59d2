"""Choosing the distribution strategy, and the hardware-dependent defaults.

`--num_cpu_devices N` splits the host CPU into N logical devices before
TensorFlow initialises its runtime, so MirroredStrategy's multi-device code
paths run (and are tested) on a machine without GPUs.
"""

from __future__ import annotations

from absl import logging
import tensorflow as tf

from core.errors import ConfigError


def setup_logical_cpus(num: int) -> None:
    """Splits the CPU into `num` logical devices (no-op for num <= 1).

    Must run before the first op: TensorFlow fixes its devices when the runtime
    starts. If the process already has at least `num` logical CPUs (a test
    process that made several), the first `num` are used.
    """
    if num <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) >= num:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num)])
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have < num:
            raise ConfigError(
                f"--num_cpu_devices={num}: TensorFlow already started with {have} CPU devices "
                "in this process: set it before anything else runs") from None


def gpus() -> list:
    return tf.config.list_physical_devices("GPU")


def make_strategy(name: str, num_cpu_devices: int = 0) -> tf.distribute.Strategy:
    """Returns the strategy for `--strategy`.

    auto: MirroredStrategy over all GPUs if there are several, OneDeviceStrategy
      on one GPU, MirroredStrategy over the logical CPUs if --num_cpu_devices > 1,
      else the default strategy.
    """
    setup_logical_cpus(num_cpu_devices)
    gpu_devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpu_devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if name == "auto":
        if len(gpu_devices) > 1:
            name = "mirrored"
        elif gpu_devices:
            name = "one_device"
        elif num_cpu_devices > 1:
            name = "mirrored"
        else:
            logging.info("no GPU found: training on the CPU with the default strategy")
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        if not gpu_devices and num_cpu_devices < 1:
            raise ConfigError(
                "--strategy=one_device found no GPU: on a CPU-only machine add "
                "--num_cpu_devices=1 to place everything on the CPU, or use --strategy=auto")
        return tf.distribute.OneDeviceStrategy(gpu_devices[0] if gpu_devices else cpu_devices[0])
    if name == "mirrored":
        devices = gpu_devices or (cpu_devices[:num_cpu_devices] if num_cpu_devices > 1 else [])
        if not devices:
            raise ConfigError(
                "--strategy=mirrored found no GPU: on a CPU-only machine add "
                "--num_cpu_devices=N to mirror over N logical CPU devices, or use --strategy=auto")
        return tf.distribute.MirroredStrategy(
            devices, cross_device_ops=None if gpu_devices else
            tf.distribute.ReductionToOneDevice(reduce_to_device=cpu_devices[0]))
    raise ConfigError(f"--strategy={name!r} is unknown")


def check_batch(strategy: tf.distribute.Strategy, global_batch_size: int) -> int:
    """Returns the per-replica batch; raises if the global batch does not divide evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ConfigError(
            f"--batch_size={global_batch_size} does not divide evenly over {replicas} replicas: "
            f"use a multiple of {replicas}")
    return global_batch_size // replicas


def default_jit_compile() -> bool:
    """XLA where a GPU is present; on CPUs TensorFlow's own kernels are faster for this model."""
    return bool(gpus())


def gpu_compute_capability() -> tuple[int, int] | None:
    devices = gpus()
    if not devices:
        return None
    details = tf.config.experimental.get_device_details(devices[0])
    return details.get("compute_capability")


def default_precision(compute_capability: tuple[int, int] | None) -> str:
    """bfloat16 on GPUs that compute it natively (Ampere, 8.0, and later: no loss
    scaling needed), float16 with loss scaling on Volta/Turing tensor cores, float32
    elsewhere (CPUs, older GPUs)."""
    if compute_capability is None:
        return "float32"
    if tuple(compute_capability) >= (8, 0):
        return "mixed_bfloat16"
    if tuple(compute_capability) >= (7, 0):
        return "mixed_float16"
    return "float32"
