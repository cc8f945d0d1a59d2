"""`run(config)`: checks everything, builds the pieces, and runs one mode.

Nothing is written before every check that can fail has passed: flags, data,
the batch against the split, the model against the saved one. Only then are the
model dir, its lock and the TensorBoard writers created.

`--mode=eval` and `--mode=export` are read-only on checkpoints, and take the
trained run's settings (model, data, noise, image shape) from its `config.json`
unless a flag overrides them.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging as std_logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, Sequence

from absl import logging
import numpy as np
import tensorflow as tf

import core
from core import actions as actions_lib
from core import augment, checkpoints, data, distribute, losses, plots, process, schedules, signals
from core import summaries as summaries_lib
from core.checkpoints import Checkpointer, ModelDirLock
from core import config as config_lib
from core.config import Config
from core.controller import Cadence, Controller, format_line
from core.errors import (CheckpointError, ConfigError, DataError, LostWorkerError, ModelMismatch,
                         OutOfMemoryError, Preempted, TapeloopError, WriteError,
                         op_error_reason)
from core.summaries import Summaries
from core.trainer import Trainer
from layers import fast_forms
from layers.registry import is_user_model
from layers.autoencoders import ModelError, build_autoencoder

FIGURES = {
    "reconstructions": "reconstructions.png",
    "curves": "curves.png",
    "latent": "latent_space.png",
    "interpolation": "interpolation.png",
    "samples": "vae_samples.png",
}
# What eval and export take from the trained run's config.json unless given as flags.
INHERITED = ("model", "encoder_filters", "decoder_filters", "kernel_size", "latent_dim",
             "kl_weight", "blocks_per_stage", "latent_channels", "noise_factor", "dataset",
             "data_dir", "image_feature", "train_split", "eval_split", "synthetic_shape", "image_size",
             "channels", "resize", "bad_images", "seed", "loss", "loss_weights", "ema_decay",
             "ema")
_TUPLE_FIELDS = ("encoder_filters", "decoder_filters", "synthetic_shape", "profile_steps",
                 "image_size", "loss_weights")
# What an eval given another value than the trained run's computes differently: its
# results go apart from the run's, named by it (Run.other_settings).
SETTINGS_APART = ("resize", "noise_factor", "seed", "loss", "loss_weights", "kl_weight")
SKIPPED_FILE = "skipped_images.txt"
_OTHER = {"encoder": "decoder", "decoder": "encoder"}  # --freeze's part, and the one it trains
LOSS_TAG = "loss_function"  # train/: a text summary naming the loss at each start"
MAX_FIGURE_EXAMPLES = 2000  # eval examples decoded for the latent-space figure
MAX_DEFAULT_SIDE = 512  # a larger first image needs --image_size: photos are 1000s of px
LONG_FOLDER_CHECK_SECONDS = 60.0  # a folder opened this slowly logs how to start faster
SERVICE_WAIT_SECONDS = 60.0  # how long a --tf_data_service dispatcher may take to come up


class _OneTracePerRun(std_logging.Filter):
    """Drops TensorFlow's "N out of the last M calls to F triggered tf.function retracing"
    for the functions every Run builds anew: its training loop, evaluation batch and loop,
    device-data reorder and figure reconstruction. TensorFlow counts the traces of every
    tf.function made from the same code together (tensorflow/tensorflow#42441, which it
    calls expected), so from the fifth run in one process (a sweep in a notebook) each new
    Run's first trace of its own model read as excessive retracing, for no fault of the
    user's. A retrace within one run is what that warning is for; the tests count them
    (`Trainer.train_traces`). Other functions' warnings pass."""

    PER_RUN = ("Trainer._train_loop_body", "Trainer._eval_batch_body", "Trainer._eval_loop_body",
               "DeviceData.reorder.", "Run.reconstruct.")

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("triggered tf.function retracing" in message
                    and any(name in message for name in self.PER_RUN))


std_logging.getLogger("tensorflow").addFilter(_OneTracePerRun())


def _smaller_size(height: int, width: int, long_side: int = 256) -> tuple[int, int]:
    """(H, W) with the long side `long_side` and the aspect kept, sides multiples of 16."""
    scale = long_side / max(height, width)
    return tuple(max(32, round(side * scale / 16) * 16) for side in (height, width))


def _shown(value) -> str:
    """A flag's value as a log line shows it: 'test[:200]', 48,48."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else repr(value)


def inherit_run_config(config: Config, saved: dict | None,
                       given: Collection[str] | None) -> Config:
    """The config of an eval or export: the trained run's settings (`saved`, its
    config.json) wherever the user gave no flag, with one log line per override.

    Args:
      given: the Config fields the user set explicitly; None: those that differ from
        Config's defaults.
    """
    if not saved:
        return config
    if given is None:
        defaults = Config.__dataclass_fields__
        given = {f for f in INHERITED if getattr(config, f) != defaults[f].default}
    model = saved.get("model")
    if "model" not in given and model and model not in config_lib.model_names() \
            and not is_user_model(model):
        raise ConfigError(
            f"the run was trained with --model={model!r}, a factory registered from Python "
            "(layers.autoencoders.register), which this process has not registered: call "
            f"register({model!r}, factory) before core.run, or train with "
            "--model=MODULE:FACTORY, which eval and export import again")
    # Other data than the run's: its splits (and for another dataset, its folder) name
    # parts of the run's data, not of this one; this data's default splits apply.
    other = {name for name in ("dataset", "data_dir")
             if name in given and name in saved and getattr(config, name) != saved[name]}
    not_taken = (({"data_dir", "image_feature"} if "dataset" in other else set())
                 | ({"train_split", "eval_split"} if other else set())
                 # Another loss: the run's weights were its losses'.
                 | ({"loss_weights"} if "loss" in given and "loss" in saved
                    and config.loss != saved["loss"] else set()))
    changes = {}
    for name in INHERITED:
        if name not in saved or name in not_taken:
            continue
        value = saved[name]
        value = tuple(value) if name in _TUPLE_FIELDS and value is not None else value
        if name in given:
            if getattr(config, name) != value:
                logging.info("--%s=%s overrides the trained run's %s", name,
                             _shown(getattr(config, name)),
                             "default (unset)" if value is None else _shown(value))
        elif getattr(config, name) != value:
            changes[name] = value
    return config.replace(**changes)


def _is_here(path: str) -> bool:
    """Whether a folder, file or pattern of shards names something here (an unreachable
    file system: no)."""
    try:
        return bool(tf.io.gfile.glob(path)) if glob.has_magic(path) else tf.io.gfile.exists(path)
    except tf.errors.OpError:
        return False


def where_the_data_moved(config: Config, saved: dict | None,
                         given: Collection[str] | None) -> dict | None:
    """The trained run's config.json (`saved`) for a run given --data_dir where the run's
    own is not here (a run dir copied to another machine, data moved): the same data, moved,
    unless --dataset names another. An eval keeps the run's splits and its eval/ curves, a
    resumed training run its best so far; otherwise another --data_dir is other data
    (eval_DATA/ and its default splits; judged anew)."""
    old = (saved or {}).get("data_dir")
    if not old or config.mode == "export" or config.data_dir in (None, old):
        return saved
    training = config.mode not in config_lib.INFERENCE_MODES
    defaults = Config.__dataclass_fields__
    if given is None or training:  # training takes no flag from the run
        given = {f for f in ("dataset", "data_dir") if getattr(config, f) != defaults[f].default}
    # The dataset this run reads: an eval without --dataset takes the run's.
    dataset = config.dataset if training or "dataset" in given else saved.get("dataset")
    if "data_dir" not in given or dataset != saved.get("dataset") or _is_here(old):
        return saved
    logging.info("the run's --data_dir=%s (its config.json) is not here: --data_dir=%s is taken "
                 "as the same data, moved (%s)", old, config.data_dir,
                 "its best so far stands; a fresh --model_dir starts a run on other data"
                 if training else "the run's splits and eval/ curves; --eval_split or --dataset "
                 "evaluates other data")
    return {**saved, "data_dir": config.data_dir}


def _check_the_runs_data_is_here(data_dir: str) -> None:
    """Eval's --data_dir taken from the run's config.json: on another machine, or after the
    data moved, it names a path that is not there, which the user never gave."""
    if glob.has_magic(data_dir):  # a pattern of shards: the source says what it matches
        return
    from core.sources import reachable

    reachable(data_dir, "--data_dir")
    if not tf.io.gfile.exists(data_dir):
        raise DataError(f"--data_dir={data_dir}, the trained run's (its config.json), does not "
                        "exist: give --data_dir where the data is now")


def _devices(strategy: tf.distribute.Strategy) -> list[str]:
    """The devices the replicas run on (the default strategy: the first GPU, else the CPU)."""
    try:
        return list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy has no worker devices
        return [(tf.config.list_logical_devices("GPU") or
                 tf.config.list_logical_devices("CPU"))[0].name]


def _saved_image_shape(saved: dict | None) -> tuple[int, int, int] | None:
    shape = (saved or {}).get("image_shape")
    return tuple(int(d) for d in shape) if shape else None


class Run:
    """Everything one invocation builds, in the order data flows (see DESIGN.md).

    Args:
      config: the run's configuration.
      given: the Config fields set explicitly (eval and export take the others from the
        trained run); None: those that differ from the defaults.
    """

    def __init__(self, config: Config, given: Collection[str] | None = None,
                 train_actions: Sequence[actions_lib.Action] = (),
                 eval_actions: Sequence[actions_lib.Action] = ()):
        inference = config.mode in config_lib.INFERENCE_MODES
        config = distribute.strategy_of_cluster(config)
        requested = config
        config, chosen = distribute.cpu_defaults(config, len(distribute.gpus()),
                                                 distribute.usable_cores())
        process.setup_tensorflow(config, requested)
        logging.info(chosen)
        self.strategy = distribute.make_strategy(config.strategy, config.num_cpu_devices)
        try:
            distribute.check_the_same_command(self.strategy, requested)
        except distribute.LOST_WORKER_ERRORS as e:
            raise _lost_worker_at_start(e) from None
        process.check_model_dir(config.model_dir)
        self.checkpoint_path = None
        self.saved = None
        self.data_moved_from = None  # training: the run's --data_dir, where its data moved from
        if not inference:
            resumed = (checkpoints.saved_config(config.model_dir)
                       if checkpoints.checkpoints_on_disk(config.model_dir) else None)
            held = None if resumed else _another_runs_results(config.model_dir, config.model_dir)
            if held:  # a folder of your own that evaluated or exported another run
                raise ConfigError(f"--model_dir={config.model_dir} holds results of the run "
                                  f"{held[0]} (its {held[1]}): a training run would go in "
                                  "among them (its eval/ curve, its exports): give it a folder "
                                  "of its own")
            if where_the_data_moved(config, resumed, given) is not resumed:
                self.data_moved_from = resumed["data_dir"]
        if inference:
            self.checkpoint_path = self._find_checkpoint(config)
            source = checkpoints.run_of(self.checkpoint_path)
            _refuse_another_runs_results(config, source)
            self.saved = checkpoints.saved_config(source) or (
                checkpoints.saved_config(config.model_dir) if source != config.model_dir else None)
            flags_data_dir = config.data_dir
            self.saved = where_the_data_moved(config, self.saved, given)
            config = inherit_run_config(config, self.saved, given)
            whose = ("" if self.saved is None or config.dataset != self.saved.get("dataset")
                     else " (the trained run's)")
            config_lib.check_data_dir_is_read(config.dataset, config.data_dir, whose)
            if config.mode != "export":
                config_lib.check_cache_is_read(config.dataset, config.cache, whose)
            if config.mode != "export" and config.data_dir != flags_data_dir:
                _check_the_runs_data_is_here(config.data_dir)
            if self.saved and config.ema_decay and not self.saved.get("ema_decay"):
                logging.warning("--ema_decay=%s: %s keeps no weight average, so its own weights "
                                "are %s", config.ema_decay, config.model_dir,
                                "exported" if config.mode == "export" else "evaluated")
                config = config.replace(ema_decay=None)
            if self.saved:
                # Not a choice of this run: the part the run trained is the one its weight
                # average holds (without a config.json, --freeze says which).
                config = config.replace(freeze=checkpoints.saved_value(self.saved, "freeze"))
        self.config = config
        distribute.check_batch(self.strategy, config.batch_size, config.batch_shards)
        replicas = self.strategy.num_replicas_in_sync
        if config.eval_batch % replicas:
            raise ConfigError(f"--eval_batch_size={config.eval_batch} does not divide evenly over "
                              f"{replicas} replicas: " + distribute.use_a_multiple(
                                  "--eval_batch_size", config.eval_batch, replicas))
        self.is_chief = distribute.is_chief(self.strategy)
        self.precision = (config.precision if config.precision != "auto" else
                          distribute.default_precision(distribute.gpu_compute_capability()))
        self.jit_compile = (False if config.eager else config.jit_compile
                            if config.jit_compile is not None else distribute.default_jit_compile())
        self._load_data(inference)
        if not inference:
            train, held_out = self.train_split.num_examples, self.eval_split.num_examples
            try:
                distribute.check_the_same_data(self.strategy, {
                    f"{train:,} training examples": train,
                    f"{held_out:,} evaluation examples": held_out,
                    f"images of {'x'.join(map(str, self.image_shape))}": self.image_shape},
                    config.data_dir)
            except distribute.LOST_WORKER_ERRORS as e:
                raise _lost_worker_at_start(e) from None
        signals.interruption_point()  # a deferred Ctrl-C (from Python): nothing written yet
        config = self.config  # with the data-dependent choices made
        self.run_config = {**config.to_dict(), "image_shape": list(self.image_shape),
                           "loss_scaling": self.precision == "mixed_float16",
                           # what was chosen for the user (cpu_defaults), beside the values
                           "automatic": sorted(f for f in distribute.AUTOMATIC
                                               if getattr(requested, f) is None)}
        self._check_model(inference)
        own_loss = any(losses.is_user_loss(name) for name in config.loss.split("+"))
        try:  # an export computes no loss: it needs no loss module on this machine
            self.loss = (losses.build() if own_loss and config.mode == "export" else
                         losses.build(config.loss, config.loss_weights))
            losses.check(self.loss, self.image_shape)
        except losses.LossError as e:
            raise ConfigError(str(e)) from e
        if min(self.image_shape[:2]) < self.loss.min_size:
            raise ConfigError(
                f"--loss={config.loss} needs images of at least {self.loss.min_size}x"
                f"{self.loss.min_size} (SSIM's window); these are {self.image_shape[0]}x"
                f"{self.image_shape[1]}: raise --image_size, or train with another loss")
        self._check_halvings()
        # Your actions: imported and checked now on every worker (a bad one stops them all
        # alike), called on the chief only (core/actions.py).
        self.train_actions = actions_lib.Actions("train", config.train_actions, train_actions)
        self.eval_actions = actions_lib.Actions("eval", config.eval_actions, eval_actions)
        if not self.is_chief:
            self.train_actions, self.eval_actions = (actions_lib.Actions("train"),
                                                     actions_lib.Actions("eval"))
        self.model = self._build_model()  # a user's factory can fail: before any write
        if config.init_checkpoint and not inference:
            self._initialise_model()  # so can another run's checkpoint
        if config.freeze != "none":  # after the read: a source's average is the whole model's
            self._freeze(inference)  # (eval and export: the run's, whose average is its part's)
        signals.interruption_point()
        # The faster forms of the model's functions (layers/fast_forms.py), once, for this
        # run: for XLA as asked, and again below if XLA turns out to be impossible.
        asked_jit = self.jit_compile
        forms, why = self._install_forms()
        if self.jit_compile and config.deterministic:  # with the forms: their max-pool has
            # a deterministic gradient, your own model's MaxPooling2D has not
            self.jit_compile, why_not = distribute.deterministic_jit(
                True, True, distribute.has_max_pool_gradient(self.model, self.image_shape))
            if why_not:  # a warning when XLA was asked for, a note where it is the default
                (logging.warning if config.jit_compile else logging.info)(why_not)
        if self.jit_compile and config.mode != "export" and (is_user_model(config.model)
                                                             or own_loss):
            # Your own model or loss may hold an op XLA has no kernel for: found now, not as
            # a traceback at the first step (nor only on the GPU machine, where XLA is on).
            refusal = distribute.xla_refusal(self.model, self.image_shape,
                                             self.loss if own_loss else None, self.strategy)
            what = (f"--model={config.model}" if is_user_model(config.model) else "") + (
                " with " if is_user_model(config.model) and own_loss else "") + (
                f"--loss={config.loss}" if own_loss else "")
            if refusal and config.jit_compile:
                raise ConfigError(f"--jit_compile: XLA cannot compile {refusal} of {what}: train "
                                  "without XLA (--nojit_compile), or replace the op")
            if refusal:
                logging.warning("XLA (on by default with a GPU) cannot compile %s of %s: this run "
                                "trains without XLA (--nojit_compile says so; replacing the op "
                                "gives XLA's speed)", refusal, what)
                self.jit_compile = False
        if self.jit_compile != asked_jit:
            forms, why = self._install_forms()
        if (self.forms is None and not inference and self.precision == "mixed_bfloat16"
                and not self.jit_compile and not distribute.gpus()):
            logging.warning("--precision=mixed_bfloat16 on a CPU without XLA: TensorFlow's CPU "
                            "kernel sums the gradient of a bias that oneDNN does not fuse into a "
                            "convolution (a Conv2DTranspose's, a Dense's) in bfloat16, far off "
                            "over large maps; your model's layers are as you wrote them, so "
                            "train in float32 (the default on CPUs) or with --jit_compile")
        if self.forms:
            if self.forms.image_groups != forms.image_groups:
                why = "the model's layers have no images-as-channels form"
            logging.info("computation forms: %s (%s)", self.forms.describe(), why)
        # What ran, beside what was asked (`precision: auto`, `jit_compile: null`, ...).
        self.run_config.update(
            resolved_precision=self.precision, resolved_jit_compile=self.jit_compile,
            resolved_strategy=type(self.strategy).__name__,
            resolved_replicas=self.strategy.num_replicas_in_sync,
            resolved_devices=_devices(self.strategy),
            resolved_forms=self.forms.describe() if self.forms else None)
        # Every check has passed: only now does anything touch the disk.
        self.output_dir = config.model_dir
        if not self.is_chief:  # other workers' saves and summaries are thrown away
            self.output_dir = _worker_dir(config.model_dir, distribute.task_id(self.strategy))
        verb, elsewhere = _results_elsewhere(config, self.checkpoint_path)
        process.prepare_model_dir(config.model_dir, read_elsewhere=elsewhere and (
            f"to {verb} a run you cannot write to, {elsewhere}"))
        # A continuous evaluation runs beside the training run that holds the lock.
        self.lock = (ModelDirLock(config.model_dir, meanwhile=elsewhere and (
            f"to {verb} it while it trains, " + ("run --mode=continuous_eval beside it, or "
                                                  if verb == "evaluate" else "") + elsewhere))
                     if self.is_chief and config.mode != "continuous_eval" else None)
        if self.lock:
            self.lock.acquire()
        if self.skipped and self.is_chief:
            path = os.path.join(config.model_dir, SKIPPED_FILE)
            process.write_file(
                path, "".join(f"{p}\t{why}\n" for p, why in sorted(self.skipped.items())))
            logging.info("wrote the %d skipped file%s to %s", len(self.skipped),
                         "" if len(self.skipped) == 1 else "s", path)
        try:
            self._build(inference)
        except distribute.LOST_WORKER_ERRORS as e:  # the weights' first values are broadcast
            self.close()
            if distribute.num_workers(self.strategy) < 2:
                raise
            raise _lost_worker_at_start(e) from None
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- checks
    @staticmethod
    def _find_checkpoint(config: Config) -> str:
        if config.checkpoint == "best":
            folder = os.path.join(config.model_dir, checkpoints.BEST_DIR)
            state = checkpoints.read_state(folder) if tf.io.gfile.isdir(folder) else None
            if state is None:
                raise ConfigError(f"--checkpoint=best: {config.model_dir} kept no best checkpoint"
                                  ": train it with --keep_best=METRIC (e.g. eval/loss), or give "
                                  "a checkpoint path")
            return state.model_checkpoint_path
        if config.checkpoint:
            return checkpoints.resolve_path(config.checkpoint, model_dir=config.model_dir)
        state = checkpoints.read_state(config.model_dir) if tf.io.gfile.isdir(
            config.model_dir) else None
        found = state.model_checkpoint_path if state else (
            checkpoints.checkpoints_on_disk(config.model_dir) or [None])[-1]
        if not found:
            held = _another_runs_results(config.model_dir, config.model_dir)
            if held:  # a folder of your own that evaluated or exported another run
                raise ConfigError(f"--mode={config.mode} found no checkpoint in --model_dir="
                                  f"{config.model_dir}, which holds results of the run "
                                  f"{held[0]} (its {held[1]}): --checkpoint={held[0]} "
                                  f"--model_dir={config.model_dir} reads its latest checkpoint")
            raise ConfigError(f"--mode={config.mode} found no checkpoint in --model_dir="
                              f"{config.model_dir}: train first, or point --model_dir at a "
                              "trained run (or --checkpoint at a checkpoint)")
        return found

    def _load_data(self, inference: bool) -> None:
        config = self.config
        self.train_split = self.eval_split = None
        self.skipped: dict[str, str] = {}
        saved_shape = _saved_image_shape(self.saved)
        if config.mode == "export" and saved_shape:
            # Export needs no data at all. A given --image_size is not ignored: it is
            # another model, which the restore refuses as eval does.
            self.image_shape = (*config.image_size, saved_shape[2]) if config.image_size \
                else saved_shape
            return
        from core.sources import default_splits, shard_splits

        chosen = {}
        if config.train_split is None or config.eval_split is None:
            train_split, eval_split = default_splits(config.dataset, config.data_dir)
            chosen = {k: v for k, v in (("train_split", train_split), ("eval_split", eval_split))
                      if getattr(config, k) is None}
            whole = inference and "eval_split" in chosen and (
                (train_split, eval_split) == ("train[:90%]", "train[90%:]")
                or config.dataset == "tfrecord" and shard_splits(config.data_dir) == ["train"])
            if whole:
                # Data of one split evaluated by a run that did not train on it (a run's own
                # data keeps its splits): the whole of it, not the tenth training would hold out.
                chosen.update(train_split="train", eval_split="train")
            logging.info("%s: %s%s", config.dataset, ", ".join(
                f"--{k}={v}" for k, v in chosen.items() if not inference or k == "eval_split"),
                " (all of it: other data than the run's" + (
                    "" if config.dataset == "tfrecord" else "; of a copy of the data it "
                    "trained on, --eval_split=train[90%:] is the tenth it held out") + ")"
                if whole else "")
            self.config = config = config.replace(**chosen)
        # Shards of the training split alone: --mode=train evaluates nothing, and its figures
        # show training images.
        no_held_out = (config.mode == "train" and "eval_split" in chosen
                       and config.dataset == "tfrecord"
                       and config.eval_split not in shard_splits(config.data_dir))
        if no_held_out:
            logging.info("%s has no %s shards: --mode=train evaluates nothing, and its figures "
                         "show training images (--eval_split=%s); an evaluation needs held-out "
                         "shards, e.g. python -m core.prepare --splits=train[:90%%],train[90%%:] "
                         "of the source", config.data_dir, config.eval_split, config.train_split)
            self.config = config = config.replace(eval_split=config.train_split)
        if config.data_on_device is None and config.mode not in ("train", "train_and_eval"):
            self.config = config = config.replace(data_on_device=False)
        load = dict(dataset=config.dataset, data_dir=config.data_dir,
                    verify=config.verify_checksums, synthetic_shape=config.synthetic_shape,
                    channels=config.channels, resize=config.resize, bad_images=config.bad_images,
                    image_feature=config.image_feature)
        training = config.mode in ("train", "train_and_eval")
        start = time.monotonic()
        if training:
            # The training split fixes the size and channels (unless given), the eval split
            # follows.
            opened = data.open_split(config.train_split, image_size=config.image_size, **load)
            self.train_split = self._report(opened, config.train_split)
            shape = self.train_split.image_shape
            if (config.image_size is None and max(shape[:2]) > MAX_DEFAULT_SIDE
                    and not checkpoints.saved_config(config.model_dir)):  # not a resume
                h, w = _smaller_size(*shape[:2])
                raise ConfigError(
                    f"--dataset={config.dataset}: the first image is {shape[0]}x{shape[1]} and "
                    "no --image_size was given; training at that size costs "
                    f"{shape[0] * shape[1] / 4096:,.0f}x the compute of 64x64 per image: give "
                    f"the size to train at, e.g. --image_size={h},{w} (the same aspect) or "
                    f"--image_size=128, or --image_size={shape[0]},{shape[1]} for full size")
            load["channels"] = shape[2]
            opened = None if no_held_out else data.open_split(config.eval_split,
                                                              image_size=shape[:2], **load)
        else:
            opened = data.open_split(config.eval_split, image_size=config.image_size or (
                saved_shape[:2] if saved_shape else None), **{
                    **load, "channels": config.channels or (saved_shape[2] if saved_shape else None)})
        # Without held-out shards, the training split (as cached below) shows the figures.
        self.eval_split = self._report(opened, config.eval_split) if opened else None
        self.image_shape = (self.eval_split or self.train_split).image_shape
        # The split the model trains (or, evaluated, trained) on, if this is its data.
        own_data = self.saved and all(self.saved.get(k) == getattr(config, k)
                                      for k in ("dataset", "data_dir"))
        trained_on = (config.train_split if training else
                      self.saved.get("train_split") if own_data else None)
        shared = trained_on and not no_held_out and data.shared_examples(
            config.dataset, config.data_dir, trained_on, config.eval_split,
            self.train_split if training else None, self.eval_split)
        if shared:
            logging.warning(
                "--eval_split=%s shares %s of its %s examples with %s--train_split=%s: its "
                "metrics are %sof images the model %s on, not held-out ones; give splits that "
                "do not overlap for those", config.eval_split, f"{shared:,}",
                f"{self.eval_split.num_examples:,}", "" if training else "the run's ", trained_on,
                "" if shared == self.eval_split.num_examples else "partly ",
                "trains" if training else "trained")
        if config.dataset == "folder" and time.monotonic() - start > LONG_FOLDER_CHECK_SECONDS:
            logging.info("a folder's files are checked at every start of a run that reads them "
                         "(a resume, an evaluation); python -m core.prepare --dataset=folder "
                         "--data_dir=%s --output_dir=DIR checks them once and writes TFRecord "
                         "shards, which start without it", config.data_dir)
        if config.tf_data_service and training:
            data.wait_for_service(config.tf_data_service, SERVICE_WAIT_SECONDS)
        if config.cache == "memory":
            data.check_fits_in_memory([s for s in (self.eval_split, self.train_split) if s],
                                      "--cache=memory")
            if self.eval_split:
                self.eval_split = data.materialize(self.eval_split)
        elif config.cache != "none" and self.eval_split:
            self.eval_split = data.cache_to_dir(self.eval_split, config.cache)
        if not training:
            return
        n = self.train_split.num_examples
        if n < config.step_batch:
            raise ConfigError(f"--batch_size={config.step_batch} is larger than the training "
                              f"split ({n} examples of {config.train_split!r}): lower it, or "
                              "widen the split")
        size_mb = n * int(np.prod(self.image_shape)) / 2**20
        in_memory = isinstance(self.train_split, data.Split)
        if config.data_on_device is None:  # auto: on for data in memory, where the split fits
            fits = size_mb <= config.data_on_device_max_mb
            if not fits:
                logging.info("the training split (%.0f MB) is over --data_on_device_max_mb: "
                             "feeding it with tf.data", size_mb)
            self.config = config = config.replace(
                data_on_device=fits and (in_memory or config.cache == "memory"))
        elif config.data_on_device:
            if size_mb > config.data_on_device_max_mb:
                raise ConfigError(
                    f"--data_on_device: the training split is {size_mb:,.1f} MB per device, "
                    f"over --data_on_device_max_mb={config.data_on_device_max_mb}: raise the "
                    "limit if the device has room, or drop --data_on_device")
        if config.cache == "memory" or config.data_on_device:
            if config.cache != "memory":  # --cache=memory checked both splits above
                data.check_fits_in_memory([self.train_split], "--data_on_device")
            self.train_split = data.materialize(self.train_split)
        elif config.cache != "none":
            self.train_split = data.cache_to_dir(self.train_split, config.cache)
        if self.eval_split is None:
            self.eval_split = self.train_split

    def _report(self, opened: data.Opened, spec: str):
        """Logs what was opened (and what was skipped or upscaled); returns the source."""
        source = opened.source
        self.skipped.update(opened.skipped)
        logging.info("%s %s: %s of %s", self.config.dataset, spec, source.describe(),
                     "x".join(map(str, source.image_shape)))
        if source.kind != "memory":
            logging.info("%s %s: %s", self.config.dataset, spec, source.describe_decoding())
        if opened.upscaled:
            one = opened.upscaled == 1
            logging.info("%d image%s of %s %s smaller than %s and upscaled", opened.upscaled,
                         "" if one else "s", spec, "is" if one else "are",
                         "x".join(map(str, source.image_shape[:2])))
        return source

    def _check_model(self, inference: bool) -> None:
        if not inference:
            saved = checkpoints.saved_config(self.config.model_dir)
            if saved and self.data_moved_from:  # the same data: no "other data" warning
                saved["data_dir"] = self.config.data_dir
            checkpoints.check_compatible(self.config.model_dir, self.run_config, saved=saved)
            return
        differences = checkpoints.model_differences(self.saved or {}, self.run_config)
        if differences:
            raise ConfigError(
                f"{self.checkpoint_path} holds a different model ({'; '.join(differences)}): drop "
                "the flags that change the model, and the trained run's are used")

    # ----------------------------------------------------------------- build
    def _check_halvings(self) -> None:
        """The resnet's stages halve H and W exactly: they must divide by 2^stages."""
        from layers.registry import MODELS

        spec = MODELS.get(self.config.model)
        if not spec or spec.family != "resnet":
            return
        stages = len(self.config.encoder_filters or spec.encoder_filters)
        h, w = self.image_shape[:2]
        if h % 2**stages or w % 2**stages:
            fit = [max(2**stages, round(d / 2**stages) * 2**stages) for d in (h, w)]
            raise ConfigError(
                f"--model={self.config.model} halves the image {stages} times; {h}x{w} does not "
                f"divide by {2**stages}: use --image_size={fit[0]},{fit[1]}, or fewer stages "
                "(--encoder_filters/--decoder_filters)")

    def _install_forms(self) -> tuple[fast_forms.Forms | None, str]:
        """Chooses the model's computation forms for this run and installs them in
        `self.forms` (what applies to its layers); returns what was chosen, and why."""
        forms, why = fast_forms.choose(self.jit_compile, self.precision,
                                       deterministic=self.config.deterministic)
        if self.config.mode == "export":  # the SavedModel may be served on any device
            forms, why = fast_forms.portable(forms), "an export runs on any device"
        self.forms = fast_forms.install(self.model, forms)
        return forms, why

    def _build_model(self):
        config = self.config
        # Weight initialisation follows --seed too: runs are repeatable, and every
        # replica count or worker count starts from the same weights.
        tf.keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            try:
                return build_autoencoder(
                    config.model, self.image_shape, self.precision, config.encoder_filters,
                    config.decoder_filters, config.kernel_size, config.latent_dim,
                    config.kl_weight, config.blocks_per_stage, config.latent_channels)
            except ModelError as e:
                raise ConfigError(str(e)) from e

    def _has_checkpoints(self) -> bool:
        """Whether --model_dir has checkpoints, which this run resumes."""
        model_dir = self.config.model_dir
        return tf.io.gfile.isdir(model_dir) and bool(
            checkpoints.read_state(model_dir) or checkpoints.checkpoints_on_disk(model_dir))

    def _initialise_model(self) -> None:
        """--init_checkpoint: a new run starts from another run's weights (all, or the
        encoder's or decoder's); a run with checkpoints of its own resumes them instead."""
        config = self.config
        if self._has_checkpoints():
            logging.info("--init_checkpoint=%s is not read: %s has checkpoints of its own, which "
                         "this run resumes", config.init_checkpoint, config.model_dir)
            return
        prefix, averaged = checkpoints.initialise(self.model, config.init_checkpoint,
                                                  config.init_modules, average=config.ema,
                                                  advice=self._init_shape_advice())
        what = ("the model's weights" if config.init_modules == "all" else
                f"the {config.init_modules}'s weights (the "
                f"{'decoder' if config.init_modules == 'encoder' else 'encoder'} starts from "
                "its initialisation)")
        if averaged:
            what += " (its weight average, which its evaluation and export use; --noema: " \
                    "its raw weights)"
        logging.info("initialised %s from %s (its step %d); the optimizer, the step and the "
                     "schedule start afresh", what, prefix, checkpoints.checkpoint_step(prefix))

    def _init_shape_advice(self) -> str | None:
        """What to do when --init_checkpoint's run trained the same model on images of
        another shape (its config.json says), on which a model's weights may depend (the
        VAE's dense layer, the first and last convolutions' channels); None where it did not,
        or cannot be told."""
        try:
            saved = checkpoints.saved_config(checkpoints.run_of(checkpoints.resolve_path(
                self.config.init_checkpoint, "--init_checkpoint")))
        except (ConfigError, CheckpointError):
            return None  # initialise says what is wrong with the path
        shape = _saved_image_shape(saved)
        model = [k for k in checkpoints.MODEL_FIELDS if k != "image_shape"]
        if (not shape or shape == tuple(self.image_shape)
                or checkpoints.model_differences(saved, self.run_config, model)):
            return None
        h, w, c = shape
        # The channels first: every model's first and last convolutions depend on them; the
        # size only where a layer is sized by it (the VAE's Dense layers).
        fix, on = ((f"--channels={c}", "channels") if c != self.image_shape[2] else
                   (f"--image_size={h},{w}", "size"))
        return (f"its run trained on {h}x{w}x{c} images, these are "
                f"{'x'.join(map(str, self.image_shape))}: give {fix} (this model's weights "
                f"depend on the image's {on}), or --init_modules for the part that matches")

    def _freeze(self, inference: bool) -> None:
        """--freeze: the part's weights are no longer trainable, so the gradient, the
        optimizer's slots, weight decay and the weight average cover the other part only,
        and a BatchNormalization in it normalises with its moving statistics (Keras' frozen
        layers). Its weights are checkpointed and exported as before. An evaluation or
        export of a frozen run freezes the part too, so that the run's weight average
        lines up with the weights it averaged."""
        config, model = self.config, self.model
        part = getattr(model, config.freeze)
        part.trainable = False
        if inference:
            return
        if not model.trainable_weights:
            raise ConfigError(f"--freeze={config.freeze} leaves nothing to train: the "
                              f"{_OTHER[config.freeze]} has no trainable weights")
        frozen = sum(int(np.prod(w.shape)) for w in part.weights)
        trained = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        logging.info("--freeze=%s: its %s parameters stay as they are; the optimizer trains the "
                     "%s's %s", config.freeze, f"{frozen:,}", _OTHER[config.freeze],
                     f"{trained:,}")
        read = config.init_checkpoint and config.init_modules in ("all", config.freeze)
        if not (read or self._has_checkpoints()):
            logging.warning("--freeze=%s without --init_checkpoint%s: the %s stays at its random "
                            "initialisation (--seed); give --init_checkpoint=RUN_DIR to freeze "
                            "trained weights", config.freeze,
                            f" reading it (--init_modules={config.init_modules})"
                            if config.init_checkpoint else "", config.freeze)

    def _build(self, inference: bool) -> None:
        config, model = self.config, self.model
        self.schedule = None
        if self.train_split is not None:
            steps_per_epoch = self.train_split.num_examples // config.step_batch
            total = config.train_steps or config.epochs * steps_per_epoch
            self.schedule = schedules.from_config(config, total, steps_per_epoch)
        with self.strategy.scope():
            device_data = None
            if config.data_on_device and self.train_split is not None:
                device_data = data.DeviceData(self.train_split.images, config.step_batch,
                                              self.strategy.num_replicas_in_sync, config.seed)
            self.trainer = Trainer(
                model, self.strategy, config.step_batch, config.learning_rate,
                self.precision, self.jit_compile, config.eager, device_data, config.seed,
                config.noise_factor, batch_shards=config.batch_shards, loss=self.loss,
                augment=config.augmentations,
                lr_multiplier=self.schedule if config.lr_schedule != "constant"
                or config.warmup_steps else None, optimizer=config.optimizer,
                weight_decay=0.004 if config.weight_decay is None else config.weight_decay,
                momentum=0.9 if config.momentum is None else config.momentum,
                nesterov=config.nesterov, clip_norm=config.clip_norm,
                clip_value=config.clip_value, ema_decay=config.ema_decay,
                accum_steps=config.grad_accum_steps)
        self.checkpointer = Checkpointer(self.output_dir, self.trainer, config.keep_checkpoints,
                                         restore_dir=config.model_dir, read_only=inference)
        self.summaries = Summaries(self.output_dir)
        self.code_shape = tuple(model.encode(tf.zeros((1, *self.image_shape))).shape[1:])
        logging.info(
            "model %s (%s parameters, code %s) | loss %s | %s | %d replica(s) x %d shard(s) | precision %s | "
            "jit_compile %s | threads intra %s, inter %s",
            config.model, f"{model.count_params():,}", self.code_shape, self.loss.title,
            type(self.strategy).__name__, self.strategy.num_replicas_in_sync, config.batch_shards,
            self.precision, self.jit_compile,
            tf.config.threading.get_intra_op_parallelism_threads() or "auto",
            tf.config.threading.get_inter_op_parallelism_threads() or "auto")
        parts = self.strategy.num_replicas_in_sync * config.batch_shards
        if getattr(model, "running_statistics", None) and parts > 1 and not inference:
            logging.info(
                "%d variables of the model keep moving statistics (BatchNormalization): each of "
                "the %d parts of %s (%d replica(s) x %d shard(s)) is normalised by its own %d "
                "examples, and the statistics keep the mean of the parts' updates%s%s",
                len(model.running_statistics), parts,
                "a step's batch" if config.grad_accum_steps == 1 else "each micro-batch",
                self.strategy.num_replicas_in_sync,
                config.batch_shards, config.step_batch // parts // config.grad_accum_steps,
                f"; the {config.grad_accum_steps} micro-batches of a step update them one after "
                "another" if config.grad_accum_steps > 1 else "",
                "; --batch_shards=1 normalises each replica's batch as one"
                if config.batch_shards > 1 else "")
        if getattr(model, "stateful_random_ops", ()) and not inference:
            logging.warning(
                "the model draws random numbers with TensorFlow's stateful random ops (%s: "
                "tf.random.normal, uniform, ...), whose state is inside the kernels, not in the "
                "checkpoint: a resumed run will not repeat the draws of an uninterrupted one; "
                "for exact resume draw with keras.random and a keras.random.SeedGenerator, or use "
                "Keras' random layers (Dropout, GaussianNoise)", ", ".join(model.stateful_random_ops))
        if config.augmentations and not inference:
            logging.info("augmentation of each training batch, drawn per (seed, step, replica): "
                         "%s", ", ".join(config.augmentations))
        if config.grad_accum_steps > 1:
            logging.info("gradient accumulation: %d micro-batches of %d per update, an effective "
                         "batch of %d", config.grad_accum_steps, config.batch_size,
                         config.step_batch)

    def restore(self, path: str) -> int:
        """Restores `path` for an eval or export; returns its step. Of a run without a
        config.json (copied without it, or from elsewhere), nothing said how it was
        trained: a model that does not match says so, not that the code changed."""
        try:
            return self.checkpointer.restore(path)
        except ModelMismatch:
            if self.saved is not None:
                raise
            raise ModelMismatch(
                f"checkpoint {path} holds another model than --model={self.config.model} with "
                f"these flags: {checkpoints.run_of(path)} has no config.json to say how it was "
                "trained, so none of its flags were taken: give them (--model and its sizes, "
                "--image_size, --channels)") from None

    def close(self) -> None:
        summaries = getattr(self, "summaries", None)
        if summaries is not None:
            summaries.close()
        if getattr(self, "lock", None):
            self.lock.release()
        if not getattr(self, "is_chief", True) and getattr(self, "output_dir", None):
            tf.io.gfile.rmtree(self.output_dir)
            logging.info("removed this worker's temporary dir %s", self.output_dir)

    # ------------------------------------------------------------------ eval
    @property
    def uses_ema(self) -> bool:
        return bool(self.config.ema_decay and self.config.ema)

    @property
    def weights_name(self) -> str | None:
        """Which weights evaluation, figures and export read, for the log and the titles,
        where a run has a weight average: 'EMA weights', or 'raw weights' (--noema)."""
        if not self.config.ema_decay:
            return None
        return "EMA weights" if self.config.ema else "raw weights"

    @property
    def other_weights(self) -> str | None:
        """'noema' ('ema') when an eval or export reads the raw weights (the average) of a
        run that evaluated its average (raw weights), by its config.json; None when it reads
        the weights the run evaluated. Their results and exports are kept apart from the
        run's (`eval_noema/`, `export_noema/<step>/`), which they would otherwise replace."""
        saved = self.saved or {}
        if not (self.config.ema_decay and saved.get("ema_decay")):
            return None
        if bool(saved.get("ema", True)) == bool(self.config.ema):
            return None
        return "ema" if self.config.ema else "noema"

    def other_settings(self) -> list[str]:
        """'noise_factor-0.8', 'loss-mse', ...: each setting given to an eval that computes
        other results than the trained run's evaluations (its config.json), so that they are
        kept apart from the run's (`eval_noise_factor-0.8/`). (Another image size is another
        model, refused.)"""
        saved, cfg = self.saved or {}, self.config
        out = []
        for name in SETTINGS_APART:
            if name not in saved or (name == "seed" and not cfg.noise_factor) or (
                    name == "loss_weights" and cfg.loss != saved.get("loss")):
                continue  # the seed draws the denoiser's noise only; another loss its weights
            value, ran = getattr(cfg, name), saved[name]
            if name in _TUPLE_FIELDS:
                value, ran = (tuple(v) if v is not None else None for v in (value, ran))
            if value != ran:
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
                out.append(_folder_safe(f"{name}-{shown}"))
        return out

    def apart(self) -> list[str]:
        """The names of what makes an eval's results other than the run's evaluations:
        other_weights, then other_settings (empty: the run's own)."""
        return ([self.other_weights] if self.other_weights else []) + self.other_settings()

    @property
    def loss_name(self) -> str:
        """The training loss as the curves name it (a VAE adds its KL term)."""
        variational = hasattr(self.trainer.model, "moments")
        return f"{self.loss.title} + weighted KL" if variational else self.loss.title

    def weights(self):
        """Where evaluation, figures and export read the model: inside, the EMA weights when
        --ema_decay is on (unless --ema=false), the model's own otherwise."""
        import contextlib

        return self.trainer.ema_weights() if self.uses_ema else contextlib.nullcontext()

    def evaluate(self, step: int, writer: str = "eval") -> dict[str, float]:
        """Metrics over the whole eval split, written to TensorBoard (run `writer`) with an
        image grid."""
        with self.weights():
            return self._evaluate(step, writer)

    def _evaluate(self, step: int, writer: str = "eval") -> dict[str, float]:
        cfg = self.config
        if getattr(self, "_eval_data", None) is None:  # built once: each evaluation iterates it
            self._eval_data = self.strategy.distribute_datasets_from_function(
                lambda ctx: data.eval_dataset(self.eval_split, cfg.eval_batch, ctx,
                                              cfg.noise_factor, cfg.seed,
                                              skip_bad=cfg.bad_images == "skip"))
        try:
            results = self.trainer.evaluate(self._eval_data)
        except tf.errors.ResourceExhaustedError as e:
            raise OutOfMemoryError(
                f"out of memory evaluating at step {step} ({op_error_reason(e)}): lower "
                f"--eval_batch_size (now {cfg.eval_batch}; the metrics do not depend on it)"
            ) from None
        logging.info(format_line(f"eval ({self.weights_name})" if self.weights_name else "eval",
                                 step=step, **results))
        self.summaries.scalars(writer, step, results)
        rows, labels = self.examples()
        self.summaries.image_rows(writer, step, "reconstructions", rows,
                                  "rows, top to bottom: " + ", ".join(labels))
        self.summaries.flush()
        return results

    def shown(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """`k` (at most MAX_FIGURE_EXAMPLES) eval examples (uint8) spread evenly over the
        eval split, and their labels: every class of a folder's split, not its first
        (`data.spread`). The figures' largest sample is decoded once and kept; a smaller
        one is spread over it."""
        if getattr(self, "_shown", None) is None:
            self._shown = self.eval_split.examples(
                data.spread(self.eval_split.num_examples, MAX_FIGURE_EXAMPLES))
        images, labels = self._shown
        index = data.spread(len(images), k)
        return images[index], (labels[index] if labels is not None else None)

    def examples(self) -> tuple[list[np.ndarray], list[str]]:
        """Rows of `num_images` eval examples, in [0, 1], and their names: inputs
        and reconstructions; noisy inputs, denoised and clean images for a denoiser."""
        cfg = self.config
        raw = self.shown(cfg.num_images)[0]
        clean = data.to_float(raw).numpy()
        if not cfg.noise_factor:
            return [clean, self.reconstruct(clean)], ["input", "reconstruction"]
        noisy = data.noisy_copy(raw, cfg.noise_factor, cfg.seed)
        return [noisy, self.reconstruct(noisy), clean], ["noisy input", "denoised", "clean"]

    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """The model's reconstructions of float `images`, float32 in [0, 1], through one
        traced function: the eager Keras call it replaces took ~30 ms, at every evaluation."""
        if getattr(self, "_reconstruct", None) is None:
            model = self.trainer.model
            self._reconstruct = tf.function(lambda x: model.reconstruct(x, training=False))
        return np.asarray(self._reconstruct(tf.constant(images, tf.float32)), np.float32)

    def figures(self, step: int, out_dir: str, curves: bool = True) -> list[str]:
        """Writes every figure into `out_dir`; returns their paths."""
        with self.weights():
            return self._figures(step, out_dir, curves)

    def _figures(self, step: int, out_dir: str, curves: bool = True) -> list[str]:
        cfg, model = self.config, self.trainer.model
        where = f"{cfg.model} on {cfg.dataset} {cfg.eval_split}, step {step}" + (
            f" ({self.weights_name})" if self.weights_name else "")
        out = os.path.join(out_dir, "{}")
        rows, labels = self.examples()
        paths = [plots.reconstruction_grid(out.format(FIGURES["reconstructions"]), rows, labels,
                                           where)]
        variational = hasattr(model, "moments")
        if curves:
            # A continuous evaluation of another folder's run draws that run's training.
            trained = watched_run(cfg) if cfg.mode == "continuous_eval" else cfg.model_dir
            train_curve = summaries_lib.read_scalars(os.path.join(trained, "train"), "loss")
            eval_curve = summaries_lib.read_scalars(os.path.join(cfg.model_dir, "eval"), "loss")
            named = summaries_lib.read_texts(os.path.join(trained, "train"), LOSS_TAG)
            if train_curve or eval_curve:
                paths.append(plots.training_curves(
                    out.format(FIGURES["curves"]), train_curve, eval_curve,
                    f"{cfg.model} on {cfg.dataset}", self.loss_name, named))
        sample_raw, labels = self.shown(MAX_FIGURE_EXAMPLES)
        sample = data.to_float(sample_raw)
        codes = np.concatenate([np.asarray(model.encode(sample[i:i + 500], training=False),
                                           np.float32) for i in range(0, len(sample), 500)])
        if not np.isfinite(codes).all():
            logging.warning("the codes contain NaN/Inf: skipping the latent-space and "
                            "interpolation figures")
            return paths
        if labels is not None and len(codes) >= 3:
            paths.append(plots.latent_space(
                out.format(FIGURES["latent"]), codes, labels,
                f"codes of {len(codes)} images (PCA), {where}",
                tuple(getattr(self.eval_split, "class_names", ()) or ())))
        a, b = plots.interpolation_pair(labels, len(codes))
        line = plots.interpolate(codes[a], codes[b], 8)
        decoded = np.asarray(model.decode(line.reshape(-1, *self.code_shape), training=False))
        clean = rows[-1] if cfg.noise_factor else rows[0]
        strip = np.concatenate([clean[:1], decoded, sample[b:b + 1].numpy()])
        paths.append(plots.interpolation_strip(
            out.format(FIGURES["interpolation"]), strip,
            f"decoding along the line between two images' codes, {where}"))
        if variational:
            prior = np.random.default_rng(cfg.seed).standard_normal(
                (2 * cfg.num_images, model.latent_dim)).astype(np.float32)
            samples = np.asarray(model.decode(prior, training=False))
            paths.append(plots.reconstruction_grid(
                out.format(FIGURES["samples"]), [samples[: cfg.num_images], samples[cfg.num_images:]],
                ["sample", "sample"], f"decoded from z ~ N(0, I), {where}"))
        logging.info("wrote %s", ", ".join(paths))
        return paths


def _warn_if_the_schedule_moved(saved: dict, schedule: schedules.Multiplier,
                                learning_rate: float, start: int) -> None:
    """A resume whose schedule gives another rate at its first step than the run's did:
    most often a cosine or linear schedule stretched by a longer --train_steps or
    --epochs (they span the run), so the rate jumps (a warm restart), silently."""
    before = schedules.from_saved(saved)
    if before is None:
        return
    was, now = float(before(start)), float(schedule(start))
    if abs(was - now) <= 0.01 * max(abs(was), abs(now)):
        return
    base = saved["learning_rate"]
    logging.warning(
        "resuming at step %d with another learning-rate schedule: the run's (%s) was at %.4g "
        "here, this one (%s) is at %.4g, so the rate jumps at this step%s", start,
        before.describe(base), base * was, schedule.describe(learning_rate),
        learning_rate * now, " (a cosine or linear schedule spans --train_steps or --epochs: "
        "a longer run stretches it)" if before.total_steps != schedule.total_steps
        and schedule.kind in ("cosine", "linear") else "")


def _warn_of_a_schedule_past_the_end(schedule: schedules.Multiplier, total: int) -> None:
    """A warm-up, or piecewise boundaries, at or after the run's last step: most often a
    recipe's run cut short (--train_steps=10 to try it), or steps taken for epochs."""
    if schedule.warmup_steps >= total:
        after = (f", and the {schedule.kind} schedule after it never starts"
                 if schedule.kind in ("cosine", "linear") else "")
        logging.warning("--warmup_steps=%d reaches past the run's %d steps: the rate only ramps "
                        "up, to %.0f%% of --learning_rate at the last step%s",
                        schedule.warmup_steps, total, 100 * total / schedule.warmup_steps, after)
    late = [b for b in schedule.boundaries if b >= total]
    if schedule.kind == "piecewise" and late:
        logging.warning("--lr_boundaries %s come at or after the run's last step (%d): the rate "
                        "never changes there", ",".join(map(str, late)), total)


def _eval_data(cfg: Config, data_dir: str | None) -> str:
    """What a best is judged on: the evaluated data ('folder /data/photos train[90%:]')."""
    return " ".join(str(v) for v in (cfg.dataset, data_dir, cfg.eval_split, cfg.image_feature
                                     and f"--image_feature={cfg.image_feature}") if v)


# --------------------------------------------------------------------- modes
def train(run: Run) -> dict:
    """Trains (and evaluates, in train_and_eval) to the configured step; returns the
    final step, the logged history, every evaluation's metrics and, when the final step
    was evaluated, its metrics (as --mode=eval returns them)."""
    cfg = run.config
    start = run.checkpointer.restore()
    steps_per_epoch = run.train_split.num_examples // cfg.step_batch
    total = cfg.train_steps or cfg.epochs * steps_per_epoch
    saved = checkpoints.saved_config(cfg.model_dir) if start else None
    if saved and saved.get("learning_rate") != cfg.learning_rate:
        run.trainer.set_learning_rate(cfg.learning_rate)  # the flag wins over the checkpoint
    base = run.trainer.base_learning_rate if start else cfg.learning_rate
    # --reduce_lr_patience and NaN rollbacks lower the checkpointed base rate.
    lowered = (f" (the run's --learning_rate={cfg.learning_rate:g}, lowered by "
               "--reduce_lr_patience or NaN rollbacks before step "
               f"{start})" if abs(base - cfg.learning_rate) > 1e-6 * cfg.learning_rate else "")
    logging.info("learning rate: %s%s", run.schedule.describe(base), lowered)
    _warn_of_a_schedule_past_the_end(run.schedule, total)
    if start:
        logging.info("resuming from step %d towards %d", start, total)
        if saved:
            _warn_if_the_schedule_moved(saved, run.schedule, cfg.learning_rate, start)
        before = saved and saved.get("batch_size", cfg.batch_size) * saved.get("grad_accum_steps", 1)
        if before and before != cfg.step_batch:
            # The data's position is the step times the examples a step (stateless, as
            # big_vision's): a new batch size moves it.
            logging.warning(
                "resuming with %d examples a step where the run had %d: the data order goes "
                "on from step %d, which is example %s of the epochs' order at %d a step and was "
                "%s at %d, so %s examples of it are %s; the epoch column and --epochs count "
                "steps of %d from here. Resume with --batch_size=%d%s for the run's own order",
                cfg.step_batch, before, start, f"{start * cfg.step_batch:,}", cfg.step_batch,
                f"{start * before:,}", before, f"{abs(start * (cfg.step_batch - before)):,}",
                "skipped" if cfg.step_batch > before else "read again", cfg.step_batch,
                saved.get("batch_size"), f" --grad_accum_steps={saved['grad_accum_steps']}"
                if saved.get("grad_accum_steps", 1) > 1 else "")
        had = saved and saved.get("resolved_train_examples")
        if had and had != run.train_split.num_examples:
            # A folder's files added or removed: the epochs are drawn over the new set.
            logging.warning(
                "resuming on %s training examples where the run had %s (files added or "
                "removed?): the epochs' order is drawn anew over them, so the rest of this "
                "epoch reads a random share of them, and the epoch column and --epochs count "
                "epochs of %s from here", f"{run.train_split.num_examples:,}", f"{had:,}",
                f"{run.train_split.num_examples:,}")
    if run.is_chief:
        # The step a continuous evaluation beside this run stops after.
        run.run_config["resolved_total_steps"] = total
        run.run_config["resolved_train_examples"] = run.train_split.num_examples
        checkpoints.write_config(cfg.model_dir, run.run_config)
        run.summaries.run_header(run.run_config, start)
        run.summaries.restart(start, ("train", "eval") if cfg.mode == "train_and_eval" else ("train",))
        # What train/loss and eval/loss are from this step on (a resume may change --loss).
        run.summaries.text("train", start, LOSS_TAG, run.loss_name)
        if cfg.augmentations:  # what the step's augmentation does, to look at once
            clean = data.to_float(run.train_split.examples(
                data.spread(run.train_split.num_examples, cfg.num_images))[0])
            shown = augment.augment(clean, cfg.augmentations, tf.constant([cfg.seed, -1],
                                                                          tf.int64))
            run.summaries.image_rows(
                "train", start, "augmented", [clean.numpy(), shown.numpy()],
                description=f"--augment={cfg.augment}: training images (top) as the training "
                            "step augments them (below), with draws of their own")

    def make_iterator(step):
        if run.trainer.device_data is not None:
            return None
        return iter(run.strategy.distribute_datasets_from_function(
            lambda ctx: data.train_dataset(run.train_split, cfg.step_batch, cfg.seed, step, ctx,
                                           skip_bad=cfg.bad_images == "skip",
                                           service=cfg.tf_data_service)))

    cadence = Cadence(
        log_every=cfg.log_every, summary_every=cfg.summary_every,
        histogram_every=cfg.histogram_every, eval_every=cfg.eval_every,
        checkpoint_every_steps=cfg.checkpoint_every_steps,
        checkpoint_every_secs=cfg.checkpoint_every_secs,
        profile_steps=tuple(cfg.profile_steps) if cfg.profile_steps else None,
        nan_policy=cfg.nan_policy, nan_max_retries=cfg.nan_max_retries,
        nan_lr_factor=cfg.nan_lr_factor, keep_best=cfg.keep_best,
        best_higher=bool(cfg.keep_best and config_lib.BEST_METRICS[cfg.keep_best]),
        early_stopping_patience=cfg.early_stopping_patience,
        reduce_lr_patience=cfg.reduce_lr_patience, reduce_lr_factor=cfg.reduce_lr_factor,
        reduce_lr_min=cfg.reduce_lr_min, min_delta=cfg.min_delta, loss=run.loss.title,
        eval_data=_eval_data(cfg, cfg.data_dir),
        eval_data_moved_from=run.data_moved_from and _eval_data(cfg, run.data_moved_from),
        eval_inputs=f"--resize={cfg.resize} --noise_factor={cfg.noise_factor:g}",
        eval_examples=run.eval_split.num_examples if run.eval_split is not None else 0)
    if cfg.mode == "train_and_eval" and 0 < cfg.early_stopping_patience <= cfg.reduce_lr_patience:
        logging.warning("--early_stopping_patience=%d stops the run before "
                        "--reduce_lr_patience=%d lowers the rate: give early stopping more "
                        "evaluations", cfg.early_stopping_patience, cfg.reduce_lr_patience)
    if cadence.profile_steps and cadence.profile_steps[0] >= total:
        logging.warning("--profile_steps=%d,%d starts after the run's last step (%d): no trace "
                        "will be written", *cadence.profile_steps, total)

    with signals.StopSignals() as stop:
        controller = Controller(
            run.trainer, make_iterator, total, steps_per_epoch, cfg.steps_per_loop, cadence,
            run.evaluate if cfg.mode == "train_and_eval" else None, run.checkpointer,
            run.summaries, profile_dir=os.path.join(run.output_dir, "train"),
            train_actions=run.train_actions, eval_actions=run.eval_actions,
            stop_requested=distribute.AgreedStop(run.strategy, stop),
            data_error=functools.partial(_data_error, run))
        workers = distribute.num_workers(run.strategy)
        try:
            step = controller.train()
        except distribute.LOST_WORKER_ERRORS as e:
            if workers < 2:
                raise
            raise _lost_worker(run, e) from None
        except TapeloopError as e:  # this worker's own failure: the others stop too (exit 8)
            if workers >= 2 and not isinstance(e, Preempted):  # a stop is agreed by all
                e.args = (f"{e}; this was one worker of {workers}, and the others stop too: "
                          "start every worker again, all with the same flags",)
            raise
    if run.is_chief and step < total:
        # Ended before its last step (early stopping, an action's True): no checkpoint will
        # follow, so a continuous evaluation beside it ends here, not at its timeout.
        run.run_config["resolved_stopped_early_at"] = step
        checkpoints.write_config(cfg.model_dir, run.run_config)
    signals.interruption_point()
    if run.is_chief:
        run.figures(step, cfg.model_dir)
    evaluations = controller.evaluations
    last = evaluations[-1] if evaluations and evaluations[-1]["step"] == step else {}
    return {**last, "step": step, "history": controller.history, "evaluations": evaluations}


def _refuse_another_runs_results(config: Config, run_dir: str) -> None:
    """Eval, export and continuous_eval of another run's checkpoint (of the run in `run_dir`)
    into a --model_dir that holds a run of its own, or results of a third run, would put
    them among those, under their names (eval/, eval_ckpt-N/, export/N/, which TF Serving
    would serve as the newest; at the same step, replacing them): refused."""
    if config_lib.inside(run_dir, config.model_dir):
        return
    what = {"export": "export", "continuous_eval": "evaluations"}.get(config.mode, "evaluation")
    these = f"{'these' if what == 'evaluations' else 'this'} {what}"
    given = f"the {what} of --checkpoint={config.checkpoint}, another run's,"
    if checkpoints.checkpoints_on_disk(config.model_dir):
        raise ConfigError(f"--model_dir={config.model_dir} holds a run of its own: {given} "
                          f"would go in among its own: give {these} a folder of its own")
    held = _another_runs_results(config.model_dir, run_dir)
    if held:
        raise ConfigError(f"--model_dir={config.model_dir} holds results of the run {held[0]} "
                          f"(its {held[1]}): {given} would go in among them: give {these} a "
                          "folder of its own")


def _another_runs_results(model_dir: str, run_dir: str) -> tuple[str, str] | None:
    """(the run, where) of results in `model_dir` of a checkpoint not of `run_dir`'s run."""
    for checkpoint, where in _results_held(model_dir):
        other = checkpoints.run_of(checkpoint)
        if not config_lib.same_folder(other, run_dir):
            return other, where
    return None


def _results_held(model_dir: str) -> list[tuple[str, str]]:
    """(checkpoint, where) of each evaluation's and export's results in `model_dir`: the
    checkpoint its eval_results.json or its export's record names (older exports, without
    one, are not told), and the folder or file that holds them."""
    from core.export import RECORD as export_record

    held = []
    for pattern in ("eval_results.json", "eval*/eval_results.json",
                    f"export*/*/assets.extra/{export_record}"):
        for path in sorted(tf.io.gfile.glob(os.path.join(model_dir, pattern))):
            try:
                checkpoint = json.loads(tf.io.gfile.GFile(path).read()).get("checkpoint")
            except (tf.errors.OpError, ValueError, AttributeError):
                continue  # not a record of tapeloop's: nothing to tell
            if isinstance(checkpoint, str):
                folder = os.path.dirname(os.path.relpath(path, model_dir))
                folder = folder.split("/assets.extra")[0]
                held.append((checkpoint, f"{folder}/" if folder else "eval_results.json"))
    return held


def _recorded(path: str) -> str:
    """A checkpoint's path as results record it: absolute, so that a command run from
    another directory tells the same run."""
    return path if "://" in path else os.path.abspath(path)


def _results_elsewhere(config: Config, checkpoint_path: str | None) -> tuple[str, str]:
    """(the mode's verb, the flags that read the model dir's checkpoint and write the
    results into a folder of the user's own), for eval, export and continuous_eval of a run
    in a folder they cannot write to or that a training run holds; ("", "") otherwise. Without
    --checkpoint, the run's folder: its latest checkpoint when the command runs, which a
    training run's rotation cannot delete from under it."""
    verb = {"eval": "evaluate", "export": "export", "continuous_eval": "evaluate"}.get(
        config.mode, "")
    if not (verb and checkpoint_path
            and os.path.dirname(checkpoint_path) == config.model_dir.rstrip("/")):
        return "", ""
    if config.mode == "continuous_eval":
        return verb, (f"--checkpoint={config.model_dir} --model_dir=YOUR_FOLDER evaluates each "
                      "new checkpoint of it into your folder")
    target, which = ((checkpoint_path, "that") if config.checkpoint and not
                     config_lib.same_folder(config.checkpoint, config.model_dir) else
                     (config.model_dir, "its latest"))
    return verb, (f"--checkpoint={target} --model_dir=YOUR_FOLDER reads {which} checkpoint and "
                  "writes into your folder")


def _worker_dir(model_dir: str, task: str) -> str:
    """A non-chief worker's local dir for the checkpoints and summaries it throws away (Run.close
    removes it). One per model dir and task, so that the dir of a worker killed before it
    could remove it (SIGKILL, a lost machine: a checkpoint of the whole model) is removed
    when that worker starts again, instead of staying in /tmp for good."""
    key = hashlib.sha256(model_dir.encode()).hexdigest()[:12]
    user = f"{os.getuid()}-" if hasattr(os, "getuid") else ""  # no other user's dir in the way
    path = os.path.join(tempfile.gettempdir(), f"tapeloop-{task}-{user}{key}")
    try:
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                logging.info("removed %s, which an earlier run of this worker left", path)
            else:  # removed, never followed
                os.unlink(path)
                logging.info("removed %s, a symlink or file in the way of this worker's dir",
                             path)
        os.mkdir(path, 0o700)  # fails, rather than writes into it, if another process made it
    except OSError as e:
        raise WriteError(f"this worker's temporary dir {path}", e.strerror or str(e),
                         "remove it, or set TMPDIR to a folder of your own, then start every "
                         "worker again") from e
    logging.info("this worker's checkpoints and summaries go to %s, removed at the end", path)
    return path


def _lost_worker_at_start(error: Exception) -> LostWorkerError:
    """The one line for a multi-worker run whose partner stopped before training (its own
    bad data, say): this worker's first collective aborted."""
    return LostWorkerError(
        f"lost another worker of the cluster before training ({op_error_reason(error)}): it "
        "stopped or cannot be reached, and its own log says why; fix that, then start every "
        "worker again with the same command")


def _lost_worker(run: Run, error: Exception) -> LostWorkerError:
    """The one line for a multi-worker run whose partner died (its collectives aborted):
    what remains is the chief's latest checkpoint, in the model dir."""
    try:
        state = checkpoints.read_state(run.config.model_dir)
        where = (f"the chief's latest checkpoint, {state.model_checkpoint_path}" if state else
                 "step 0 (the chief has saved no checkpoint yet)")
    except (CheckpointError, OSError, tf.errors.OpError):  # the model dir is lost too
        where = f"the chief's latest checkpoint in {run.config.model_dir}"
    return LostWorkerError(
        f"lost another worker of the cluster in training ({op_error_reason(error)}): it "
        "stopped or cannot be reached, and its own log says why; the steps after the last "
        "checkpoint are lost. Fix that, then start every worker again with the same command "
        f"to resume from {where}")


def _data_error(run: Run, step: int, error: Exception, saved: str) -> DataError:
    """The one-line error for an input that failed mid-run, naming the file where it can."""
    cfg, source = run.config, run.train_split
    reason = op_error_reason(error)
    where = (f"a file of {source.name}" if source.kind == "folder"
             else f"a record of {source.name}'s shards") + f" ({reason})"
    if hasattr(source, "find_bad"):
        steps_per_epoch = source.num_examples // cfg.step_batch
        epoch, k = divmod(step, steps_per_epoch)
        order = data.epoch_permutation(source.num_examples, cfg.seed, epoch).numpy()
        found = source.find_bad(order[k * cfg.step_batch:(k + 1) * cfg.step_batch])
        if found:
            where = f"{found[0]} ({found[1]})"
    return DataError(f"{where} failed to load at step {step}; saved {saved}: replace or remove "
                     "it and run the same command to resume, or pass --bad_images=skip")


def evaluate(run: Run) -> dict:
    """Evaluates one checkpoint. The latest, on the run's own eval split, goes to the run's
    `eval/` curves and figures; a chosen `--checkpoint`, or other data (another --dataset,
    --data_dir or --eval_split), other weights (`--noema` of a run that evaluated its
    average) or other settings (SETTINGS_APART) to a TensorBoard run of its
    own, `eval_ckpt-N/`, `eval_DATA/`, `eval_noema/`, `eval_noise_factor-0.8/` or a
    combination (`eval_ckpt-N_noema_DATA/`, with its results and figures), so the training
    run's curves are never rewritten nor mixed with other data's, weights' or settings'."""
    results, _ = _evaluate_checkpoint(run, run.checkpoint_path,
                                      chosen=run.config.checkpoint is not None)
    return results  # one evaluation: an action's True has nothing to stop


def other_data_name(config: Config, saved: dict | None) -> str | None:
    """A folder-safe name of the evaluated data ('folder-photos-test') when it is not the
    trained run's eval split (by config.json), else None."""
    saved = saved or {}
    fields = ("dataset", "data_dir", "eval_split")
    if all(saved.get(f) is None or getattr(config, f) == saved[f] for f in fields):
        return None
    where = os.path.basename(config.data_dir.rstrip("/")) if config.data_dir else ""
    name = "-".join(p for p in (config.dataset, where, config.eval_split) if p)
    return _folder_safe(name)


def _folder_safe(name: str) -> str:
    """'folder-photos-test[:90%]' -> 'folder-photos-test-90': a TensorBoard run's name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-")


def _evaluate_checkpoint(run: Run, path: str, chosen: bool) -> tuple[dict, str | None]:
    """Evaluates `path`; returns ({'step': ..., **metrics}, the eval action that asked to
    stop or None)."""
    cfg = run.config
    step = run.restore(path)
    other = other_data_name(cfg, run.saved)
    names = run.apart()
    writer = "_".join(["eval"] + ([os.path.basename(path)] if chosen else []) + names
                      + ([other] if other else []))
    apart = writer != "eval"
    if names:
        what = ("weights and settings" if run.other_weights and names[1:] else
                "weights" if run.other_weights else "settings")
        logging.info("evaluating other %s than the run's evaluations (%s): results in %s/",
                     what, ", ".join(names), os.path.join(cfg.model_dir, writer))
    if other:
        logging.info("evaluating other data than the run's (%s %s): results in %s/", cfg.dataset,
                     cfg.eval_split, os.path.join(cfg.model_dir, writer))
    out_dir = os.path.join(cfg.model_dir, writer) if apart else cfg.model_dir
    signals.interruption_point()
    results = run.evaluate(step, writer)
    if run.is_chief:
        tf.io.gfile.makedirs(out_dir)
        process.write_file(os.path.join(out_dir, "eval_results.json"), json.dumps(
            {"step": step, "split": cfg.eval_split, "dataset": cfg.dataset,
             "data_dir": cfg.data_dir, "checkpoint": _recorded(path), **results}, indent=2))
        signals.interruption_point()  # eval_results.json is written: the figures are not
        run.figures(step, out_dir, curves=not apart)
    asked = run.eval_actions(step, results)  # after the results are written: it cannot lose them
    return {"step": step, **results}, asked


POLL_SECS = 1.0  # how often a continuous evaluation looks for a new checkpoint


def _latest_checkpoint(model_dir: str) -> str | None:
    state = checkpoints.read_state(model_dir) if tf.io.gfile.isdir(model_dir) else None
    return state.model_checkpoint_path if state else None


def watched_run(config: Config) -> str:
    """The run folder --mode=continuous_eval watches: --model_dir, or --checkpoint=RUN_DIR,
    whose checkpoints it evaluates into --model_dir (a run you cannot write to)."""
    return config.checkpoint.rstrip("/") if config.checkpoint else config.model_dir


def wait_for_checkpoint(config: Config) -> None:
    """--mode=continuous_eval started before the training run's first checkpoint: checks
    what it watches, then waits for it, up to --continuous_eval_timeout."""
    deadline = time.monotonic() + config.continuous_eval_timeout
    watched = watched_run(config)
    if config.checkpoint:
        if tf.io.gfile.exists(watched) and not tf.io.gfile.isdir(watched):
            raise ConfigError(config_lib.continuous_eval_of_one(config.checkpoint))
        _refuse_another_runs_results(config, watched)
    flag = "--checkpoint" if config.checkpoint else "--model_dir"
    if _latest_checkpoint(watched) is None:
        held = None if config.checkpoint else _another_runs_results(watched, watched)
        if held:  # a folder of your own, where no run trains (one would be refused there)
            raise ConfigError(f"--model_dir={watched} holds results of the run {held[0]} (its "
                              f"{held[1]}), not a run of its own: --checkpoint={held[0]} "
                              f"--model_dir={watched} evaluates each new checkpoint of it "
                              "into it")
        logging.info("waiting for the first checkpoint in %s (up to %s s, "
                     "--continuous_eval_timeout)", watched,
                     f"{config.continuous_eval_timeout:g}")
    while _latest_checkpoint(watched) is None:
        if time.monotonic() >= deadline:
            raise ConfigError(f"--mode=continuous_eval found no checkpoint in {flag}="
                              f"{watched} within --continuous_eval_timeout="
                              f"{config.continuous_eval_timeout:g} s: start the training run, or "
                              "raise the timeout")
        time.sleep(POLL_SECS)
        signals.interruption_point()


def continuous_evaluate(run: Run) -> dict:
    """Evaluates each new checkpoint of a run that trains in another process (or on other
    machines: Orbit's `evaluate_continuously`, Keras' `SidecarEvaluator`), as `--mode=eval`
    evaluates the latest, into the run's `eval/` curves and figures; never writes or
    deletes a checkpoint. It always takes the newest (one evaluated while two newer
    appeared skips the middle one), stops after the training's last step (config.json's
    `resolved_total_steps`), or after --continuous_eval_timeout seconds without a new
    checkpoint; a run that ended before its last step (early stopping, an action's True)
    records the step it ended at (`resolved_stopped_early_at`), which ends the evaluation there."""
    cfg = run.config
    watched = watched_run(cfg)
    apart = run.apart() or other_data_name(cfg, run.saved)
    if not config_lib.same_folder(watched, cfg.model_dir):
        logging.info("continuous eval: each new checkpoint of %s, into %s", watched,
                     cfg.model_dir)
    elif (run.saved or {}).get("mode") == "train_and_eval" and not apart:
        logging.warning("%s was trained with --mode=train_and_eval, which evaluates too: both "
                        "write its eval/ curve; train with --mode=train beside a continuous "
                        "evaluation", cfg.model_dir)
    evaluated, results, deadline = None, None, time.monotonic() + cfg.continuous_eval_timeout
    evaluations = []  # every checkpoint's results, returned with the last one's
    while True:
        saved = checkpoints.saved_config(watched) or {}
        stopped = saved.get("resolved_stopped_early_at")
        last = stopped or saved.get("resolved_total_steps")
        if results and last and results["step"] >= last:
            logging.info("continuous eval: evaluated step %d, %s: done", results["step"],
                         "where the training stopped early" if stopped else "the training's last")
            return results
        latest = _latest_checkpoint(watched)
        if latest and latest != evaluated:
            try:
                results, asked = _evaluate_checkpoint(run, latest, chosen=False)
                evaluations.append(results)
                results = {**results, "evaluations": evaluations}
                evaluated, deadline = latest, time.monotonic() + cfg.continuous_eval_timeout
                if asked:
                    logging.info("continuous eval: %s returned True at step %d: done", asked,
                                 results["step"])
                    return results
                continue
            except CheckpointError:
                if tf.io.gfile.exists(latest + ".index"):
                    raise
                # Rotated away by the training run meanwhile: look again after a pause.
        if time.monotonic() >= deadline:
            logging.info("continuous eval: no new checkpoint for %s s "
                         "(--continuous_eval_timeout): done", f"{cfg.continuous_eval_timeout:g}")
            return results
        time.sleep(POLL_SECS)
        signals.interruption_point()


def export(run: Run) -> dict:
    """Writes a SavedModel of one checkpoint to `<model_dir>/export/<step>/` (the weights
    the run evaluated; the others, `--noema` of a run with an average, to `export_noema/`)."""
    from core.export import export_saved_model

    step = run.restore(run.checkpoint_path)
    base = "_".join(["export"] + ([run.other_weights] if run.other_weights else []))
    path = os.path.join(run.config.model_dir, base, str(step))
    signals.interruption_point()
    with run.weights():
        export_saved_model(run.trainer.model, run.image_shape, path, record={
            "checkpoint": _recorded(run.checkpoint_path), "step": step,
            "weights": "ema" if run.uses_ema else "raw"})
    logging.info("exported SavedModel%s with signatures encode, decode, reconstruct to %s",
                 f" of the {run.weights_name}" if run.weights_name else "", path)
    return {"step": step, "export_dir": path}


MODES = {"train": train, "train_and_eval": train, "eval": evaluate, "export": export,
         "continuous_eval": continuous_evaluate}


def _model_dir_of_the_checkpoint(config: Config, given: Collection[str] | None) -> Config:
    """Eval, export or continuous_eval of `--checkpoint=PATH` with no --model_dir: the
    results go into the checkpoint's run (as `--model_dir=RUN --checkpoint=ckpt-N` would
    put them), not into Config's default model dir, the default training run's folder.
    A name of --model_dir's (`ckpt-936`, `best`), which is no path here, is left to it."""
    if (config.mode not in ("eval", "export", "continuous_eval") or not config.checkpoint
            or config.checkpoint == "best"):
        return config
    if "model_dir" in given if given is not None else (
            config.model_dir != Config.__dataclass_fields__["model_dir"].default):
        return config
    if config.mode == "continuous_eval":
        run_dir = watched_run(config)
    else:
        try:
            run_dir = checkpoints.run_of(checkpoints.resolve_path(config.checkpoint))
        except (ConfigError, tf.errors.OpError):
            return config  # not a path here: a name of --model_dir's, or its error later
    logging.info("no --model_dir given: the %s goes into the checkpoint's run, %s "
                 "(--model_dir=YOUR_FOLDER puts it in a folder of your own)",
                 "export" if config.mode == "export" else "evaluation", run_dir)
    return config.replace(model_dir=run_dir)


def run(config: Config, given: Collection[str] | None = None,
        train_actions: Sequence[actions_lib.Action] = (),
        eval_actions: Sequence[actions_lib.Action] = ()) -> dict:
    """Runs `config.mode`; returns {'step': ..., **metrics, ...}: in training, the final
    step's metrics when it was evaluated, the log lines' `history` and every evaluation's
    metrics (`evaluations`); in continuous_eval, the last checkpoint's metrics and every
    checkpoint's (`evaluations`); in export, the `export_dir`.

    Args:
      config: the run's configuration.
      given: the Config fields the user set explicitly: eval and export take every other
        model and data setting from the trained run's config.json. None: the fields
        that differ from Config's defaults.
      train_actions, eval_actions: functions called as f(step, metrics) with the train
        summaries and after every evaluation, after those `config` names
        (core/actions.py).
    """
    from core.sources import reachable, utf8_names

    core.one_copy_of_tensorflow_logs()
    for flag, path in (("--model_dir", config.model_dir), ("--data_dir", config.data_dir),
                       ("--init_checkpoint", config.init_checkpoint),
                       ("--checkpoint", config.checkpoint if config.checkpoint != "best" else None),
                       ("--cache", config.cache if config.cache not in ("none", "memory") else None)):
        reachable(path, flag)
    config = _model_dir_of_the_checkpoint(config, given)  # on --checkpoint's file system
    # From Python (a notebook), Ctrl-C outside training interrupts at a safe point only.
    with signals.deferred_interrupt(), utf8_names(config.model_dir, "--model_dir"):
        if config.mode == "continuous_eval":
            wait_for_checkpoint(config)
        the_run = Run(config, given, train_actions, eval_actions)
        try:
            return MODES[the_run.config.mode](the_run)
        finally:
            the_run.close()

