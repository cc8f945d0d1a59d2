"""The run's configuration: one frozen dataclass, validated once, before any work.

Validation checks every value that does not need TensorFlow or the data (those
are checked where they are known: the number of replicas in `distribute`, the
files in `data`). Each problem raises `ConfigError` with one line that names
the value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

from core.errors import ConfigError

MODES = ("train", "eval", "train_and_eval", "export", "continuous_eval")
# Modes that restore checkpoints and never write one.
INFERENCE_MODES = ("eval", "export", "continuous_eval")
NAN_POLICIES = ("stop", "rollback")
DATASETS = ("fontdigits", "mnist", "fashion_mnist", "shapes", "synthetic", "folder", "tfrecord")
FILE_DATASETS = ("folder", "tfrecord")  # decoded from image files, streamed
BUILT_IN_DATASETS = ("fontdigits", "shapes", "synthetic")  # generated here: no --data_dir
RESIZE_MODES = ("crop", "pad", "stretch")
BAD_IMAGES = ("error", "skip")
CACHES = ("none", "memory")  # or a folder: decoded once into TFRecord shards there
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
LOSSES = ("bce", "mse", "l1", "charbonnier", "ssim")  # core/losses.py
AUGMENTATIONS = ("flip", "crop")  # core/augment.py
OPTIMIZERS = ("adam", "adamw", "sgd")
INIT_MODULES = ("all", "encoder", "decoder")  # what --init_checkpoint reads
FREEZE = ("none", "encoder", "decoder")  # the part of the model --freeze keeps as it is
# --keep_best metrics, and whether higher is better (kl and elbo: the VAE's only).
BEST_METRICS = {"eval/loss": False, "eval/bce": False, "eval/mse": False, "eval/psnr": True,
                "eval/ssim": True, "eval/kl": False, "eval/elbo": True}
LR_SCHEDULES = ("constant", "cosine", "linear", "exponential", "piecewise")  # core/schedules.py
_SPLIT_RE = re.compile(r"^(\w+)(\[(-?\d+%?)?:(-?\d+%?)?\])?$")


MAX_NUM_IMAGES = 64
SEQUENCE_FIELDS = ("synthetic_shape", "image_size", "encoder_filters", "decoder_filters",
                   "loss_weights", "lr_boundaries", "lr_values", "profile_steps",
                   "train_actions", "eval_actions")
DEFAULT_EPOCHS = 5  # when neither epochs nor train_steps is given
# Path flags whose leading ~ is the user's home folder.
PATH_FIELDS = ("model_dir", "data_dir", "checkpoint", "cache", "init_checkpoint")
# Synthetic splits are generated in memory: refuse more than this many bytes per split.
MAX_SYNTHETIC_BYTES = 2 * 2**30


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or under it (as written; both already have `~` expanded)."""
    path, folder = (p.rstrip("/") for p in (path, folder))
    if "://" not in path:
        path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder + "/")


def same_folder(a: str, b: str) -> bool:
    """`a` and `b` name one folder (relative or absolute, with or without a final /)."""
    return inside(a, b) and inside(b, a)


def check_model_dir_apart(model_dir: str, data_dir: str | None) -> None:
    """The run writes checkpoints, figures and its TensorBoard runs (train/, eval/) into
    --model_dir: into --data_dir, they would land among the data (train/ is a folder's
    split: its events made the next run skip it as a run's folder)."""
    if not data_dir:
        return
    if same_folder(model_dir, data_dir):
        raise ConfigError(f"--model_dir={model_dir} is --data_dir: the run would write its "
                          "checkpoints, TensorBoard events (train/, eval/) and figures among "
                          "your data; give it a folder of its own, e.g. --model_dir=runs/NAME")
    for run in ("train", "eval"):
        if inside(data_dir, os.path.join(model_dir, run)):
            raise ConfigError(f"--data_dir={data_dir} is inside --model_dir={model_dir}'s "
                              f"{run}/, where the run writes its TensorBoard events: give the "
                              "run a folder of its own, e.g. --model_dir=runs/NAME")


def model_names() -> tuple[str, ...]:
    """The built-in models and those registered with layers.autoencoders.register."""
    from layers.registry import FACTORIES, MODELS  # no TensorFlow: validation stays fast

    return tuple(MODELS) + tuple(FACTORIES)


def names_one_checkpoint(checkpoint: str) -> bool:
    """Whether --checkpoint names one checkpoint ('best', a step, 'DIR/ckpt-9[.index]'),
    not a run's folder."""
    name = os.path.basename(checkpoint.rstrip("/"))
    return checkpoint in ("best", "best/") or checkpoint.isdigit() or bool(
        re.fullmatch(r"ckpt-\d+(\.index|\.data-\d+-of-\d+)?", name))


def continuous_eval_of_one(checkpoint: str) -> str:
    return (f"--mode=continuous_eval evaluates each new checkpoint of a run as it appears; "
            f"--checkpoint={checkpoint} names one: use --mode=eval for it (--checkpoint=RUN_DIR "
            "--model_dir=YOUR_FOLDER evaluates each new checkpoint of RUN_DIR into your folder)")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Field names are the `train.py` flag names."""

    mode: str = "train_and_eval"
    model_dir: str = "runs/default"
    # Data.
    dataset: str = "fontdigits"
    data_dir: str | None = None
    train_split: str | None = None  # None: the dataset's (train, or train[:90%] of a flat folder)
    eval_split: str | None = None  # None: the dataset's (test, or train[90%:] of a flat folder)
    verify_checksums: bool = True
    synthetic_shape: tuple[int, int, int] = (28, 28, 1)
    image_size: tuple[int, int] | None = None  # None: the first image's
    channels: int | None = None  # None: 1 if the images are greyscale, else 3 (data.open_split)
    resize: str = "crop"
    bad_images: str = "error"
    image_feature: str | None = None  # tfrecord, tfds: the image's feature (None: found)
    cache: str = "none"
    tf_data_service: str | None = None  # grpc://HOST:PORT of a tf.data service dispatcher
    # Model.
    model: str = "seed"
    encoder_filters: tuple[int, ...] | None = None
    decoder_filters: tuple[int, ...] | None = None
    kernel_size: int | None = None
    latent_dim: int = 16  # vae only
    kl_weight: float = 1.0  # vae only
    blocks_per_stage: int = 1  # resnet only
    latent_channels: int = 4  # resnet only: the code's channels
    noise_factor: float = 0.0  # > 0: train a denoiser
    augment: str = ""  # of AUGMENTATIONS, comma-separated: each training batch, in the step
    # Loss: one of LOSSES, or several joined by '+' (l1+ssim), with one weight each.
    loss: str = "bce"
    loss_weights: tuple[float, ...] | None = None  # None: 1 each
    # Optimisation.
    epochs: int | None = None  # None: DEFAULT_EPOCHS, unless train_steps is given
    train_steps: int | None = None
    batch_size: int = 256
    grad_accum_steps: int = 1  # micro-batches of batch_size per update
    eval_batch_size: int | None = None  # None: batch_size
    learning_rate: float = 3e-3
    optimizer: str = "adam"
    weight_decay: float | None = None  # adamw; None: 0.004 (Keras' AdamW default)
    momentum: float | None = None  # sgd; None: 0.9
    nesterov: bool = False  # sgd
    clip_norm: float | None = None  # clip the whole step's gradient to this global norm
    clip_value: float | None = None  # clip every gradient element to [-v, v]
    ema_decay: float | None = None  # keep an exponential moving average of the weights
    ema: bool = True  # the average: evaluate, draw and export it; init_checkpoint reads it
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_learning_rate: float = 0.0  # cosine, linear: where they end
    decay_rate: float | None = None  # exponential: the factor per epoch
    lr_boundaries: tuple[int, ...] | None = None  # piecewise: steps where the rate changes
    lr_values: tuple[float, ...] | None = None  # piecewise: one more than boundaries
    seed: int = 0
    # Execution.
    jit_compile: bool | None = None  # None: on where a GPU is present
    eager: bool = False
    steps_per_loop: int = 50
    data_on_device: bool | None = None  # None: auto (on with the CPU recipe)
    data_on_device_max_mb: int = 2048
    strategy: str = "auto"
    num_cpu_devices: int = 0
    # None: auto (distribute.cpu_defaults: the CPU recipe where it pays, else TensorFlow's).
    num_intra_threads: int | None = None  # threads per op; 0: TensorFlow's choice (all cores)
    num_inter_threads: int | None = None  # ops at once; 0: TensorFlow's choice
    batch_shards: int | None = None  # independent forward/backward branches per replica
    precision: str = "auto"
    deterministic: bool = False
    # Outer loop.
    log_every: int = 100
    summary_every: int = 0  # 0: with every log line
    histogram_every: int = 0  # weight histograms every N steps; 0: none
    eval_every: int = 0  # steps; 0 means once per epoch
    keep_checkpoints: int = 3
    checkpoint_every_steps: int = 0  # 0: only at evaluations and at the end
    checkpoint_every_secs: float = 600.0
    checkpoint: str | None = None  # for --mode=eval/export: this checkpoint, or "best"
    # A new training run starts from this checkpoint's model (a run's folder: its latest).
    init_checkpoint: str | None = None
    init_modules: str = "all"  # INIT_MODULES: what of the model it reads
    freeze: str = "none"  # FREEZE: train the other part only (fine-tuning)
    continuous_eval_timeout: float = 3600.0  # continuous_eval: seconds without a new checkpoint
    keep_best: str | None = None  # a metric of BEST_METRICS: keep its best checkpoint in best/
    early_stopping_patience: int = 0  # stop after N evaluations without a new best; 0 = off
    # Keras' ReduceLROnPlateau: multiply the learning rate by reduce_lr_factor after every
    # reduce_lr_patience evaluations without a new best, not below reduce_lr_min; 0 = off.
    reduce_lr_patience: int = 0
    reduce_lr_factor: float = 0.1
    reduce_lr_min: float = 0.0
    # An evaluation is a new best only if it beats the best by more than this (keep_best,
    # early stopping and reduce_lr alike; Keras' min_delta).
    min_delta: float = 0.0
    profile_steps: tuple[int, int] | None = None
    # Your own functions (MODULE:FUNCTION), called as f(step, metrics): core/actions.py.
    train_actions: tuple[str, ...] = ()  # at every train summary
    eval_actions: tuple[str, ...] = ()  # after every evaluation
    nan_policy: str = "stop"
    nan_max_retries: int = 3
    nan_lr_factor: float = 0.5
    num_images: int = 8  # columns of the reconstruction figure and image summary

    def __post_init__(self):
        self._as_written_by_flags()
        for name in PATH_FIELDS:
            object.__setattr__(self, name, expand_home(getattr(self, name)))
        _check_choice("mode", self.mode, MODES)
        check_no_path_in_dataset(self.dataset, ("folder", "tfrecord"))
        if not (self.dataset.startswith("tfds:") and len(self.dataset) > len("tfds:")):
            _check_choice("dataset", self.dataset, DATASETS + ("tfds:NAME[/CONFIG]",))
        _check_choice("resize", self.resize, RESIZE_MODES)
        _check_choice("bad_images", self.bad_images, BAD_IMAGES)
        if not self.cache:
            raise ConfigError("--cache is empty: give none, memory or a folder")
        if (self.cache not in ("none", "memory") and self.dataset == "folder" and self.data_dir
                and inside(self.cache, self.data_dir)):
            raise ConfigError(f"--cache={self.cache} is inside --data_dir={self.data_dir}: the "
                              "cache's shards would land among your images; give a folder "
                              "outside it")
        check_image_feature(self.dataset, self.image_feature)
        check_model_dir_apart(self.model_dir, self.data_dir)
        if self.mode not in INFERENCE_MODES:  # eval and export check once the run's are known
            check_data_dir_is_read(self.dataset, self.data_dir)
            check_cache_is_read(self.dataset, self.cache)
        elif self.tf_data_service is not None:
            raise ConfigError(f"--tf_data_service feeds training; --mode={self.mode} reads its "
                              "data on this machine: drop --tf_data_service")
        if self.dataset in FILE_DATASETS and not self.data_dir:
            raise ConfigError(f"--dataset={self.dataset} needs --data_dir: the folder of your "
                              + ("images" if self.dataset == "folder" else "TFRecord shards"))
        object.__setattr__(self, "image_size", image_size(self.image_size))
        if self.tf_data_service is not None and not re.match(r"^grpc://[^/]+:\d+$",
                                                               self.tf_data_service):
            raise ConfigError(f"--tf_data_service={self.tf_data_service}: give the dispatcher as "
                              "grpc://HOST:PORT")
        if self.tf_data_service and self.dataset not in FILE_DATASETS and not \
                self.dataset.startswith("tfds:"):
            raise ConfigError(f"--tf_data_service sends reading and decoding to other machines; "
                              f"--dataset={self.dataset} is held in memory and has none: use it "
                              "with folder, tfrecord or tfds:NAME data")
        if self.tf_data_service and (self.cache == "memory" or self.data_on_device):
            raise ConfigError("--tf_data_service decodes on other machines for every batch; "
                              "--cache=memory and --data_on_device decode once here: drop one")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"--channels={self.channels}: 1 (greyscale) or 3 (RGB)")
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        from layers.registry import is_user_model

        if not is_user_model(self.model):
            _check_choice("model", self.model, model_names() + ("MODULE:FACTORY",))
        self._check_loss()
        self._check_augment()
        for name in ("epochs", "train_steps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name}={value}: must be a positive whole number")
        if self.epochs is not None and self.train_steps is not None:
            raise ConfigError("give exactly one of --epochs and --train_steps")
        if self.epochs is None and self.train_steps is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS)
        for name in ("batch_size", "steps_per_loop", "log_every", "keep_checkpoints",
                     "num_images", "grad_accum_steps", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name}={value}: must be a positive whole number")
        if self.num_images > MAX_NUM_IMAGES:
            raise ConfigError(f"--num_images={self.num_images}: at most {MAX_NUM_IMAGES} (the "
                              "figure wraps every 16 columns)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"--learning_rate={self.learning_rate}: must be a positive, finite "
                              "number")
        for name in ("summary_every", "histogram_every", "checkpoint_every_steps",
                     "checkpoint_every_secs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 0 (0 = off)")
        if self.nan_max_retries < 0:
            raise ConfigError(f"--nan_max_retries={self.nan_max_retries}: must be >= 0")
        if not 0 < self.nan_lr_factor < 1:
            raise ConfigError(f"--nan_lr_factor={self.nan_lr_factor}: must be between 0 and 1")
        if self.profile_steps is not None:
            steps = tuple(self.profile_steps)
            if len(steps) != 2 or not 0 <= steps[0] < steps[1]:
                raise ConfigError(f"--profile_steps={','.join(map(str, steps))}: give START,STOP "
                                  "with 0 <= START < STOP, e.g. 100,110")
        if not 0 <= self.seed < 2**32:  # Keras' and NumPy's seeds are 32-bit unsigned
            raise ConfigError(f"--seed={self.seed}: must be between 0 and {2**32 - 1}")
        if self.eval_every < 0:
            raise ConfigError(f"--eval_every={self.eval_every}: must be >= 0 (0 = once per epoch)")
        if self.data_on_device_max_mb <= 0:
            raise ConfigError(f"--data_on_device_max_mb={self.data_on_device_max_mb}: must be positive")
        if self.data_on_device and self.eager:
            raise ConfigError("--data_on_device needs compiled loops: drop --eager")
        if self.num_cpu_devices < 0:
            raise ConfigError(f"--num_cpu_devices={self.num_cpu_devices}: must be >= 0")
        if self.num_cpu_devices > 1 and self.strategy in ("default", "one_device", "multi_worker"):
            raise ConfigError(
                f"--num_cpu_devices={self.num_cpu_devices} splits the CPU for --strategy=mirrored "
                f"(or auto), but --strategy={self.strategy} runs on one device of this machine: "
                "drop --num_cpu_devices, or give --strategy=mirrored")
        for name in ("num_intra_threads", "num_inter_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 0 "
                                  "(0 = TensorFlow's choice)")
        if self.batch_shards is not None and self.batch_shards < 1:
            raise ConfigError(f"--batch_shards={self.batch_shards}: must be >= 1 (1 = no split)")
        if self.latent_dim <= 0:
            raise ConfigError(f"--latent_dim={self.latent_dim}: must be a positive whole number")
        for name in ("blocks_per_stage", "latent_channels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be a positive whole "
                                  "number")
        if self.kl_weight < 0:
            raise ConfigError(f"--kl_weight={self.kl_weight}: must be >= 0")
        if not 0 <= self.noise_factor <= 10:
            raise ConfigError(f"--noise_factor={self.noise_factor}: must be between 0 and 10 "
                              "(0 = no denoising; the keras.io example uses 0.4)")
        if self.kernel_size is not None and self.kernel_size <= 0:
            raise ConfigError(f"--kernel_size={self.kernel_size}: must be a positive whole number")
        for name in ("encoder_filters", "decoder_filters"):
            value = getattr(self, name)
            if value is not None and (not value or min(value) <= 0):
                raise ConfigError(f"--{name}={value}: give positive filter counts, e.g. 8,4,4")
        self._check_stages()
        if self.mode not in INFERENCE_MODES:
            self._check_model_flags_are_read()
        if len(self.synthetic_shape) != 3 or min(self.synthetic_shape) <= 0:
            raise ConfigError(
                f"--synthetic_shape={self.synthetic_shape}: give H,W,C as three positive numbers")
        if (self.mode not in INFERENCE_MODES and self.dataset != "synthetic"
                and tuple(self.synthetic_shape) != Config.__dataclass_fields__["synthetic_shape"].default):
            raise ConfigError(f"--synthetic_shape={','.join(map(str, self.synthetic_shape))} "
                              f"shapes --dataset=synthetic's images; --dataset={self.dataset} "
                              "does not read it: drop it, or give --image_size (and --channels) "
                              "to resize these")
        for name in ("train_split", "eval_split"):
            if getattr(self, name) is not None and not _SPLIT_RE.match(getattr(self, name)):
                raise ConfigError(
                    f"--{name}={getattr(self, name)!r}: expected a split name like 'train' or "
                    "'test', optionally sliced like 'test[:8000]', 'train[10%:]' or 'test[-20%:]'")
        if not self.model_dir:
            raise ConfigError("--model_dir is empty: give a folder for checkpoints and summaries")
        for name in ("model_dir", "checkpoint", "init_checkpoint"):
            # TensorFlow finds a checkpoint's files by a file pattern, in which "[" opens a
            # set: such checkpoints were written, then never restored ("damaged").
            if "[" in (getattr(self, name) or ""):
                raise ConfigError(
                    f"--{name}={getattr(self, name)!r}: TensorFlow reads a checkpoint's files "
                    "back by a file pattern, in which '[' is a pattern character, so a "
                    "checkpoint under this path cannot be restored: use a path without '[' "
                    "(rename the folder: its files are intact)")
        if self.eager and self.jit_compile:
            raise ConfigError("--eager and --jit_compile exclude each other: drop one")
        # The recipe's options, after --learning_rate itself was checked.
        self._check_schedule()
        self._check_optimizer()
        self._check_best()
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"--ema_decay={self.ema_decay}: must be between 0 and 1 "
                              "(exclusive), e.g. 0.999")

    def _check_best(self) -> None:
        if self.keep_best is not None:
            metrics = [m for m in BEST_METRICS if self.model == "vae" or
                       m not in ("eval/kl", "eval/elbo")]
            if self.keep_best not in metrics:
                # psnr, val_psnr (Keras' monitor): the name TensorBoard shows is eval/psnr.
                meant = "eval/" + re.sub(r"^(val_|eval_)", "", self.keep_best.lower())
                hint = (f": did you mean --keep_best={meant}, as TensorBoard names it?"
                        if meant in metrics else "")
                raise ConfigError(f"--keep_best={self.keep_best} is unknown: choose one of "
                                  f"{', '.join(metrics)}{hint}")
        if self.early_stopping_patience < 0:
            raise ConfigError(f"--early_stopping_patience={self.early_stopping_patience}: "
                              "must be >= 0 (0 = off)")
        _check_choice("init_modules", self.init_modules, INIT_MODULES)
        if self.init_modules != "all" and not self.init_checkpoint:
            raise ConfigError(f"--init_modules={self.init_modules} says what --init_checkpoint "
                              "reads; give --init_checkpoint=RUN_DIR (or DIR/ckpt-N) too")
        _check_choice("freeze", self.freeze, FREEZE)
        if self.init_checkpoint and self.mode in INFERENCE_MODES:
            raise ConfigError(f"--init_checkpoint starts a training run from a checkpoint; "
                              f"--mode={self.mode} reads one with --checkpoint="
                              f"{self.init_checkpoint}")
        if self.checkpoint and self.mode not in INFERENCE_MODES:
            raise ConfigError(
                f"--checkpoint={self.checkpoint} names what --mode=eval and export read; "
                f"--mode={self.mode} resumes the newest checkpoint of --model_dir: to start a "
                f"run from its weights, give --init_checkpoint={self.checkpoint}")
        if self.mode == "continuous_eval" and self.checkpoint and names_one_checkpoint(
                self.checkpoint):
            raise ConfigError(continuous_eval_of_one(self.checkpoint))
        if self.mode == "continuous_eval" and self.strategy == "multi_worker":
            raise ConfigError("--mode=continuous_eval runs beside the workers, not among them: "
                              "drop --strategy=multi_worker (and give it no TF_CONFIG of theirs)")
        if not self.continuous_eval_timeout > 0:
            raise ConfigError(f"--continuous_eval_timeout={self.continuous_eval_timeout}: must be "
                              "a positive number of seconds")
        if (self.keep_best or self.early_stopping_patience) and self.mode == "train":
            raise ConfigError("--keep_best and --early_stopping_patience judge evaluations; "
                              "--mode=train runs none: use --mode=train_and_eval")
        from layers.registry import is_module_attr

        if self.reduce_lr_patience < 0:
            raise ConfigError(f"--reduce_lr_patience={self.reduce_lr_patience}: must be >= 0 "
                              "(0 = off)")
        if not 0 < self.reduce_lr_factor < 1:
            raise ConfigError(f"--reduce_lr_factor={self.reduce_lr_factor}: must be between 0 "
                              "and 1 (exclusive), e.g. 0.1")
        if not 0 <= self.reduce_lr_min < self.learning_rate:
            raise ConfigError(f"--reduce_lr_min={self.reduce_lr_min}: must be >= 0 and below "
                              f"--learning_rate={self.learning_rate}")
        factor_default = Config.__dataclass_fields__["reduce_lr_factor"].default
        if not self.reduce_lr_patience and (self.reduce_lr_factor != factor_default
                                            or self.reduce_lr_min):
            raise ConfigError("--reduce_lr_factor and --reduce_lr_min say how "
                              "--reduce_lr_patience lowers the rate; give --reduce_lr_patience=N "
                              "(evaluations without a new best) too")
        if not (self.min_delta >= 0 and math.isfinite(self.min_delta)):
            raise ConfigError(f"--min_delta={self.min_delta}: must be a finite number >= 0")
        if self.min_delta and not (self.keep_best or self.early_stopping_patience
                                   or self.reduce_lr_patience):
            raise ConfigError("--min_delta says how much an evaluation must improve to be a new "
                              "best; give --keep_best, --early_stopping_patience or "
                              "--reduce_lr_patience too")
        for kind, modes in (("train", ("train", "train_and_eval")),
                            ("eval", ("train_and_eval", "eval", "continuous_eval"))):
            names = getattr(self, f"{kind}_actions")
            for name in names:
                if not is_module_attr(name):
                    raise ConfigError(f"--{kind}_actions={name}: give MODULE:FUNCTION, a "
                                      "function(step, metrics) in MODULE.py")
            if names and self.mode not in modes:
                raise ConfigError(f"--{kind}_actions run in --mode={' or '.join(modes)}; "
                                  f"--mode={self.mode} runs none: drop them")
        if self.reduce_lr_patience and self.mode == "train":
            raise ConfigError("--reduce_lr_patience judges evaluations; --mode=train runs none: "
                              "use --mode=train_and_eval")

    def _check_optimizer(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.weight_decay is not None:
            if self.optimizer != "adamw":
                raise ConfigError(f"--weight_decay is AdamW's (decoupled); --optimizer="
                                  f"{self.optimizer} has none: use --optimizer=adamw")
            if not 0 <= self.weight_decay < 1:
                raise ConfigError(f"--weight_decay={self.weight_decay}: must be in [0, 1), "
                                  "e.g. 0.004")
        if (self.momentum is not None or self.nesterov) and self.optimizer != "sgd":
            raise ConfigError(f"--momentum and --nesterov are SGD's; --optimizer="
                              f"{self.optimizer} has its own: drop them, or use --optimizer=sgd")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum={self.momentum}: must be in [0, 1), e.g. 0.9")
        for name in ("clip_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name}={value}: must be a positive, finite number")

    def _check_schedule(self) -> None:
        _check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        kind = self.lr_schedule
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup_steps={self.warmup_steps}: must be >= 0 (0 = none)")
        if not 0 <= self.min_learning_rate < self.learning_rate:
            raise ConfigError(f"--min_learning_rate={self.min_learning_rate}: must be >= 0 and "
                              f"below --learning_rate={self.learning_rate}")
        if self.min_learning_rate and kind not in ("cosine", "linear"):
            raise ConfigError(f"--min_learning_rate is where cosine and linear end; "
                              f"--lr_schedule={kind} has none: drop it")
        if self.decay_rate is not None:
            if kind != "exponential":
                raise ConfigError(f"--decay_rate is the exponential schedule's; --lr_schedule="
                                  f"{kind} has none: drop it, or use --lr_schedule=exponential")
            if not 0 < self.decay_rate <= 1:
                raise ConfigError(f"--decay_rate={self.decay_rate}: the factor per epoch must be "
                                  "in (0, 1], e.g. 0.9")
        elif kind == "exponential":
            raise ConfigError("--lr_schedule=exponential needs --decay_rate, the factor per "
                              "epoch, e.g. 0.9")
        given = self.lr_boundaries is not None or self.lr_values is not None
        if kind != "piecewise":
            if given:
                raise ConfigError(f"--lr_boundaries and --lr_values are the piecewise schedule's;"
                                  f" --lr_schedule={kind} has none: drop them")
            return
        bounds, values = tuple(self.lr_boundaries or ()), tuple(self.lr_values or ())
        if not bounds or len(values) != len(bounds) + 1:
            raise ConfigError(
                f"--lr_schedule=piecewise needs --lr_boundaries (steps) and one more "
                f"--lr_values than boundaries; got {len(bounds)} boundaries and {len(values)} "
                "values, e.g. --lr_boundaries=1000,2000 --lr_values=3e-3,1e-3,3e-4")
        if any(b <= 0 for b in bounds) or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ConfigError(f"--lr_boundaries={','.join(map(str, bounds))}: steps must be "
                              "positive and increasing")
        if not all(v > 0 and math.isfinite(v) for v in values):
            raise ConfigError(f"--lr_values={','.join(map(str, values))}: every rate must be "
                              "positive and finite")

    @property
    def augmentations(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.augment.split(",") if a.strip())

    def _check_augment(self) -> None:
        kinds = self.augmentations
        for kind in kinds:
            if kind not in AUGMENTATIONS:
                raise ConfigError(f"--augment={self.augment}: {kind!r} is unknown: choose from "
                                  f"{', '.join(AUGMENTATIONS)}, or both: --augment=flip,crop")
        if len(set(kinds)) != len(kinds):
            raise ConfigError(f"--augment={self.augment} names an augmentation twice")

    def _check_loss(self) -> None:
        from layers.registry import is_module_attr

        names = self.loss.split("+")
        for name in names:
            if name not in LOSSES and not is_module_attr(name):
                raise ConfigError(f"--loss={self.loss}: {name!r} is unknown: choose from "
                                  f"{', '.join(LOSSES)}, MODULE:FUNCTION (your own), or a sum "
                                  "such as l1+ssim")
        if len(set(names)) != len(names):
            raise ConfigError(f"--loss={self.loss} names a loss twice: give each once, and its "
                              "weight in --loss_weights")
        if self.loss_weights is not None:
            weights = tuple(self.loss_weights)
            if len(weights) != len(names):
                raise ConfigError(
                    f"--loss_weights={','.join(map(str, weights))} gives {len(weights)} weight(s) "
                    f"for the {len(names)} loss(es) of --loss={self.loss}: give one per loss, "
                    "in the same order")
            if not all(w > 0 and math.isfinite(w) for w in weights):
                raise ConfigError(f"--loss_weights={','.join(map(str, weights))}: every weight "
                                  "must be positive and finite")

    def _check_model_flags_are_read(self) -> None:
        """A flag of another model's (say --latent_dim with the seed model) would be ignored:
        a training run that looks configured one way would run another. Eval and export take
        the model from the run, so only training checks."""
        from layers.registry import MODELS

        spec = MODELS.get(self.model)
        owners = {"latent_dim": ("the VAE's latent size", "vae", spec and spec.variational),
                  "kl_weight": ("the VAE's KL weight", "vae", spec and spec.variational),
                  "blocks_per_stage": ("the resnet's residual blocks per stage", "resnet",
                                       spec and spec.family == "resnet"),
                  "latent_channels": ("the resnet's code channels", "resnet",
                                      spec and spec.family == "resnet")}
        defaults = Config.__dataclass_fields__
        for name, (what, owner, read) in owners.items():
            value = getattr(self, name)
            if not read and value != defaults[name].default:
                raise ConfigError(f"--{name}={value} is {what}; --model={self.model} does not "
                                  f"read it: drop --{name}, or use --model={owner}")

    def _check_stages(self) -> None:
        from layers.registry import MODELS

        if self.model not in MODELS:  # the user's own model
            for name in ("encoder_filters", "decoder_filters", "kernel_size"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name} configures the built-in models; --model="
                                      f"{self.model} builds its own: drop --{name}")
            return
        spec = MODELS[self.model]
        if spec.family == "resnet" and self.kernel_size is not None:
            raise ConfigError(f"--kernel_size configures the conv models; --model={self.model} "
                              "uses 3x3 convolutions throughout: drop --kernel_size")
        encoder = self.encoder_filters or spec.encoder_filters
        decoder = self.decoder_filters or spec.decoder_filters
        if len(encoder) != len(decoder):
            given = ("--encoder_filters" if self.encoder_filters else
                     f"{self.model}'s encoder") + f" has {len(encoder)} stages, " + (
                "--decoder_filters" if self.decoder_filters else f"{self.model}'s decoder") + \
                f" {len(decoder)}"
            raise ConfigError(f"{given}: give --encoder_filters and --decoder_filters with the "
                              f"same number of stages, e.g. --encoder_filters="
                              f"{','.join(map(str, encoder))} --decoder_filters="
                              f"{','.join(map(str, reversed(encoder)))}")

    @property
    def step_batch(self) -> int:
        """Examples per update: --batch_size times --grad_accum_steps."""
        return self.batch_size * self.grad_accum_steps

    @property
    def eval_batch(self) -> int:
        """Examples per evaluation step: --eval_batch_size, or --batch_size."""
        return self.eval_batch_size or self.batch_size

    def _as_written_by_flags(self) -> None:
        """From Python, the values a flag would give: lists as tuples, one number as a
        square `image_size`, names as a list or a comma-separated string."""
        for name in SEQUENCE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and name in ("train_actions", "eval_actions"):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (int, float)) and name == "image_size":
                value = [value]
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.augment, (list, tuple)):
            object.__setattr__(self, "augment", ",".join(self.augment))

    def replace(self, **changes) -> Config:
        """A copy with `changes`; a new length, `epochs` or `train_steps`, replaces the old
        one, whichever of the two that was (as the later of the two flags wins)."""
        for new, old in (("epochs", "train_steps"), ("train_steps", "epochs")):
            if changes.get(new) is not None and old not in changes:
                changes[old] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def image_size(values) -> tuple[int, int] | None:
    """--image_size as (H, W): HEIGHT,WIDTH, or one number for a square.

    Raises:
      ConfigError: not one or two positive numbers.
    """
    if values is None:
        return None
    size = tuple(values)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) <= 0:
        raise ConfigError(f"--image_size={','.join(map(str, values))}: give HEIGHT,WIDTH as two "
                          "positive numbers, e.g. 64,48, or one for a square, e.g. 64")
    return size


def expand_home(path: str | None) -> str | None:
    """`~/photos` as `$HOME/photos`. A shell expands a ~ only at the start of a word, so
    in `--data_dir=~/photos` it reaches us as written (absl expands `--flagfile=~/...` the
    same way). Paths with a scheme (`gs://...`) are left alone."""
    return os.path.expanduser(path) if path and path.startswith("~") else path


def check_no_path_in_dataset(dataset: str, kinds: tuple[str, ...]) -> None:
    """`--dataset=folder:~/photos` (as `tfds:NAME` is written) gets the flags it meant."""
    kind, sep, path = dataset.partition(":")
    if sep and kind in kinds and path:
        raise ConfigError(f"--dataset={dataset!r}: the path goes in its own flag: "
                          f"--dataset={kind} --data_dir={path}")


def check_data_dir_is_read(dataset: str, data_dir: str | None, whose: str = "") -> None:
    """A --data_dir beside a built-in dataset would be ignored: a run meant for your images
    would train (or be judged) on generated ones. `whose`: how the dataset was chosen."""
    if data_dir and dataset in BUILT_IN_DATASETS:
        raise ConfigError(f"--data_dir={data_dir} is not read by --dataset={dataset}{whose}, "
                          "which is built in: for your images add --dataset=folder (TFRecord "
                          "shards: --dataset=tfrecord), or leave out --data_dir")


def check_cache_is_read(dataset: str, cache: str, whose: str = "") -> None:
    """--cache keeps what image files decode to; a dataset held in memory has none, and
    would ignore it. `whose`: how the dataset was chosen."""
    if cache != "none" and dataset not in FILE_DATASETS and not dataset.startswith("tfds:"):
        raise ConfigError(f"--cache={cache} keeps image files decoded, but --dataset={dataset}"
                          f"{whose} is held in memory already: drop --cache (it is for folder, "
                          "tfrecord and tfds:NAME data)")


def check_image_feature(dataset: str, image_feature: str | None) -> None:
    """--image_feature names a feature of TFRecord examples: only shards and TFDS have one."""
    if image_feature is not None and not (dataset == "tfrecord" or dataset.startswith("tfds:")):
        raise ConfigError(f"--image_feature={image_feature} names the feature of TFRecord "
                          "examples that holds the image: it goes with --dataset=tfrecord or "
                          f"tfds:NAME, not --dataset={dataset}")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"--{name}={value!r} is unknown: choose one of {', '.join(choices)}")
