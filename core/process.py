"""What a run sets up for the whole process: TensorFlow's runtime settings, the
model dir, and the stop signals."""

from __future__ import annotations

import os
import signal
import threading
import uuid

from absl import logging
import tensorflow as tf

from core import distribute
from core.config import Config
from core.errors import ConfigError


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


def prepare_model_dir(model_dir: str) -> None:
    """Creates `model_dir` and proves it writable. Call after every other check.

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
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        reason = getattr(e, "strerror", None) or str(e).split(";")[-1].strip()
        if isinstance(e, tf.errors.OpError) and "Read-only" in str(e):
            reason = "Read-only file system"
        raise ConfigError(f"--model_dir={model_dir} is not writable ({reason}): choose a "
                          "folder you can write to or fix its permissions") from None


class StopSignals:
    """First SIGTERM/SIGINT: finish the current loop, checkpoint, exit 75. Second: exit now,
    with code 128 + the signal number, whatever the process is doing.

    Python runs a signal handler only between bytecodes, so a compiled loop of many
    steps would delay it until the loop ends. The second signal must not wait: the C
    handler also writes the signal number to a wakeup pipe (`signal.set_wakeup_fd`),
    and a watcher thread reading it exits the process at once; TensorFlow releases the
    GIL while it runs ops, so the thread gets to run. A save cut short by that exit is
    cleaned up by the next run (`Checkpointer.remove_orphans`), which resumes from the
    last complete checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        self._count = 0
        self._lock = threading.Lock()
        self._pipe = None
        self._previous_fd = -1

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # a notebook worker thread: no handlers
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="stop-signals", daemon=True).start()
        return self

    def _note(self, signum: int) -> None:
        with self._lock:
            self._count += 1
            count = self._count
        name = signal.Signals(signum).name
        if count >= 2:
            logging.warning("second signal (%s): exiting now", name)
            os._exit(128 + signum)
        if self.received is None:
            self.received = name
            logging.warning("%s received: finishing the current loop (at most --steps_per_loop "
                            "steps), then saving a checkpoint; send it again to exit at once", name)

    def _watch(self) -> None:
        read_fd = self._pipe[0]
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in self.SIGNALS:
                    self._note(signum)

    def _handle(self, signum, frame):
        pass  # the watcher thread counts every signal, as soon as it arrives

    def __exit__(self, *exc):
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        os.close(self._pipe[1])  # ends the watcher's read
        os.close(self._pipe[0])
        self._pipe = None

    def __call__(self) -> str | None:
        return self.received
