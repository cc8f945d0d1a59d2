"""`run(config)`: builds strategy, data, model, trainer and controller, and runs a mode."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from absl import logging
import numpy as np
import tensorflow as tf

from core import data, distribute, plots
from core.checkpoints import Checkpointer
from core.config import Config
from core.controller import Controller, format_line
from core.errors import ConfigError
from core.summaries import Summaries
from core.trainer import Trainer
from layers.autoencoders import build_autoencoder

FIGURE = "reconstructions.png"


def prepare_model_dir(model_dir: str) -> None:
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ConfigError(f"--model_dir={model_dir} is a file: give a folder path")
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--model_dir={model_dir} cannot be created ({e.strerror}): "
                          "choose a folder you can write to") from None
    if not os.access(model_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--model_dir={model_dir} is not writable: choose a folder you can "
                          "write to or fix its permissions")


class Run:
    """Everything one invocation builds, in the order data flows (see DESIGN.md)."""

    def __init__(self, config: Config):
        self.config = config
        prepare_model_dir(config.model_dir)
        self.strategy = distribute.make_strategy(config.strategy, config.num_cpu_devices)
        distribute.check_batch(self.strategy, config.batch_size)
        self.is_chief = distribute.is_chief(self.strategy)
        # Every worker runs the same collectives (saves and summaries included);
        # only the chief's land in --model_dir, the others' in a temporary dir.
        self.output_dir = config.model_dir if self.is_chief else tempfile.mkdtemp(
            prefix=f"tapeloop-{distribute.task_id(self.strategy)}-")
        self.precision = (config.precision if config.precision != "auto" else
                          distribute.default_precision(distribute.gpu_compute_capability()))
        self.jit_compile = (False if config.eager else config.jit_compile
                            if config.jit_compile is not None else distribute.default_jit_compile())
        load = dict(dataset=config.dataset, data_dir=config.data_dir,
                    verify=config.verify_checksums, synthetic_shape=config.synthetic_shape)
        self.eval_split = data.load_split(config.eval_split, **load)
        self.train_split = (data.load_split(config.train_split, **load)
                            if config.mode != "eval" else None)
        image_shape = self.eval_split.image_shape
        device_images = None
        if config.data_on_device and self.train_split is not None:
            device_images = self.train_split.images
            size_mb = device_images.nbytes / 2**20
            if size_mb > config.data_on_device_max_mb:
                raise ConfigError(
                    f"--data_on_device: the training split is {size_mb:,.1f} MB per device, over "
                    f"--data_on_device_max_mb={config.data_on_device_max_mb}: raise the limit if "
                    "the device has room, or drop --data_on_device")
        # Weight initialisation follows --seed too: runs are repeatable, and every
        # replica count or worker count starts from the same weights.
        tf.keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            model = build_autoencoder(
                config.model, image_shape, self.precision, config.encoder_filters,
                config.decoder_filters, config.kernel_size)
            self.trainer = Trainer(
                model, self.strategy, config.batch_size, config.learning_rate,
                self.precision, self.jit_compile, config.eager, device_images, config.seed)
        self.checkpointer = Checkpointer(self.output_dir, self.trainer, config.keep_checkpoints,
                                         restore_dir=config.model_dir)
        self.summaries = Summaries(self.output_dir)
        logging.info(
            "model %s (%s parameters, code %s) | %s | %d replica(s) | precision %s | jit_compile %s",
            config.model, f"{model.count_params():,}", tuple(model.encode(
                tf.zeros((1, *image_shape))).shape[1:]), type(self.strategy).__name__,
            self.strategy.num_replicas_in_sync, self.precision, self.jit_compile)

    # ------------------------------------------------------------------ eval
    def evaluate(self, step: int) -> dict[str, float]:
        """Metrics over the whole eval split, written to TensorBoard with an image grid."""
        cfg = self.config
        dist = self.strategy.distribute_datasets_from_function(
            lambda ctx: data.eval_dataset(self.eval_split.images, cfg.batch_size, ctx))
        results = self.trainer.evaluate(dist)
        logging.info(format_line("eval", step=step, **{k: v for k, v in results.items()}))
        self.summaries.scalars("eval", step, {
            "loss": results["bce"], "mse": results["mse"], "psnr": results["psnr"],
            "ssim": results["ssim"]})
        inputs, recon = self.examples()
        self.summaries.image_rows("eval", step, "reconstructions", [inputs, recon],
                                  "top: test inputs; bottom: their reconstructions")
        self.summaries.flush()
        return results

    def examples(self) -> tuple[np.ndarray, np.ndarray]:
        """The first `num_images` eval inputs and their reconstructions, in [0, 1]."""
        inputs = data.to_float(self.eval_split.images[: self.config.num_images])
        recon = self.trainer.model.reconstruct(inputs, training=False)
        return inputs.numpy(), np.asarray(recon, np.float32)

    def figure(self, step: int) -> str:
        inputs, recon = self.examples()
        path = os.path.join(self.config.model_dir, FIGURE)
        plots.reconstruction_grid(
            path, [inputs, recon], ["input", "reconstruction"],
            f"{self.config.model} on {self.config.dataset} {self.config.eval_split}, step {step}")
        logging.info("wrote %s", path)
        return path

    # ----------------------------------------------------------------- modes
    def train(self) -> dict:
        cfg = self.config
        start = self.checkpointer.restore()
        n = self.train_split.num_examples
        steps_per_epoch = n // cfg.batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"--batch_size={cfg.batch_size} is larger than the training split "
                              f"({n} examples): lower it")
        total = cfg.train_steps or cfg.epochs * steps_per_epoch
        if self.is_chief:
            with open(os.path.join(cfg.model_dir, "config.json"), "w") as f:
                f.write(cfg.to_json())
        if start:
            logging.info("resuming from step %d towards %d", start, total)
        iterator = None
        if not self.trainer.device_data:
            iterator = iter(self.strategy.distribute_datasets_from_function(
                lambda ctx: data.train_dataset(
                    self.train_split.images, cfg.batch_size, cfg.seed, start, ctx)))
        evaluate = self.evaluate if cfg.mode == "train_and_eval" else None
        controller = Controller(
            self.trainer, iterator, total, steps_per_epoch, cfg.steps_per_loop, cfg.log_every,
            cfg.eval_every or steps_per_epoch, evaluate, self.checkpointer, self.summaries)
        step = controller.train()
        if self.is_chief:
            self.figure(step)
        return {"step": step, "history": controller.history}

    def eval(self) -> dict:
        cfg = self.config
        step = self.checkpointer.restore()
        if not step:
            raise ConfigError(f"--mode=eval found no checkpoint in --model_dir={cfg.model_dir}: "
                              "train first, or point --model_dir at a trained run")
        results = self.evaluate(step)
        if self.is_chief:
            with open(os.path.join(cfg.model_dir, "eval_results.json"), "w") as f:
                json.dump({"step": step, "split": cfg.eval_split, **results}, f, indent=2)
            self.figure(step)
        return {"step": step, **results}


def run(config: Config) -> dict:
    """Runs `config.mode`; returns {'step': ..., ...metrics or history}."""
    run = Run(config)
    try:
        if config.mode == "eval":
            return run.eval()
        return run.train()
    finally:
        run.summaries.close()
        if not run.is_chief:
            shutil.rmtree(run.output_dir, ignore_errors=True)
            logging.info("removed this worker's temporary dir %s", run.output_dir)
