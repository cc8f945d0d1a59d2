"""Checkpoints in the model dir, the model-dir lock, and config compatibility on resume."""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import re
import socket

from absl import logging
import tensorflow as tf

from core.errors import CheckpointError, ConfigError

# Fields that change the model's variables: a resume that changes one cannot restore.
MODEL_FIELDS = ("model", "encoder_filters", "decoder_filters", "kernel_size", "image_shape",
                "loss_scaling", "latent_dim")
CONFIG_FILE = "config.json"


class Checkpointer:
    """A `tf.train.CheckpointManager` over the trainer's state, numbered by global step.

    Saves go to `model_dir`; restores come from `restore_dir` (default `model_dir`):
    multi-worker non-chief workers save into a temporary dir that is thrown away,
    but restore from the chief's, so every worker resumes at one step.
    """

    def __init__(self, model_dir: str, trainer, keep: int = 3, restore_dir: str | None = None):
        self.trainer = trainer
        self.model_dir = model_dir
        self.restore_dir = restore_dir or model_dir
        self.checkpoint = tf.train.Checkpoint(
            model=trainer.model, optimizer=trainer.optimizer, step=trainer.step)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, model_dir, max_to_keep=keep, step_counter=trainer.step)
        self.remove_orphans()

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def remove_orphans(self) -> None:
        """Deletes checkpoint files newer than the last complete checkpoint.

        TensorFlow writes the data and index files first and the `checkpoint`
        state file last, so files of a higher number than the state names are a
        save that was cut off (killed, disk full): never readable, only confusing.
        """
        latest = self.manager.latest_checkpoint
        newest = int(latest.rsplit("-", 1)[1]) if latest else -1
        for path in glob.glob(os.path.join(self.model_dir, "ckpt-*")):
            m = re.match(r"ckpt-(\d+)\.", os.path.basename(path))
            if m and int(m.group(1)) > newest:
                logging.warning("removing %s, left by a checkpoint save that did not finish", path)
                os.remove(path)
        for path in glob.glob(os.path.join(self.model_dir, "*.tempstate*")):
            os.remove(path)

    def restore(self, path: str | None = None) -> int:
        """Restores `path` (default: the latest); returns the restored step, 0 if none.

        Raises:
          CheckpointError: the checkpoint is missing, unreadable, or does not match the model.
        """
        path = path or tf.train.latest_checkpoint(self.restore_dir)
        if not path:
            state = os.path.join(self.restore_dir, "checkpoint")
            if os.path.exists(state):
                raise CheckpointError(
                    f"{state} names a checkpoint whose files are missing: restore them, delete "
                    "the 'checkpoint' file to start over, or use a fresh --model_dir")
            return 0
        try:
            # Every saved object must land on a live one: a partial restore would
            # silently train from a mix of old and fresh weights.
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # a damaged file surfaces as OpError, IndexError, ValueError...
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {path} cannot be restored ({first}): if it is damaged, delete its "
                "files and the newest remaining checkpoint is used; or use a fresh --model_dir"
            ) from None
        step = int(self.trainer.step.numpy())
        logging.info("restored %s (step %d)", path, step)
        return step

    def save(self) -> str:
        """Saves at the current step (once per step); returns the checkpoint path.

        Raises:
          CheckpointError: the write failed (disk full, permissions); the previous
            checkpoint stays the latest and readable.
        """
        step = int(self.trainer.step.numpy())
        if self.latest and self.latest.endswith(f"-{step}"):
            return self.latest  # already saved at this step
        try:
            path = self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            self.remove_orphans()
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:160]
            raise CheckpointError(
                f"could not write the checkpoint at step {step} in {self.model_dir} ({reason}): "
                f"free space or fix permissions, then rerun to resume from "
                f"{self.latest or 'the start'}, which is intact") from None
        logging.info("saved checkpoint %s", path)
        return path


class ModelDirLock:
    """One live run per model dir: an exclusive flock on `<model_dir>/.lock`.

    The kernel releases a flock when its process dies, however it dies, so a lock
    file left by a crashed run is free to take; we say so in the log.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, ".lock")
        self.fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"--model_dir={os.path.dirname(self.path)} is in use by a live run ({holder}): "
                "wait for it to finish, stop it, or choose another --model_dir") from None
        previous = os.read(fd, 200).decode(errors="replace").strip()
        if previous:
            logging.warning("taking over the stale lock of a run that ended without releasing "
                            "it (%s)", previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file: this run ended cleanly
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def saved_config(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}): restore it or use a fresh --model_dir"
                              ) from None


def check_compatible(model_dir: str, current: dict) -> None:
    """Compares the run's config with the one saved in `model_dir`, if any.

    Raises:
      ConfigError: a field that shapes the model's variables differs (listing them all).
    """
    saved = saved_config(model_dir)
    if saved is None or not tf.train.latest_checkpoint(model_dir):
        return

    def norm(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    incompatible = [f"{k}: {norm(saved.get(k))!r} -> {norm(current.get(k))!r}" for k in MODEL_FIELDS
                    if norm(saved.get(k)) != norm(current.get(k))]
    if incompatible:
        raise ConfigError(
            f"--model_dir={model_dir} holds a different model ({'; '.join(incompatible)}): use the "
            "saved settings to resume, or a fresh --model_dir for the new model")
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in MODEL_FIELDS and norm(saved.get(k)) != norm(current.get(k)))
    for key in changed:
        logging.info("resuming with %s changed: %r -> %r", key, saved.get(key), current.get(key))
