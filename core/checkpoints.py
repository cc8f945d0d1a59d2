"""Checkpoints in the model dir: model, optimizer slots and the global step."""

from __future__ import annotations

from absl import logging
import tensorflow as tf


class Checkpointer:
    """A `tf.train.CheckpointManager` over the trainer's state, numbered by global step."""

    def __init__(self, model_dir: str, trainer, keep: int = 3, restore_dir: str | None = None):
        """Saves into `model_dir`; restores from `restore_dir` (default `model_dir`).

        Multi-worker non-chief workers save into a temporary dir that is thrown
        away, but restore from the chief's, so every worker resumes at one step.
        """
        self.trainer = trainer
        self.restore_dir = restore_dir or model_dir
        self.checkpoint = tf.train.Checkpoint(
            model=trainer.model, optimizer=trainer.optimizer, step=trainer.step)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, model_dir, max_to_keep=keep, step_counter=trainer.step)

    @property
    def latest(self) -> str | None:
        return self.manager.latest_checkpoint

    def restore(self, path: str | None = None) -> int:
        """Restores `path` (default: the latest); returns the restored step, 0 if none."""
        path = path or tf.train.latest_checkpoint(self.restore_dir)
        if not path:
            return 0
        # Every saved object must land on a live one: a partial restore would
        # silently train from a mix of old and fresh weights.
        self.checkpoint.restore(path).assert_existing_objects_matched()
        step = int(self.trainer.step.numpy())
        logging.info("restored %s (step %d)", path, step)
        return step

    def save(self) -> str:
        step = int(self.trainer.step.numpy())
        if self.latest and self.latest.endswith(f"-{step}"):
            return self.latest  # already saved at this step
        path = self.manager.save(checkpoint_number=step)
        logging.info("saved checkpoint %s", path)
        return path
