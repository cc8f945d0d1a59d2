#!/usr/bin/env python3
r"""Train, evaluate or export a convolutional autoencoder.

    python train.py                                   # fontdigits, seed model, offline
    python train.py --flagfile=configs/mnist_local.cfg --data_dir=PATH/TO/mnist
    python train.py --dataset=mnist --data_dir=PATH/TO/mnist --model_dir=runs/mnist-test \
        --train_split='test[:8000]' --eval_split='test[8000:]'
    python train.py --mode=eval --model_dir=runs/default      # the run's own settings

Flags become one validated, frozen `core.Config`; everything else lives in
`core/` and `layers/`, which never read flags.
"""

import contextlib
import dataclasses
import gc
import importlib.util
import logging as std_logging
import os
import sys

import core  # imports no TensorFlow

core.quiet_tensorflow()
core.prefer_onednn()

from absl import app, flags, logging  # noqa: E402

from core import config as config_lib  # noqa: E402
from core import errors  # noqa: E402

FLAGS = flags.FLAGS
# Defaults live in one place, the dataclass; read them without building (and so
# validating) a Config, which keeps --help fast.
_D = type("Defaults", (), {f.name: f.default for f in dataclasses.fields(config_lib.Config)})

flags.DEFINE_enum("mode", _D.mode, config_lib.MODES, "What to run; continuous_eval: evaluate "
                  "each new checkpoint of a run training elsewhere (--mode=train), as it appears.")
flags.DEFINE_string("model_dir", _D.model_dir, "Checkpoints, TensorBoard events and figures go here; "
                    "rerunning with the same folder resumes. Eval, export and continuous_eval "
                    "of a --checkpoint path without it: the checkpoint's run.")
flags.DEFINE_string("dataset", _D.dataset, f"One of: {', '.join(config_lib.DATASETS)}, or "
                    "tfds:NAME[/CONFIG] (TensorFlow Datasets; pip install -e .[tfds]); folder "
                    "and tfrecord take their path in --data_dir.")
flags.DEFINE_string("data_dir", None, "folder: your images; tfrecord: the shards (a folder or a "
                    "pattern); mnist/fashion_mnist: local IDX .gz files or mnist.npz (default: "
                    "download into Keras' cache). gs:// and other TensorFlow filesystems work.")
flags.DEFINE_string("train_split", None, "Training split, TFDS-style slices allowed: 'train', "
                    "'test[:8000]', 'train[:90%]' (default: train; a folder without a held-out "
                    "subfolder and a TFDS dataset with only train: train[:90%]).")
flags.DEFINE_string("eval_split", None, "Evaluation split, e.g. 'test', 'test[8000:]' (default: "
                    "test, else validation, val or valid; a folder without a held-out subfolder and "
                    "a TFDS dataset with only train: train[90%:]).")
flags.DEFINE_list("image_size", None, "HEIGHT,WIDTH every image is resized to, or one number "
                  "for a square (default: the first image's size; required over 512 px).")
flags.DEFINE_integer("channels", None, "1 (greyscale) or 3 (RGB); default: 1 if a folder's "
                     "images are all greyscale (shards: the first image's), else 3.")
flags.DEFINE_enum("resize", _D.resize, config_lib.RESIZE_MODES, "How images of another size "
                  "or shape are fitted: crop (scale the short side, centre-crop), pad, stretch.")
flags.DEFINE_enum("bad_images", _D.bad_images, config_lib.BAD_IMAGES, "Undecodable files: error "
                  "(stop, exit 3) or skip (log them to <model_dir>/skipped_images.txt).")
flags.DEFINE_string("image_feature", None, "--dataset=tfrecord or tfds:NAME: the feature "
                    "that holds the image, as an encoded file or uint8 pixels (default: "
                    "image/encoded, else the one feature that holds an image; TFDS: image, else "
                    "the one Image feature), e.g. segmentation_mask.")
flags.DEFINE_string("tf_data_service", None, "grpc://HOST:PORT of a tf.data service dispatcher: "
                    "file reading and decoding run on its workers (README, Datasets).")
flags.DEFINE_string("cache", _D.cache, "none; memory: decode a file dataset once and keep the "
                    "uint8 images in host memory; a folder: decode it once into TFRecord shards "
                    "there (at the output size) and stream from them.")
flags.DEFINE_bool("verify_checksums", _D.verify_checksums,
                  "Check known files against their published SHA-256.")
flags.DEFINE_list("synthetic_shape", list(map(str, _D.synthetic_shape)),
                  "H,W,C of --dataset=synthetic images.")
flags.DEFINE_string("model", _D.model, f"One of: {', '.join(config_lib.model_names())} "
                    "(layers/registry.py; README, Models and quality), or MODULE:FACTORY, your "
                    "own: FACTORY(image_shape) -> (encoder, decoder) (README, Your own model).")
flags.DEFINE_list("encoder_filters", None, "Override the model's encoder filters, e.g. 8,4,4.")
flags.DEFINE_list("decoder_filters", None, "Override the model's decoder filters, e.g. 4,4,8.")
flags.DEFINE_integer("kernel_size", None, "Override the model's kernel size.")
flags.DEFINE_integer("latent_dim", _D.latent_dim, "--model=vae: size of the Gaussian latent.")
flags.DEFINE_integer("blocks_per_stage", _D.blocks_per_stage,
                     "--model=resnet: residual blocks per stage.")
flags.DEFINE_integer("latent_channels", _D.latent_channels,
                     "--model=resnet: channels of the code (H/2^stages x W/2^stages x this).")
flags.DEFINE_float("kl_weight", _D.kl_weight, "--model=vae: weight of the KL term (1 = the ELBO).")
flags.DEFINE_float("noise_factor", _D.noise_factor, "Train a denoiser: Gaussian noise times this "
                   "is added to every input (clipped to [0, 1]); 0 = off.")
flags.DEFINE_string("augment", _D.augment, "Random augmentation of each training batch, "
                    "comma-separated: flip (left-right, half the images), crop (a box of 80-100% "
                    "of each side, resized back); drawn per step, so a resume repeats them.")
flags.DEFINE_string("loss", _D.loss, f"Training loss: {', '.join(config_lib.LOSSES)}, "
                    "MODULE:FUNCTION (your own: FUNCTION(targets, images) -> (N,)), or a weighted "
                    "sum such as l1+ssim (see --loss_weights).")
flags.DEFINE_list("loss_weights", None, "One weight per loss of --loss, e.g. 0.16,0.84 "
                  "(default: 1 each).")
flags.DEFINE_integer("epochs", None, f"Epochs to train (default {config_lib.DEFAULT_EPOCHS} unless "
                     "--train_steps).")
flags.DEFINE_integer("train_steps", None, "Total training steps (instead of --epochs).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size (over all replicas).")
flags.DEFINE_integer("grad_accum_steps", _D.grad_accum_steps, "Micro-batches of --batch_size "
                     "per update (gradient accumulation: an effective batch N times larger).")
flags.DEFINE_integer("eval_batch_size", None, "Examples per evaluation step (default: "
                     "--batch_size); evaluation has no gradients, so it can be larger.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "The optimizer's (base) learning rate; "
                   "--lr_schedule and --warmup_steps scale it by the step.")
flags.DEFINE_enum("optimizer", _D.optimizer, config_lib.OPTIMIZERS,
                  "adam (fused), adamw (decoupled --weight_decay, not on biases and "
                  "normalisation scales) or sgd (--momentum, --nesterov).")
flags.DEFINE_float("weight_decay", None, "--optimizer=adamw: decoupled weight decay "
                   "(default 0.004).")
flags.DEFINE_float("momentum", None, "--optimizer=sgd: momentum (default 0.9).")
flags.DEFINE_bool("nesterov", _D.nesterov, "--optimizer=sgd: Nesterov momentum.")
flags.DEFINE_float("clip_norm", None, "Clip the step's gradient to this global norm.")
flags.DEFINE_float("clip_value", None, "Clip every gradient element to [-v, v].")
flags.DEFINE_float("ema_decay", None, "Keep an exponential moving average of the weights "
                   "(e.g. 0.999), checkpointed; evaluation, figures and export use it.")
flags.DEFINE_bool("ema", _D.ema, "With --ema_decay: evaluate, draw and export the average, "
                  "and --init_checkpoint reads a source's (--noema: the raw weights).")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, config_lib.LR_SCHEDULES,
                  "Learning rate as a function of the global step (README, Schedules).")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warm-up over this many steps.")
flags.DEFINE_float("min_learning_rate", _D.min_learning_rate, "cosine, linear: the final rate.")
flags.DEFINE_float("decay_rate", None, "exponential: the factor per epoch, e.g. 0.9.")
flags.DEFINE_list("lr_boundaries", None, "piecewise: the steps where the rate changes.")
flags.DEFINE_list("lr_values", None, "piecewise: the rates, one more than the boundaries.")
flags.DEFINE_integer("seed", _D.seed, "Seed of the weight initialisation, the data order and "
                     "the draws of --noise_factor, --augment and the VAE.")
flags.DEFINE_bool("jit_compile", None, "XLA-compile the step (default: on with a GPU, off on CPU).")
flags.DEFINE_bool("eager", _D.eager, "Run the loop eagerly, for debugging (slow).")
flags.DEFINE_integer("steps_per_loop", _D.steps_per_loop, "Training steps per compiled call.")
flags.DEFINE_bool("data_on_device", _D.data_on_device,
                  "Hold the training split on each device and draw batches inside the compiled "
                  "loop (default: on with the CPU recipe, see --batch_shards).")
flags.DEFINE_integer("data_on_device_max_mb", _D.data_on_device_max_mb,
                     "Refuse --data_on_device for a training split larger than this (MB per device).")
flags.DEFINE_enum("strategy", _D.strategy, config_lib.STRATEGIES,
                  "Distribution strategy; auto: mirrored over several GPUs, one_device on one, "
                  "default on a CPU, and in training multi_worker where TF_CONFIG names a "
                  "cluster of several training tasks.")
flags.DEFINE_integer("num_cpu_devices", _D.num_cpu_devices,
                     "Split the CPU into N logical devices (test multi-device code without GPUs).")
flags.DEFINE_integer("num_intra_threads", _D.num_intra_threads,
                     "Threads each op may use (0: TensorFlow's choice, all cores; default: auto, "
                     "1 with the CPU recipe).")
flags.DEFINE_integer("num_inter_threads", _D.num_inter_threads,
                     "Ops that may run at once (0: TensorFlow's choice; default: auto, the number "
                     "of shards with the CPU recipe).")
flags.DEFINE_string("batch_shards", "auto",
                    "Split each replica's batch into N shards computed side by side (the same "
                    "update). auto: on a machine without GPUs, one shard per core with one thread "
                    "per op and the data on the device (the CPU recipe) where it is faster for the "
                    "model and batch (README, Performance); else 1.")
flags.DEFINE_enum("precision", _D.precision, config_lib.PRECISIONS,
                  "auto: mixed_bfloat16 on Ampere+ GPUs, mixed_float16 on Volta/Turing, float32 on CPU.")
flags.DEFINE_bool("deterministic", _D.deterministic, "TensorFlow op determinism: with --seed, "
                  "a resumed run ends with the same weights as an uninterrupted one.")
flags.DEFINE_integer("log_every", _D.log_every, "Log line every N steps, and at every evaluation.")
flags.DEFINE_integer("summary_every", _D.summary_every, "Train summaries every N steps "
                     "(0: with every log line).")
flags.DEFINE_integer("histogram_every", _D.histogram_every, "Histograms of every trainable "
                     "weight (TensorBoard's Histograms and Distributions) every N steps (0: none).")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate and checkpoint every N steps "
                     "(0: once per epoch).")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "How many checkpoints to keep.")
flags.DEFINE_integer("checkpoint_every_steps", _D.checkpoint_every_steps,
                     "Also checkpoint every N steps (0: only at evaluations and the end).")
flags.DEFINE_float("continuous_eval_timeout", _D.continuous_eval_timeout,
                   "--mode=continuous_eval: stop after this many seconds without a new "
                   "checkpoint (it stops by itself after the training's last step).")
flags.DEFINE_float("checkpoint_every_secs", _D.checkpoint_every_secs,
                   "Also checkpoint when this many seconds passed since the last one (0: off).")
flags.DEFINE_string("checkpoint", None, "--mode=eval/export: this checkpoint instead of the "
                    "latest: a path (DIR/ckpt-N), a name or step of --model_dir's (ckpt-936 "
                    "or 936), or best (the one --keep_best kept). --mode=continuous_eval: a "
                    "run's folder, whose new checkpoints are evaluated into --model_dir.")
flags.DEFINE_string("init_checkpoint", None, "Start a new training run from this checkpoint's "
                    "model weights (DIR/ckpt-N, or a run's folder: its latest); optimizer, step "
                    "and schedule start afresh. Ignored once --model_dir has checkpoints.")
flags.DEFINE_enum("init_modules", _D.init_modules, config_lib.INIT_MODULES,
                  "What --init_checkpoint reads: the whole model, or only its encoder or decoder.")
flags.DEFINE_enum("freeze", _D.freeze, config_lib.FREEZE,
                  "Keep the encoder's or the decoder's weights as they are and train the other "
                  "part only (with --init_checkpoint: fine-tune on a trained part).")
flags.DEFINE_string("keep_best", None, "Keep the best checkpoint by this metric in "
                    f"<model_dir>/best/: one of {', '.join(config_lib.BEST_METRICS)}.")
flags.DEFINE_integer("early_stopping_patience", 0, "Stop after N evaluations without a new "
                     "best --keep_best (or eval/loss); 0 = off.")
flags.DEFINE_integer("reduce_lr_patience", 0, "Multiply the learning rate by "
                     "--reduce_lr_factor after every N evaluations without a new best "
                     "--keep_best (or eval/loss), as Keras' ReduceLROnPlateau; 0 = off.")
flags.DEFINE_float("reduce_lr_factor", _D.reduce_lr_factor, "--reduce_lr_patience's factor.")
flags.DEFINE_float("reduce_lr_min", _D.reduce_lr_min, "--reduce_lr_patience never lowers the "
                   "learning rate below this.")
flags.DEFINE_float("min_delta", _D.min_delta, "An evaluation is a new best (for --keep_best, "
                   "--early_stopping_patience, --reduce_lr_patience) only if it improves on "
                   "the best by more than this.")
flags.DEFINE_list("train_actions", None, "MODULE:FUNCTION,...: your functions, called as "
                  "FUNCTION(step, metrics) with the train summaries (every --summary_every).")
flags.DEFINE_list("eval_actions", None, "MODULE:FUNCTION,...: your functions, called as "
                  "FUNCTION(step, metrics) after every evaluation.")
flags.DEFINE_list("profile_steps", None, "START,STOP: profiler trace of these steps into "
                  "<model_dir>/train (TensorBoard's Profile tab).")
flags.DEFINE_enum("nan_policy", _D.nan_policy, config_lib.NAN_POLICIES,
                  "On a NaN/Inf loss: stop, or roll back to the last checkpoint with a lower "
                  "learning rate.")
flags.DEFINE_integer("nan_max_retries", _D.nan_max_retries, "Rollbacks before giving up.")
flags.DEFINE_float("nan_lr_factor", _D.nan_lr_factor, "Learning-rate factor per rollback.")
flags.DEFINE_integer("num_images", _D.num_images, "Test images shown in the figure and summaries.")
flags.DEFINE_bool("verbose", False, "Print tracebacks for errors.")


def _numbers(name, values, kind=int):
    """A list flag as a tuple of `kind` (None if not given)."""
    if not values:
        return None
    try:
        return tuple(kind(v) for v in values)
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise config_lib.ConfigError(f"--{name}={','.join(values)}: give {what} separated by "
                                     "commas") from None


def _last_given(names, argv) -> str | None:
    """Which of `names` the command line (flag files expanded in place) gives last."""
    last = None
    for arg in FLAGS.read_flags_from_files(argv, force_gnu=False):
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and name in names:
            last = name
    return last


def given_flags() -> set[str]:
    """The Config fields set on the command line or in a flag file."""
    return {f.name for f in dataclasses.fields(config_lib.Config) if FLAGS[f.name].present}


def config_from_flags(argv=None) -> config_lib.Config:
    """The Config of the parsed flags; `argv` (default sys.argv) tells which of --epochs and
    --train_steps came last, when both are given (a flag file's and the command line's)."""
    names = {f.name for f in dataclasses.fields(config_lib.Config)}
    values = {name: FLAGS[name].value for name in names}
    if values["epochs"] is not None and values["train_steps"] is not None:
        for name in ("epochs", "train_steps"):  # each value given must be valid, used or not
            if values[name] <= 0:
                raise config_lib.ConfigError(f"--{name}={values[name]}: must be a positive "
                                             "whole number")
        later = _last_given(("epochs", "train_steps"), (argv or sys.argv)[1:])
        earlier = "epochs" if later == "train_steps" else "train_steps"
        logging.info("--%s=%d and --%s=%d both given: the later, --%s=%d, sets the run's "
                     "length", earlier, values[earlier], later, values[later], later,
                     values[later])
        values[earlier] = None
    for name in ("encoder_filters", "decoder_filters", "synthetic_shape", "profile_steps",
                 "image_size"):
        values[name] = _numbers(name, values[name])
    values["loss_weights"] = _numbers("loss_weights", values["loss_weights"], float)
    values["lr_values"] = _numbers("lr_values", values["lr_values"], float)
    values["lr_boundaries"] = _numbers("lr_boundaries", values["lr_boundaries"])
    for name in ("train_actions", "eval_actions"):
        values[name] = tuple(values[name] or ())
    shards = values["batch_shards"]
    if shards == "auto":
        values["batch_shards"] = None
    elif not shards.isdigit():
        raise config_lib.ConfigError(f"--batch_shards={shards}: give auto or a whole number >= 1")
    else:
        values["batch_shards"] = int(shards)
    return config_lib.Config(**values)


class _NotTensorFlowInfo:
    """A logging filter: drops INFO (and lower) records of TensorFlow's own modules."""

    def __init__(self):
        spec = importlib.util.find_spec("tensorflow")  # finds it without importing it
        self.prefix = os.path.join(spec.submodule_search_locations[0], "")

    def filter(self, record) -> bool:
        return record.levelno > std_logging.INFO or not record.pathname.startswith(self.prefix)


def main(argv):
    if len(argv) > 1:
        print(f"train.py: error: unexpected arguments {' '.join(argv[1:])}: flags take the form "
              "--name=value (python train.py --helpshort lists them)", file=sys.stderr)
        sys.exit(2)
    from core import signals
    from core.errors import Preempted, TapeloopError

    # TensorFlow's own INFO lines drown ours: those of its logger, and those its modules
    # write with absl's (a "Sharding callback duration" line at every checkpoint).
    std_logging.getLogger("tensorflow").setLevel(std_logging.WARNING)
    logging.get_absl_logger().addFilter(_NotTensorFlowInfo())

    # Ctrl-C or SIGTERM outside training (start-up, eval, export) exits at once with one
    # line; training takes them over (checkpoint, then exit 75). --verbose gives
    # KeyboardInterrupt and its traceback instead, as from Python: at the run's next safe
    # point, or where the run was at a second Ctrl-C (signals.DeferredInterrupt).
    with contextlib.nullcontext() if FLAGS.verbose else signals.ExitOnSignals(
            "train.py: stopped by {signal} outside training: the checkpoints are as they were"):
        try:
            config = config_from_flags()
            core.run(config, given_flags())
        except TapeloopError as e:
            if FLAGS.verbose:
                raise
            # A stop's message says so itself: "stopped by SIGTERM at step N after saving ...".
            line = f"train.py: {e}" if isinstance(e, Preempted) else f"train.py: error: {e}"
            code = e.exit_code
        else:
            return
        # The run's objects, which the error's traceback held, are collected before the line,
        # unlogged: a failed restore's objects log each value left unread as they go.
        std_logging.getLogger("tensorflow").setLevel(std_logging.ERROR)
        gc.collect()
        _say(line)
        sys.exit(code)


def _say(line: str) -> None:
    """`line` on stderr. Where stderr is a closed pipe (`train.py ... 2>&1 | head`, once
    head has exited) it is lost, and the exit code stays the run's: 75 after a SIGTERM
    and a checkpoint, not Python's 1 for the BrokenPipeError (nor 120 for a failed flush
    at exit, so stderr is pointed at /dev/null)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())


if __name__ == "__main__":
    app.run(main, flags_parser=errors.flags_parser("train.py", "python train.py"))
