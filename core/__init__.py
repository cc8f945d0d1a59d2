"""tapeloop core: config, data, distribution, the training loop and its outer loop.

Nothing here reads absl flags: `train.py` turns flags into a `Config` and calls
`core.run(config)`; tests and notebooks do the same with a `Config` they build.
"""

import os
import platform

from core.config import Config
from core.errors import ConfigError, DataError, TapeloopError


def quiet_tensorflow() -> None:
    """For command-line entry points, before TensorFlow is imported: its C++ log shows
    warnings and errors only, and on a machine without an NVIDIA driver errors neither,
    as CUDA's initialisation would print one ("failed call to cuInit") on every CPU run.
    TF_CPP_MIN_LOG_LEVEL set by the user wins. Importing `core` does not call it."""
    gpu_driver = os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if gpu_driver else "3")


def prefer_onednn() -> None:
    """For command-line entry points, before TensorFlow is imported: on x86, oneDNN runs
    the CPU's convolutions, as TensorFlow itself has it only on CPUs with AVX-512 VNNI or
    BF16 or AMX. On an AVX2-only CPU it would leave them to its own kernels, where the
    default job took 3x as long (README, "oneDNN on every x86 CPU") and the
    images-as-channels layout cannot run. TF_ENABLE_ONEDNN_OPTS set by the user wins
    (0 turns oneDNN off). Importing `core` does not call it."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def one_copy_of_tensorflow_logs() -> None:
    """Leaves TensorFlow's log records to the root logger's handlers, configuring those as
    absl's first log line would. TensorFlow gives its logger a handler of its own when it
    is imported before the root logger has one (a notebook, a script, a benchmark that
    imports it before `app.run`); once absl configures the root logger
    (`logging.basicConfig()` at its first line, or its own handler in `app.run`), every
    TensorFlow record printed twice, once by each (tensorflow/tensorflow#8023, which
    TensorFlow calls intended for a root logger configured later). TensorFlow's own rule is
    to add no handler when the root logger has one; this restores it. Its handler is the
    plain StreamHandler with logging's basic format that it adds; any other handler on its
    logger stays. `core.run` calls it."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig()
    tensorflow = logging.getLogger("tensorflow")
    for handler in list(tensorflow.handlers):
        if (type(handler) is logging.StreamHandler and handler.formatter is not None
                and handler.formatter._fmt == logging.BASIC_FORMAT):
            tensorflow.removeHandler(handler)


def run(config: Config, given=None, train_actions=(), eval_actions=()) -> dict:
    """Runs `config.mode` (train, train_and_eval, eval, export); returns the final metrics.

    `given`: the Config fields set explicitly; eval and export take every other model and
    data setting from the trained run's config.json (None: the fields that differ from
    the defaults). `train_actions`, `eval_actions`: your functions, called as
    f(step, metrics) with the train summaries and after every evaluation
    (core/actions.py). See `core.runner.run`.
    """
    from core import runner  # imports TensorFlow; keep `import core` cheap

    return runner.run(config, given, train_actions, eval_actions)


__all__ = ["Config", "ConfigError", "DataError", "TapeloopError", "run"]
