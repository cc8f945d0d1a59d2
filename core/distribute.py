"""Choosing the distribution strategy, and the hardware-dependent defaults.

`--num_cpu_devices N` splits the host CPU into N logical devices before
TensorFlow initialises its runtime, so MirroredStrategy's multi-device code
paths run (and are tested) on a machine without GPUs.
"""

from __future__ import annotations

import json
import os
import re

from absl import logging
import tensorflow as tf

from core import signals
from core.errors import ConfigError, first_line


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


def set_cpu_threads(intra: int | None, inter: int | None) -> None:
    """Sets TensorFlow's intra-op and inter-op thread counts (0 leaves TensorFlow's
    choice, the number of cores). Like the devices, fixed when the runtime starts:
    in a process where it already started, a different request raises ConfigError.

    intra=1 with inter=cores and `--batch_shards=cores` runs each op on one core
    and the batch's shards side by side: faster for small models on CPUs.
    """
    for name, value, getter, setter in (
            ("num_intra_threads", intra, tf.config.threading.get_intra_op_parallelism_threads,
             tf.config.threading.set_intra_op_parallelism_threads),
            ("num_inter_threads", inter, tf.config.threading.get_inter_op_parallelism_threads,
             tf.config.threading.set_inter_op_parallelism_threads)):
        if value is not None and value < 0:
            raise ConfigError(f"--{name}={value}: must be >= 0 (0 = TensorFlow's choice)")
        if not value or getter() == value:
            continue
        try:
            setter(value)
        except RuntimeError:
            raise ConfigError(
                f"--{name}={value}: TensorFlow already started in this process with "
                f"{getter() or 'its default'} threads: set it before anything else runs") from None


# Config fields that None leaves to `cpu_defaults`.
AUTOMATIC = ("batch_shards", "num_intra_threads", "num_inter_threads", "data_on_device")
# The CPU recipe's rule, from benchmarks/results/cpu_defaults.md (README, Performance):
# on 2 cores it was faster than TensorFlow's threading for the seed and denoiser models
# at every batch measured, down to 4 examples per shard (batch 8); smaller shards are
# unmeasured, and get TensorFlow's threading.
MIN_SHARD_EXAMPLES = 4


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def recipe_pays(batch_size: int, cores: int) -> bool:
    """Whether the CPU recipe (one thread per op, one batch shard per core) is faster than
    TensorFlow's default threading for this batch, by benchmarks/results/cpu_defaults.md."""
    return cores >= 2 and batch_size % cores == 0 and batch_size // cores >= MIN_SHARD_EXAMPLES


def cpu_defaults(config, num_gpus: int, cores: int):
    """Resolves the automatic execution settings of `config` (those left None): batch
    shards and thread counts now, `data_on_device` as True/False/None (None: on if the
    training split fits, decided once it is loaded).

    Without GPUs, on one replica, where `recipe_pays`: the CPU recipe, one thread per op
    and one batch shard per core, side by side, with the data on the device. Anywhere
    else (GPUs, several replicas, small batches): one shard and TensorFlow's threads.
    Flags given explicitly are kept, and the others follow them (e.g. --batch_shards=4
    alone runs 4 single-threaded ops at once).

    Returns:
      (the config with those fields set, a log line saying what was chosen and why).
    """
    single_cpu_replica = (not num_gpus and config.num_cpu_devices <= 1
                          and config.strategy in ("auto", "default", "one_device")
                          and config.mode in ("train", "train_and_eval"))  # evaluation: unsharded
    shards = config.batch_shards
    if shards is None:
        if config.num_intra_threads not in (None, 1):
            shards = 1  # the user chose multi-threaded ops: nothing to run side by side
        else:
            shards = cores if single_cpu_replica and recipe_pays(config.batch_size, cores) else 1
    side_by_side = shards > 1 and not num_gpus
    intra = config.num_intra_threads
    if intra is None:
        intra = 1 if side_by_side else 0
    inter = config.num_inter_threads
    if inter is None:
        inter = shards if side_by_side and intra == 1 else 0
    on_device = config.data_on_device
    if on_device is None:
        on_device = None if side_by_side and not config.eager else False
    resolved = config.replace(batch_shards=shards, num_intra_threads=intra,
                              num_inter_threads=inter, data_on_device=on_device)
    where = (f"{num_gpus} GPU(s)" if num_gpus else f"no GPU, {cores} cores")
    if side_by_side and intra == 1:
        why = (f"the CPU recipe: {shards} batch shards side by side, one thread per op"
               + {None: ", training data held in memory goes on the device",
                  True: ", the training data on the device", False: ""}[on_device])
    elif num_gpus:
        why = "one batch shard, TensorFlow's threads, tf.data (the GPU settings)"
    elif config.mode not in ("train", "train_and_eval"):
        why = "TensorFlow's threads (evaluation and export run unsharded)"
    else:
        why = ("one batch shard, TensorFlow's threads: the recipe needs one replica and at least "
               f"{MIN_SHARD_EXAMPLES} examples per core" if config.batch_shards is None else
               f"{shards} batch shard(s), as given")
    return resolved, f"CPU defaults: {where}: {why} (flags given explicitly win)"


def gpus() -> list:
    return tf.config.list_physical_devices("GPU")


_EVALUATOR = ("TF_CONFIG's task is the evaluator, which does not train: run it with "
              "--mode=continuous_eval and the workers' --model_dir")


def strategy_of_cluster(config):
    """--strategy=auto in training where TF_CONFIG names several training tasks (a cluster
    manager sets it for each machine of a job): MultiWorkerMirroredStrategy. The default
    strategy would train each machine alone into the same --model_dir. Evaluation, and an
    explicit strategy, stay on this machine.

    Raises:
      ConfigError: in training with auto, a TF_CONFIG that is not a JSON object, or whose
        task is the evaluator.
    """
    text = (os.environ.get("TF_CONFIG") or "").strip()
    if config.strategy != "auto" or config.mode not in ("train", "train_and_eval") or not text:
        return config
    fix = "--strategy=auto reads it to join a cluster; fix it, or unset TF_CONFIG to train on "
    try:  # a typo in it left every machine training alone, silently
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}): "
                          f"{fix}this machine alone") from None
    cluster = cfg.get("cluster") or {} if isinstance(cfg, dict) else None
    if not isinstance(cluster, dict):
        raise ConfigError(f"TF_CONFIG is not an object with a 'cluster' object ({text[:60]!r}): "
                          f"{fix}this machine alone")
    task = cfg.get("task")
    if isinstance(task, dict) and task.get("type") == "evaluator":
        raise ConfigError(_EVALUATOR)  # beside one chief, it trained into the chief's dir
    tasks = sum(len(cluster.get(kind) or ()) for kind in ("chief", "worker"))
    if tasks < 2:
        return config
    logging.info("TF_CONFIG names a cluster of %d training tasks: --strategy=auto joins it "
                 "(--strategy=multi_worker); give --strategy=mirrored, or unset TF_CONFIG, to "
                 "train on this machine alone", tasks)
    return config.replace(strategy="multi_worker")


def parse_tf_config(text: str | None) -> dict:
    """Validates the standard TF_CONFIG of a multi-worker job; returns it as a dict.

    Raises:
      ConfigError: unset, not JSON, or inconsistent cluster and task.
    """
    example = ('{"cluster": {"worker": ["host1:2222", "host2:2222"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if not text:
        raise ConfigError(f"--strategy=multi_worker needs the TF_CONFIG environment variable, e.g. "
                          f"TF_CONFIG='{example}' on each machine (see README)")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}): "
                          f"expected something like {example}") from None
    cluster, task = cfg.get("cluster") if isinstance(cfg, dict) else None, (
        cfg.get("task") if isinstance(cfg, dict) else None)
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise ConfigError(f"TF_CONFIG has no cluster with workers: expected something like {example}")
    for kind, hosts in cluster.items():
        if not isinstance(hosts, list) or not all(isinstance(h, str) and ":" in h for h in hosts):
            raise ConfigError(f"TF_CONFIG cluster[{kind!r}] must be a list of 'host:port' strings, "
                              f"got {hosts!r}")
    others = sorted(set(cluster) - {"chief", "worker", "evaluator"})
    if others:  # "ps": a hang on the workers, a traceback on the parameter server
        raise ConfigError(f"TF_CONFIG's cluster has {', '.join(map(repr, others))} tasks, which "
                          f"MultiWorkerMirroredStrategy has no role for: list the training "
                          f"machines under 'worker' (and at most one 'chief')")
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"TF_CONFIG's cluster has {len(cluster['chief'])} chiefs: name one, "
                          f"and the other machines under 'worker'")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ConfigError(f"TF_CONFIG needs a task with type and index, e.g. {example}")
    kind, index = task["type"], task["index"]
    if kind == "evaluator":  # else it trained a whole run alone and threw it away
        raise ConfigError(f"{_EVALUATOR}, without --strategy=multi_worker")
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise ConfigError(f"TF_CONFIG task {kind}:{index} is not in the cluster "
                          f"({ {k: len(v) for k, v in cluster.items()} }): fix task.type or task.index")
    return cfg


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, summaries and figures."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    spec = resolver.cluster_spec().as_dict()
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in spec


def task_id(strategy: tf.distribute.Strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "local"
    return f"{resolver.task_type}{resolver.task_id}"


def make_strategy(name: str, num_cpu_devices: int = 0) -> tf.distribute.Strategy:
    """Returns the strategy for `--strategy`.

    auto: MirroredStrategy over all GPUs if there are several, OneDeviceStrategy
      on one GPU, MirroredStrategy over the logical CPUs if --num_cpu_devices > 1,
      else the default strategy (`strategy_of_cluster` first makes it multi_worker where
      TF_CONFIG names a cluster).
    """
    if name == "multi_worker":
        tf_config = parse_tf_config(os.environ.get("TF_CONFIG"))
        setup_logical_cpus(num_cpu_devices)
        # Reads TF_CONFIG.
        options = communication_options(len(gpus()))
        logging.info("multi-worker: joining the cluster of TF_CONFIG, which waits until every "
                     "worker has started (Ctrl-C ends the wait)")
        try:
            with signals.joining_a_cluster():
                strategy = tf.distribute.MultiWorkerMirroredStrategy(
                    communication_options=options)
        except tf.errors.UnknownError as e:
            if "Could not start gRPC server" not in str(e):
                raise
            task = tf_config["task"]
            address = tf_config["cluster"][task["type"]][task["index"]]
            raise ConfigError(
                f"TF_CONFIG gives this task ({task['type']}:{task['index']}) the address "
                f"{address}, and TensorFlow could not start its server on that port: another "
                f"process listens there (a worker of an earlier run, still waiting, or one given "
                f"this task's index too?) or the port is not open to this user: stop that "
                f"process, or give the task a free port in TF_CONFIG") from None
        logging.info("multi-worker: task %s of %d workers, %d replicas in sync, all-reduce %s",
                     task_id(strategy), strategy.extended._num_workers,  # noqa: SLF001
                     strategy.num_replicas_in_sync, options.implementation.name)
        return strategy
    setup_logical_cpus(num_cpu_devices)
    gpu_devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpu_devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if gpu_devices and num_cpu_devices > 1:
        logging.warning("--num_cpu_devices=%d is not used: this machine has %d GPU(s), which "
                        "--strategy=%s runs on", num_cpu_devices, len(gpu_devices), name)
    if name == "auto":
        if len(gpu_devices) > 1:
            name = "mirrored"
        elif gpu_devices:
            name = "one_device"
        elif num_cpu_devices > 1:
            name = "mirrored"
        else:
            logging.info("no GPU found: running on the CPU with the default strategy")
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


def communication_options(num_gpus: int) -> tf.distribute.experimental.CommunicationOptions:
    """MultiWorkerMirroredStrategy's all-reduce: NCCL where the workers have GPUs.

    The default, AUTO, passes the hint "auto" to the collective runtime, which picks NCCL
    only for the hint "nccl" (or `collective_nccl` in the session config): otherwise ring
    all-reduce over gRPC, between GPUs too (collective_param_resolver_local.cc,
    AssignCollectiveType). On CPUs ring is the only one there is.
    """
    implementation = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        implementation=implementation.NCCL if num_gpus else implementation.AUTO)


def check_batch(strategy: tf.distribute.Strategy, global_batch_size: int,
                batch_shards: int = 1) -> int:
    """Returns the per-replica batch; raises if the global batch does not divide evenly
    over the replicas and each replica's batch over its shards."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size % (replicas * batch_shards):
        over = f"{replicas} replicas" if replicas > 1 else "1 replica"
        if batch_shards > 1:
            over += f" x {batch_shards} shards (--batch_shards)"
        raise ConfigError(f"--batch_size={global_batch_size} does not divide evenly over {over}: "
                          + use_a_multiple("--batch_size", global_batch_size,
                                           replicas * batch_shards))
    return global_batch_size // replicas


def use_a_multiple(flag: str, value: int, multiple: int) -> str:
    """'use a multiple of 3, e.g. --batch_size=255 or --batch_size=258': the nearest ones."""
    below, above = value // multiple * multiple, (value // multiple + 1) * multiple
    nearest = " or ".join(f"{flag}={v}" for v in (below, above) if v > 0)
    return f"use a multiple of {multiple}, e.g. {nearest}"


def default_jit_compile() -> bool:
    """XLA where a GPU is present; on CPUs TensorFlow's own kernels are faster for this model."""
    return bool(gpus())


def xla_refusal(model, image_shape, loss=None, strategy=None) -> str | None:
    """Why XLA cannot compile the model's forward and backward pass, with `loss` (a
    `losses.Loss`) if given (the op it has no kernel for, and where the code creates it),
    or None if it can. Converts the traced pass to XLA's HLO for this machine's device
    (tens of milliseconds: nothing is run or compiled to machine code).

    Traced in a replica's context of `strategy` (the model's), as the step is: outside
    one, a layer that assigns to its variables (BatchNormalization's moving statistics)
    would write every replica's copy, on every device, from one compiled cluster."""

    @tf.function(jit_compile=True, autograph=False)
    def grads(x):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            y = tf.reduce_sum(loss.per_example(x, logits) if loss else logits)
        return tape.gradient(y, model.trainable_variables)

    def hlo():
        return grads.experimental_get_compiler_ir(tf.zeros((2, *image_shape)))(stage="hlo")

    try:
        if strategy is None or strategy.num_replicas_in_sync == 1:
            hlo()
        else:  # called eagerly, once: without TensorFlow's warning of its overhead
            logger = tf.get_logger()
            level = logger.level
            logger.setLevel("ERROR")
            try:
                strategy.run(hlo)
            finally:
                logger.setLevel(level)
    except (ValueError, tf.errors.OpError, RuntimeError) as e:
        text = str(e)
        if "merge_call" in text:  # a collective of the strategy inside the compiled pass
            layer = re.search(r"when calling (\w+)\.call\(\)", text)
            return ("the all-reduce across replicas in " +
                    (f"{layer.group(1)}.call()" if layer else "the pass"))
        op = re.search(r"on XLA_\w+_JIT: (\w+) \(", text)
        frames = re.findall(r'File "([^"]+)", line (\d+)', text)
        where = [f"{os.path.basename(f)} line {n}" for f, n in frames
                 if "site-packages" not in f and not f.endswith("/core/distribute.py")]
        if op:
            return f"op {op.group(1)}" + (f" ({where[-1]})" if where else "")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return first_line(lines[0].removeprefix("Failed getting HLO text: ")) if lines else type(e).__name__
    return None


MAX_POOL_GRADIENTS = ("MaxPoolGrad", "MaxPoolGradV2", "MaxPool3DGrad")


def has_max_pool_gradient(model, image_shape) -> bool:
    """Whether the model's backward pass holds a max-pool gradient (traced once, not run)."""

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            y = tf.reduce_sum(tf.cast(model(x, training=True), tf.float32))
        return tape.gradient(y, model.trainable_variables)

    graph = grads.get_concrete_function(tf.TensorSpec([2, *image_shape], tf.float32)).graph
    ops = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        ops.update(node.op for node in function.node_def)
    return bool(ops & set(MAX_POOL_GRADIENTS))


def deterministic_jit(jit_compile: bool, deterministic: bool,
                      max_pool_gradient: bool) -> tuple[bool, str | None]:
    """XLA for --deterministic: (jit_compile, why it was turned off, or None).

    With op determinism XLA refuses max-pool's gradient, on GPUs ("HLO instruction
    select-and-scatter ... does not have a deterministic implementation"; TensorFlow
    issue 69417) and on CPUs alike (TensorFlow 2.21's XLA bridge: "GPU MaxPool gradient
    ops do not yet have a deterministic XLA implementation", at the first step). So a
    model whose backward pass still has one (your own model's MaxPooling2D: tapeloop's
    blocks compute theirs in a form without it, layers/fast_forms.max_pool) trains
    without XLA, whose MaxPoolGrad kernels are deterministic.
    """
    if jit_compile and deterministic and max_pool_gradient:
        return False, ("--deterministic with XLA: XLA has no deterministic gradient for this "
                       "model's max-pooling (select-and-scatter), so it trains without XLA "
                       "(tapeloop's ConvPool blocks have a form that keeps XLA)")
    return jit_compile, None


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


# What a collective op raises on a worker whose partner has stopped or cannot be reached
# ("Collective ops is aborted by: Socket closed"). Only multi-worker runs take them so.
LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.AbortedError,
                      tf.errors.CancelledError, tf.errors.DeadlineExceededError)


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes train together: above 1 only under
    MultiWorkerMirroredStrategy with a cluster."""
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return getattr(strategy.extended, "_num_workers", 1)
    return 1


# Flags a worker may set for its own machine (where its data is, how it uses its cores);
# every other must be the same on every worker.
MACHINE_FLAGS = ("data_dir", "cache", "verify_checksums", "num_intra_threads",
                 "num_inter_threads", "batch_shards", "data_on_device", "data_on_device_max_mb",
                 "profile_steps")


def check_the_same_command(strategy: tf.distribute.Strategy, config) -> None:
    """Raises ConfigError on a worker started with other flags than the others (other than
    MACHINE_FLAGS): with another --batch_size, say, the workers trained on, each at its own
    batch, and failed in their first evaluation with a traceback. Nothing where there is
    one worker.

    Raises:
      LOST_WORKER_ERRORS: another worker stopped before it got here.
    """
    import dataclasses

    # Another tapeloop (other flags) would all-reduce a vector of another length below,
    # which fails in a traceback: its flags' names go first, as one value of fixed size.
    names = [f.name for f in dataclasses.fields(config)]
    if _differ_between_workers(strategy, {"flags": names}):
        raise ConfigError(f"this worker ({task_id(strategy)}) runs a tapeloop of other flags than "
                          f"another worker of TF_CONFIG ({len(names)} flags here): install the "
                          "same tapeloop on every machine")
    values = {f"--{name}={_as_flag(getattr(config, name))}": getattr(config, name)
              for name in names if name not in MACHINE_FLAGS}
    differ = _differ_between_workers(strategy, values)
    if differ:
        raise ConfigError(f"this worker ({task_id(strategy)}) was started with other flags than "
                          f"another worker of TF_CONFIG: {', '.join(differ)} here: start every "
                          "worker with the same command (--data_dir, --cache and the CPU flags "
                          "may differ by machine)")


def check_the_same_data(strategy: tf.distribute.Strategy, facts: dict[str, object],
                        data_dir: str | None) -> None:
    """Raises ConfigError on a worker whose data differs from the others' by `facts` (e.g.
    {"1,000 training examples": 1000}): workers of one command whose --data_dir holds
    more images on one machine planned other numbers of steps, and waited for each other
    in mismatched collectives for good. Nothing where there is one worker.

    Raises:
      LOST_WORKER_ERRORS: another worker stopped before it got here.
    """
    differ = _differ_between_workers(strategy, facts)
    if differ:
        raise ConfigError(f"this worker ({task_id(strategy)}) reads other data than another "
                          f"worker of TF_CONFIG: {', '.join(differ)} here"
                          + (f" (--data_dir={data_dir})" if data_dir else "")
                          + ": give every worker the same data")


def summed_over_replicas(strategy: tf.distribute.Strategy):
    """A function: a float32 vector -> its sum over every replica of every worker, through
    the strategy's own collectives (each replica gives this worker's vector)."""
    @tf.function(autograph=False)
    def summed(values):
        per_replica = strategy.run(lambda: tf.identity(values))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return summed


def _differ_between_workers(strategy: tf.distribute.Strategy, values: dict[str, object]
                            ) -> list[str]:
    """The names of `values` whose value differs on some other worker: one all-reduce of
    two hashes of each, through the strategy's own collectives; [] with one worker. Every
    worker calls it with as many values, in the same order (the names may hold them)."""
    if num_workers(strategy) < 2:
        return []
    import hashlib

    # Two hashes of each value, of as many bits as keep their sum over every replica exact
    # in float32 (AgreedStop's all-reduce: every device and all-reduce takes float32).
    replicas = strategy.num_replicas_in_sync
    bits = 24 - max(1, replicas - 1).bit_length()
    mine = []
    for value in values.values():
        digest = int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:8], "big")
        mine += [digest % 2**bits, (digest >> 32) % 2**bits]
    totals = summed_over_replicas(strategy)(tf.constant(mine, tf.float32)).numpy()
    return [name for i, name in enumerate(values)
            if any(totals[j] != mine[j] * replicas for j in (2 * i, 2 * i + 1))]


def _as_flag(value) -> str:
    """A Config value as its flag is written: (64, 64) -> 64,64; None -> '' (not given)."""
    if value is None:
        return "''"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


class AgreedStop:
    """Whether to stop now, agreed by every worker: `signal()` is this process's own stop
    signal (its name, or None); an action of yours may ask too (on the chief, where they
    run).

    Under MultiWorkerMirroredStrategy a worker that stops alone leaves the others blocked
    in the next all-reduce, which then fails ("the tasks have crashed") and loses the steps
    since the last checkpoint. So at every loop boundary, where all workers are at the same
    step, they all-reduce two flags, "a stop signal?" and "an action asked?": if any got a
    signal, all save that step (the chief into the model dir) and exit 75 together; else if
    an action asked, all end the run there. One all-reduce of two numbers per loop, through
    the strategy's own collectives; nothing where there is one worker.
    """

    def __init__(self, strategy: tf.distribute.Strategy, signal):
        self.signal = signal
        self._count = None
        if num_workers(strategy) > 1:
            self._count = summed_over_replicas(strategy)

    def __call__(self, asked: str | None = None) -> tuple[str, str] | None:
        """("signal", its name) if a worker got a stop signal, else ("asked", the action) if
        an action on any worker asked to stop, else None.

        Args:
          asked: the label of this worker's action that asked to stop, or None.
        """
        name = self.signal()
        if self._count is not None:
            counts = self._count(tf.constant([1.0 if name else 0.0, 1.0 if asked else 0.0]))
            signals, asks = (float(c) for c in counts.numpy())
            name = name or ("a stop signal on another worker" if signals else None)
            asked = asked or ("an action on the chief" if asks else None)
        if name:
            return "signal", name
        return ("asked", asked) if asked else None
