"""`run(config)`: builds strategy, data, model, trainer and controller, and runs a mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile

from absl import logging
import numpy as np
import tensorflow as tf

from core import checkpoints, data, distribute, plots, summaries as summaries_lib
from core.checkpoints import Checkpointer, ModelDirLock
from core.config import Config
from core.controller import Controller, format_line
from core.errors import ConfigError
from core.summaries import Summaries
from core.trainer import Trainer
from layers.autoencoders import build_autoencoder

FIGURES = {
    "reconstructions": "reconstructions.png",
    "curves": "curves.png",
    "latent": "latent_space.png",
    "interpolation": "interpolation.png",
    "samples": "vae_samples.png",
}


def prepare_model_dir(model_dir: str) -> None:
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ConfigError(f"--model_dir={model_dir} is a file: give a folder path")
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--model_dir={model_dir} cannot be created ({e.strerror}): "
                          "choose a folder you can write to") from None
    probe = os.path.join(model_dir, f".write-test-{os.getpid()}")
    try:  # os.access says yes to root even on read-only mounts: try it
        with open(probe, "w") as f:
            f.write("x")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--model_dir={model_dir} is not writable ({e.strerror}): choose a "
                          "folder you can write to or fix its permissions") from None


class StopSignals:
    """First SIGTERM/SIGINT: finish the current loop, checkpoint, exit 75. Second: exit now.

    A second signal can cut a checkpoint save short; the next run removes such a
    partial save (`Checkpointer.remove_orphans`) and resumes from the last complete one.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received:
            logging.warning("second signal (%s): exiting now", name)
            os._exit(128 + signum)
        self.received = name
        logging.warning("%s received: finishing the current loop, then saving a checkpoint "
                        "(send it again to exit at once)", name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> str | None:
        return self.received


class Run:
    """Everything one invocation builds, in the order data flows (see DESIGN.md)."""

    def __init__(self, config: Config):
        self.config = config
        if config.deterministic:
            # Before any op runs. With --seed this makes a run's weights a function of
            # its config: a resumed run ends bit-identical to an uninterrupted one.
            tf.config.experimental.enable_op_determinism()
        distribute.set_cpu_threads(config.num_intra_threads, config.num_inter_threads)
        self.strategy = distribute.make_strategy(config.strategy, config.num_cpu_devices)
        distribute.check_batch(self.strategy, config.batch_size, config.batch_shards)
        prepare_model_dir(config.model_dir)  # after every check that needs no files
        self.is_chief = distribute.is_chief(self.strategy)
        self.lock = ModelDirLock(config.model_dir) if self.is_chief else None
        if self.lock:
            self.lock.acquire()
        try:
            self._build()
        except BaseException:
            if self.lock:
                self.lock.release()
            raise

    def _build(self) -> None:
        config = self.config
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
                            if config.mode in ("train", "train_and_eval") else None)
        self.image_shape = self.eval_split.image_shape
        self.saved_config = {**config.to_dict(), "image_shape": list(self.image_shape),
                             "loss_scaling": self.precision == "mixed_float16"}
        if config.mode != "export" or config.checkpoint is None:
            checkpoints.check_compatible(config.model_dir, self.saved_config)
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
                config.model, self.image_shape, self.precision, config.encoder_filters,
                config.decoder_filters, config.kernel_size, config.latent_dim, config.kl_weight)
            self.trainer = Trainer(
                model, self.strategy, config.batch_size, config.learning_rate,
                self.precision, self.jit_compile, config.eager, device_images, config.seed,
                config.noise_factor, batch_shards=config.batch_shards)
        # Denoising: one fixed noisy copy of the eval split, the same at every evaluation.
        self.noisy_eval = (data.noisy_copy(self.eval_split.images, config.noise_factor, config.seed)
                           if config.noise_factor else None)
        self.checkpointer = Checkpointer(self.output_dir, self.trainer, config.keep_checkpoints,
                                         restore_dir=config.model_dir)
        self.summaries = Summaries(self.output_dir)
        self.code_shape = tuple(model.encode(tf.zeros((1, *self.image_shape))).shape[1:])
        logging.info(
            "model %s (%s parameters, code %s) | %s | %d replica(s) x %d shard(s) | precision %s | "
            "jit_compile %s | threads intra %s, inter %s",
            config.model, f"{model.count_params():,}", self.code_shape,
            type(self.strategy).__name__, self.strategy.num_replicas_in_sync, config.batch_shards,
            self.precision, self.jit_compile,
            tf.config.threading.get_intra_op_parallelism_threads() or "auto",
            tf.config.threading.get_inter_op_parallelism_threads() or "auto")

    # ------------------------------------------------------------------ eval
    def evaluate(self, step: int) -> dict[str, float]:
        """Metrics over the whole eval split, written to TensorBoard with an image grid."""
        cfg = self.config
        dist = self.strategy.distribute_datasets_from_function(
            lambda ctx: data.eval_dataset(self.eval_split.images, cfg.batch_size, ctx,
                                          self.noisy_eval))
        results = self.trainer.evaluate(dist)
        logging.info(format_line("eval", step=step, **results))
        self.summaries.scalars("eval", step, {
            "loss" if k == "bce" else k: v for k, v in results.items()})
        rows, labels = self.examples()
        self.summaries.image_rows("eval", step, "reconstructions", rows,
                                  "rows, top to bottom: " + ", ".join(labels))
        self.summaries.flush()
        return results

    def examples(self) -> tuple[list[np.ndarray], list[str]]:
        """Rows of the first `num_images` eval examples, in [0, 1], and their names: inputs
        and reconstructions; noisy inputs, denoised and clean images for a denoiser."""
        n = self.config.num_images
        clean = data.to_float(self.eval_split.images[:n]).numpy()
        if self.noisy_eval is None:
            recon = self.trainer.model.reconstruct(clean, training=False)
            return [clean, np.asarray(recon, np.float32)], ["input", "reconstruction"]
        noisy = self.noisy_eval[:n]
        denoised = np.asarray(self.trainer.model.reconstruct(noisy, training=False), np.float32)
        return [noisy, denoised, clean], ["noisy input", "denoised", "clean"]

    def figures(self, step: int) -> list[str]:
        """Writes every figure into the model dir; returns their paths."""
        cfg, model = self.config, self.trainer.model
        where = f"{cfg.model} on {cfg.dataset} {cfg.eval_split}, step {step}"
        out = os.path.join(cfg.model_dir, "{}")
        rows, labels = self.examples()
        inputs = rows[-1] if self.noisy_eval is not None else rows[0]  # clean images
        paths = [plots.reconstruction_grid(out.format(FIGURES["reconstructions"]), rows, labels,
                                           where)]
        train_curve = summaries_lib.read_scalars(os.path.join(cfg.model_dir, "train"), "loss")
        eval_curve = summaries_lib.read_scalars(os.path.join(cfg.model_dir, "eval"), "loss")
        if train_curve or eval_curve:
            paths.append(plots.training_curves(out.format(FIGURES["curves"]), train_curve,
                                               eval_curve, f"{cfg.model} on {cfg.dataset}"))
        sample = data.to_float(self.eval_split.images[:2000])
        codes = np.concatenate([np.asarray(model.encode(sample[i:i + 500], training=False),
                                           np.float32) for i in range(0, len(sample), 500)])
        if not np.isfinite(codes).all():
            logging.warning("the codes contain NaN/Inf: skipping the latent-space and "
                            "interpolation figures")
            return paths
        if self.eval_split.labels is not None:
            paths.append(plots.latent_space(
                out.format(FIGURES["latent"]), codes, self.eval_split.labels[:2000],
                f"codes of {len(codes)} {cfg.eval_split} images (PCA), {where}"))
        labels = self.eval_split.labels
        a = 0
        b = (int(np.argmax(labels[:2000] != labels[0])) if labels is not None else 1) % len(codes)
        t = np.linspace(0.0, 1.0, 8, dtype=np.float32)[:, None]
        line = codes[a].reshape(1, -1) * (1 - t) + codes[b].reshape(1, -1) * t
        decoded = np.asarray(model.decode(line.reshape(-1, *self.code_shape), training=False))
        strip = np.concatenate([inputs[:1] if a == 0 else sample[a:a + 1].numpy(), decoded,
                                sample[b:b + 1].numpy()])
        paths.append(plots.interpolation_strip(
            out.format(FIGURES["interpolation"]), strip,
            f"decoding along the line between two test images' codes, {where}"))
        if getattr(model, "latent_dim", None) and hasattr(model, "moments"):  # a VAE
            prior = np.random.default_rng(cfg.seed).standard_normal(
                (2 * cfg.num_images, model.latent_dim)).astype(np.float32)
            samples = np.asarray(model.decode(prior, training=False))
            paths.append(plots.reconstruction_grid(
                out.format(FIGURES["samples"]), [samples[: cfg.num_images], samples[cfg.num_images:]],
                ["sample", "sample"], f"decoded from z ~ N(0, I), {where}"))
        logging.info("wrote %s", ", ".join(paths))
        return paths

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
        if start:
            logging.info("resuming from step %d towards %d", start, total)
            saved = checkpoints.saved_config(cfg.model_dir)
            if saved and saved.get("learning_rate") != cfg.learning_rate:
                self.trainer.set_learning_rate(cfg.learning_rate)  # the flag wins over the checkpoint
        if self.is_chief:
            with open(os.path.join(cfg.model_dir, checkpoints.CONFIG_FILE), "w") as f:
                json.dump(self.saved_config, f, indent=2, sort_keys=True)
            self.summaries.run_header(self.saved_config, start)

        def make_iterator(step):
            if self.trainer.device_data:
                return None
            return iter(self.strategy.distribute_datasets_from_function(
                lambda ctx: data.train_dataset(self.train_split.images, cfg.batch_size, cfg.seed,
                                               step, ctx)))

        evaluate = self.evaluate if cfg.mode == "train_and_eval" else None
        with StopSignals() as stop:
            controller = Controller(
                self.trainer, make_iterator, total, steps_per_epoch, cfg.steps_per_loop,
                cfg.log_every, cfg.eval_every or steps_per_epoch, evaluate, self.checkpointer,
                self.summaries, summary_every=cfg.summary_every or cfg.log_every,
                checkpoint_every_steps=cfg.checkpoint_every_steps,
                checkpoint_every_secs=cfg.checkpoint_every_secs,
                profile_steps=tuple(cfg.profile_steps) if cfg.profile_steps else None,
                profile_dir=os.path.join(self.output_dir, "train"), nan_policy=cfg.nan_policy,
                nan_max_retries=cfg.nan_max_retries, nan_lr_factor=cfg.nan_lr_factor,
                stop_requested=stop)
            step = controller.train()
        result = {"step": step, "history": controller.history}
        if self.is_chief:
            self.figures(step)
        return result

    def _restore_for_inference(self) -> int:
        cfg = self.config
        if cfg.checkpoint and not tf.io.gfile.exists(cfg.checkpoint + ".index"):
            raise ConfigError(f"--checkpoint={cfg.checkpoint} does not exist: give a path like "
                              f"{cfg.model_dir}/ckpt-1000 (without .index)")
        step = self.checkpointer.restore(cfg.checkpoint)
        if not step:
            raise ConfigError(f"--mode={cfg.mode} found no checkpoint in --model_dir={cfg.model_dir}: "
                              "train first, or point --model_dir at a trained run")
        return step

    def eval(self) -> dict:
        cfg = self.config
        step = self._restore_for_inference()
        results = self.evaluate(step)
        if self.is_chief:
            with open(os.path.join(cfg.model_dir, "eval_results.json"), "w") as f:
                json.dump({"step": step, "split": cfg.eval_split,
                           "checkpoint": cfg.checkpoint or self.checkpointer.latest, **results},
                          f, indent=2)
            self.figures(step)
        return {"step": step, **results}

    def export(self) -> dict:
        from core.export import export_saved_model

        step = self._restore_for_inference()
        path = os.path.join(self.config.model_dir, "export", str(step))
        if os.path.exists(path):
            shutil.rmtree(path)
        export_saved_model(self.trainer.model, self.image_shape, path)
        logging.info("exported SavedModel with signatures encode, decode, reconstruct to %s", path)
        return {"step": step, "export_dir": path}


def run(config: Config) -> dict:
    """Runs `config.mode`; returns {'step': ..., ...metrics, history or export dir}."""
    run = Run(config)
    try:
        if config.mode == "eval":
            return run.eval()
        if config.mode == "export":
            return run.export()
        return run.train()
    finally:
        run.summaries.close()
        if run.lock:
            run.lock.release()
        if not run.is_chief:
            shutil.rmtree(run.output_dir, ignore_errors=True)
            logging.info("removed this worker's temporary dir %s", run.output_dir)
