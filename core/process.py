"""What a run sets up for the whole process: TensorFlow's runtime settings and the
model dir, and how files are written into it (the signals: core/signals.py)."""

from __future__ import annotations

import contextlib
import os
import uuid

from absl import logging
import tensorflow as tf

from core import distribute, signals
from core.config import Config
from core.errors import ConfigError, WriteError, write_reason


# Whether a run of this process turned op determinism on (a notebook's, or a test's).
_determinism_ours = False


def setup_tensorflow(config: Config, requested: Config | None = None) -> None:
    """Process-wide TensorFlow settings, all fixed when its runtime starts: op
    determinism, thread counts and logical CPU devices. Call before any op runs.

    Args:
      config: the run's config, automatic settings resolved (`distribute.cpu_defaults`).
      requested: the config as given; thread counts it left automatic are set only if
        the runtime has not started yet (a notebook or test process that already ran
        ops keeps its threads, with a log line), while explicit ones must be set.
    """
    global _determinism_ours
    if config.deterministic:
        # With --seed this makes a run's weights a function of its config: a resumed
        # run ends bit-identical to an uninterrupted one.
        tf.config.experimental.enable_op_determinism()
        _determinism_ours = True
    elif _determinism_ours:
        # An earlier run in this process asked for it, this one did not: with it, XLA would
        # refuse a max-pool's gradient at the first step (distribute.deterministic_jit).
        from tensorflow.python.framework import config as tf_config  # not exported

        tf_config.disable_op_determinism()
        _determinism_ours = False
    requested = requested or config
    explicit = [requested.num_intra_threads is not None, requested.num_inter_threads is not None]
    distribute.set_cpu_threads(config.num_intra_threads if explicit[0] else None,
                               config.num_inter_threads if explicit[1] else None)
    try:
        distribute.set_cpu_threads(None if explicit[0] else config.num_intra_threads,
                                   None if explicit[1] else config.num_inter_threads)
    except ConfigError:
        logging.info("TensorFlow already started in this process: keeping its threads "
                     "(intra %s, inter %s)",
                     tf.config.threading.get_intra_op_parallelism_threads() or "auto",
                     tf.config.threading.get_inter_op_parallelism_threads() or "auto")
    distribute.setup_logical_cpus(config.num_cpu_devices)


def check_model_dir(model_dir: str) -> None:
    """Raises ConfigError if `model_dir` cannot be a folder (it is a file). Writes nothing."""
    if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
        raise ConfigError(f"--model_dir={model_dir} is a file: give a folder path")


def prepare_model_dir(model_dir: str, read_elsewhere: str = "") -> None:
    """Creates `model_dir` and proves it writable. Call after every other check.
    `read_elsewhere` ends the line of a folder that is not writable: how else to read it.

    Raises:
      ConfigError: it is a file, cannot be created, or is not writable.
    """
    check_model_dir(model_dir)
    try:
        tf.io.gfile.makedirs(model_dir)
    except (OSError, tf.errors.OpError) as e:
        reason = getattr(e, "strerror", None) or getattr(e, "message", str(e))
        raise ConfigError(f"--model_dir={model_dir} cannot be created ({reason}): "
                          "choose a folder you can write to") from None
    # Unique across machines and containers (where every worker may have the same pid).
    probe = os.path.join(model_dir, f".write-test-{uuid.uuid4().hex}")
    try:  # os.access says yes to root even on read-only mounts: try it
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("x")
    except (OSError, tf.errors.OpError) as e:
        reason = write_reason(e)
        if isinstance(e, tf.errors.OpError) and "Read-only" in str(e):
            reason = "Read-only file system"
        fix = ("free space on it, then run the same command again"
               if reason in ("No space left on device", "Disk quota exceeded") else
               "choose a folder you can write to or fix its permissions")
        raise ConfigError(f"--model_dir={model_dir} is not writable ({reason}): {fix}"
                          + (f"; {read_elsewhere}" if read_elsewhere and "space" not in fix
                             else "")) from None
    finally:  # a full disk makes the file, then fails to write it
        with contextlib.suppress(OSError, tf.errors.OpError):
            tf.io.gfile.remove(probe)


# What a write raises through TensorFlow's file system when the disk is full or a quota
# reached (RESOURCE_EXHAUSTED), a file would pass its size limit (`ulimit -f`, FAT32's
# 4 GB: OUT_OF_RANGE), or it may not write (PERMISSION_DENIED, a read-only mount too);
# not what a decoder or a reader raises.
WRITE_ERRORS = (OSError, tf.errors.ResourceExhaustedError, tf.errors.OutOfRangeError,
                tf.errors.PermissionDeniedError)


def write_file(path: str, data: str | bytes) -> None:
    """Writes `path` beside, under a name of this writer's own, then renames it: a reader
    never sees half a file, a process that exits at any moment (`signals.ExitOnSignals`)
    leaves the old file or the new one, and two processes writing the same file (an
    `--mode=eval` beside a continuous evaluation, which both write eval_results.json and
    the figures) never rename each other's half-written file.

    Raises:
      WriteError: it could not be written (a full disk); nothing of it is left behind.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with signals.removed_if_exiting(tmp):
            with tf.io.gfile.GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
            tf.io.gfile.rename(tmp, path, overwrite=True)
    except (OSError, tf.errors.OpError) as e:  # a full disk: the old file stays as it was
        with contextlib.suppress(OSError, tf.errors.OpError):
            tf.io.gfile.remove(tmp)
        raise WriteError(path, write_reason(e)) from None
