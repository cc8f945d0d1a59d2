"""Checkpoints in the model dir, the model-dir lock, and config compatibility on resume.

Two rules keep checkpoints safe:
- Read-only modes (`--mode=eval`, `--mode=export`) use `Checkpointer(..., read_only=True)`,
  which has no `tf.train.CheckpointManager` and never writes or deletes a file.
- After a cut-off save, only what is provably that save is removed: TensorFlow's temporary
  files, and checkpoint files numbered above the `checkpoint` state file's newest entry that
  do not read back. Without a state file nothing is removed; an unreadable state file is
  an error that deletes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import glob
import json
import logging as std_logging
import os
import re
import socket
import threading
import time
import uuid

from absl import logging
from google.protobuf import text_format
import tensorflow as tf
from tensorflow.python.training.checkpoint_state_pb2 import CheckpointState

from core.errors import (CheckpointError, ConfigError, ModelMismatch, WriteError, first_line,
                         write_reason)
from core.process import WRITE_ERRORS, write_file

# Fields that change the model's variables: a resume that changes one cannot restore.
MODEL_FIELDS = ("model", "encoder_filters", "decoder_filters", "kernel_size", "image_shape",
                "latent_dim", "blocks_per_stage", "latent_channels")
# Fields that change the optimizer's variables: a resume cannot restore across them either
# (eval and export read no optimizer state and ignore them).
OPTIMIZER_FIELDS = ("optimizer", "freeze")  # --freeze: which weights the optimizer holds
# What a field read in a config.json written before it existed: the behaviour of then.
_IMPLIED = {"freeze": "none"}
# Fields that name the training data: a resume may change them (fine-tuning), but more
# often the command meant a new run and forgot --model_dir, so it says so loudly.
DATA_FIELDS = ("dataset", "data_dir", "image_feature", "train_split")
CONFIG_FILE = "config.json"
BEST_DIR = "best"  # --keep_best: the best checkpoint, apart from the rolling ones
BEST_FILE = "best.json"  # in BEST_DIR: the metric, its best value and step, evals since,
# and the step of the evaluation that wrote it
STATE_FILE = "checkpoint"
_CKPT_RE = re.compile(r"^ckpt-(\d+)(?:\.index|\.data-\d+-of-\d+)$")


def checkpoint_step(path: str) -> int:
    """'DIR/ckpt-1170' -> 1170."""
    return int(path.rsplit("-", 1)[1])


def read_state(directory: str) -> CheckpointState | None:
    """The parsed `checkpoint` state file of `directory`, or None if there is none.

    Unlike `tf.train.get_checkpoint_state`, which logs a warning and returns None for
    a damaged file, this raises: a damaged state file must never look like "no
    checkpoints", or a cleanup would treat every checkpoint as an orphan.

    Raises:
      CheckpointError: the file exists but cannot be read or parsed.
    """
    path = os.path.join(directory, STATE_FILE)
    if not tf.io.gfile.exists(path):
        return None
    state = CheckpointState()
    try:
        text_format.Merge(tf.io.gfile.GFile(path, "r").read(), state)
        if not state.model_checkpoint_path:
            raise ValueError("it names no checkpoint")
    except (tf.errors.OpError, text_format.ParseError, ValueError, UnicodeDecodeError) as e:
        reason = first_line(e, 120)
        raise CheckpointError(_denied(path, reason) or
            f"{path} is unreadable ({reason}): nothing was deleted; restore the file, or move "
            "it away and the newest checkpoint is found by its files") from None
    for i, name in enumerate(state.all_model_checkpoint_paths):
        if not os.path.isabs(name) and "://" not in name:
            state.all_model_checkpoint_paths[i] = os.path.join(directory, name)
    if not os.path.isabs(state.model_checkpoint_path) and "://" not in state.model_checkpoint_path:
        state.model_checkpoint_path = os.path.join(directory, state.model_checkpoint_path)
    return state


def checkpoints_on_disk(directory: str) -> list[str]:
    """Prefixes of the checkpoints with an index file in `directory`, oldest first."""
    if not tf.io.gfile.isdir(directory):
        return []
    steps = sorted({int(m.group(1)) for name in tf.io.gfile.listdir(directory)
                    if name.endswith(".index") and (m := _CKPT_RE.match(name.rstrip("/")))})
    return [os.path.join(directory, f"ckpt-{s}") for s in steps]


def run_of(checkpoint_path: str) -> str:
    """The run folder a checkpoint is of, whose config.json describes it: the checkpoint's
    folder, or the run's above --keep_best's `best/ckpt-N`."""
    folder = os.path.dirname(checkpoint_path.rstrip("/"))
    if (os.path.basename(folder) == BEST_DIR
            and not tf.io.gfile.exists(os.path.join(folder, CONFIG_FILE))):
        return os.path.dirname(folder)
    return folder


def _denied(what: str, reason: str) -> str | None:
    """The line for `what`, a file or checkpoint of the run that this user may not read
    (another user's, a mount's): its permissions are the fault, not its contents."""
    if "Permission denied" not in reason:
        return None
    return f"{what} is not readable ({reason}): fix its permissions; nothing was changed"


def readable(prefix: str) -> bool:
    """Whether every tensor of checkpoint `prefix` reads back (index and data intact)."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
        return True
    except Exception:  # noqa: BLE001 - any failure to read means "not a whole checkpoint"
        return False


def _prefix_of(path: str) -> str:
    """A checkpoint's prefix from the prefix itself or one of its files."""
    return re.sub(r"\.(index|data-\d+-of-\d+)$", "", path)


def resolve_path(path: str, flag: str = "--checkpoint", model_dir: str | None = None) -> str:
    """The checkpoint prefix a user meant: 'D/ckpt-9', 'D/ckpt-9.index', 'D/ckpt-9.data-...'
    or a folder (its latest checkpoint). With `model_dir`, a relative path that is nothing
    here ('ckpt-9', 'ckpt-9.index', the step '9', or 'best/ckpt-12', as the log names
    `--keep_best`'s) is that checkpoint of `model_dir`.

    Raises:
      ConfigError: nothing there is a checkpoint.
    """
    path = path.rstrip("/")
    relative = not os.path.isabs(path) and "://" not in path
    if model_dir and relative and not tf.io.gfile.exists(_prefix_of(path) + ".index") \
            and not tf.io.gfile.exists(path):
        name = f"ckpt-{path}" if path.isdigit() else path
        prefix = _prefix_of(os.path.join(model_dir, name))
        if tf.io.gfile.exists(prefix + ".index"):
            logging.info("%s=%s: the checkpoint %s of --model_dir", flag, path, prefix)
            return prefix
        have = [os.path.basename(p) for p in checkpoints_on_disk(model_dir)]
        if have and "/" not in path:
            shown = ", ".join(have if len(have) <= 6 else [*have[:2], "...", *have[-3:]])
            raise ConfigError(f"{flag}={path} is neither a path here nor a checkpoint of "
                              f"--model_dir={model_dir}, which has {shown}: give one of those "
                              f"(e.g. {flag}={have[-1]}) or a path like DIR/ckpt-1000")
    if tf.io.gfile.isdir(path):
        state = read_state(path)
        found = state.model_checkpoint_path if state else (checkpoints_on_disk(path) or [None])[-1]
        if found:
            return found
        run = _run_above(path)
        give = (f"give the run's folder, {flag}={run} (its latest checkpoint), or one of its "
                f"ckpt-* checkpoints" if run else
                "give the run's folder or one of its ckpt-* checkpoints (DIR/ckpt-1000)")
        if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
            raise ConfigError(f"{flag}={path} is a SavedModel export, not a training "
                              f"checkpoint: {give}")
        if run:
            raise ConfigError(f"{flag}={path} is a folder inside the run {run}, without "
                              f"checkpoints: {give}")
        raise ConfigError(f"{flag}={path} is a folder without checkpoints: give a "
                          "path like DIR/ckpt-1000, or a folder that holds ckpt-* files")
    prefix = _prefix_of(path)
    if not tf.io.gfile.exists(prefix + ".index"):
        what = "is not a TensorFlow checkpoint" if tf.io.gfile.exists(path) else "does not exist"
        raise ConfigError(f"{flag}={path} {what}: give a path like "
                          "DIR/ckpt-1000 (with or without .index), or a folder")
    return prefix


def _run_above(path: str) -> str | None:
    """The run folder one or two levels above `path` (its `export/`, `export/20`, `train/`
    or `best/`... folder, which a user may name for the run), or None."""
    for _ in range(2):
        parent = os.path.dirname(path)
        if not parent or parent == path or parent.endswith(":") or parent.endswith(":/"):
            return None
        path = parent
        if tf.io.gfile.exists(os.path.join(path, STATE_FILE)) or checkpoints_on_disk(path):
            return path
    return None


@contextlib.contextmanager
def _unrestored_values_unlogged():
    """A read that fails leaves restore objects that log, when collected, every value of the
    checkpoint they did not read: one line is the error, not those after it. Collects them
    here, with TensorFlow's warnings off."""
    tensorflow_log = std_logging.getLogger("tensorflow")
    level = tensorflow_log.level
    tensorflow_log.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        gc.collect()
        tensorflow_log.setLevel(level)


def initialise(model, path: str, modules: str = "all", average: bool = True,
               advice: str | None = None) -> tuple[str, bool]:
    """Reads the weights of `model` ('all'), or of its 'encoder' or 'decoder', from the
    checkpoint `path` (a prefix, one of its files, or a folder: its latest), and nothing
    else of it: not the optimizer, the step or the random states. With `average`, the
    trainable weights come from the checkpoint's weight average where it has one (what its
    run evaluates and exports with --ema_decay). Returns (the prefix read, whether the
    average was). Only reads.

    `advice`: what the error says to do when the checkpoint does not hold the model (None:
    give its model flags, or --init_modules).

    Raises:
      ConfigError: no checkpoint there, or it does not hold every variable of that part of
        `model` with the same shape.
    """
    flag = f"--init_checkpoint={path}"
    prefix = resolve_path(path, "--init_checkpoint")
    with _unrestored_values_unlogged():
        failure = _read_model(model, prefix, modules)
    if failure is not None:
        what = "model" if modules == "all" else modules
        if not readable(prefix):
            raise ConfigError(_denied(f"{flag}: {prefix}", failure) or
                              f"{flag}: {prefix} is damaged: its files do not read back "
                              f"({first_line(failure)}): give another checkpoint")
        raise ConfigError(f"{flag}: {prefix} does not hold this {what} ({_short(failure)}): "
                          + (advice or "give the model flags it was trained with (its "
                             "config.json), or --init_modules for the part that matches"))
    return prefix, average and _read_average(model, prefix, modules)


def _read_average(model, prefix: str, modules: str) -> bool:
    """Puts the checkpoint's weight average (`ema/`) into the trainable weights of `model`
    or its part; False (nothing read) if it has none for them, or it does not line up.

    The average is a list in the order of the source model's `trainable_variables` (the
    trainer's `ema`): the encoder's come first and the decoder's last. A source trained
    with --freeze averaged only the part it trained (its frozen part's weights are their
    own average), so the list is the whole model's, the encoder's or the decoder's: the
    first of those its length and shapes match. Only what `modules` names is read."""
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    shapes = reader.get_variable_to_shape_map()
    keys = sorted((k for k in shapes if re.fullmatch(r"ema/\d+/\.ATTRIBUTES/VARIABLE_VALUE", k)),
                  key=lambda k: int(k.split("/")[1]))
    if not keys:
        return False
    spans = (model.trainable_variables, model.encoder.trainable_variables,
             model.decoder.trainable_variables)
    span = next((variables for variables in spans if len(variables) == len(keys) and all(
        tuple(shapes[k]) == tuple(v.shape) for k, v in zip(keys, variables))), None)
    if span is None:
        logging.warning("%s's weight average does not line up with this model's weights: "
                        "reading its raw weights", prefix)
        return False
    wanted = {id(v) for v in (model if modules == "all" else getattr(model, modules)).weights}
    chosen = [(key, v) for key, v in zip(keys, span) if id(v) in wanted]
    for key, variable in chosen:
        variable.assign(reader.get_tensor(key).astype(variable.dtype))
    return bool(chosen)


def _read_model(model, prefix: str, modules: str) -> str | None:
    """`initialise`'s read; the first line of its error, or None."""
    try:
        view = _model_as_saved(model, tf.compat.v1.train.NewCheckpointReader(prefix))
        part = view if modules == "all" else tf.train.Checkpoint(**{modules: getattr(view, modules)})
        status = tf.train.Checkpoint(model=part).read(prefix)
        status.expect_partial()  # the optimizer, the step and the rest are not read
        status.assert_existing_objects_matched()  # but every variable of `part` is
    except Exception as e:  # noqa: BLE001 - a missing or misshapen variable, or damage
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _short(message: str) -> str:
    """TensorFlow's restore errors, cut to what names the variable and the shapes."""
    shapes = re.search(r"incompatible tensor with shape (\([^)]*\)) when attempting to "
                       r"restore variable with shape (\([^)]*\)) and name (\S+?)\.?$", message)
    if shapes:
        saved, ours, name = shapes.groups()
        return f"{name.removesuffix(':0')} has shape {ours} here, {saved} in the checkpoint"
    unbound = re.search(r"Found (\d+) Python objects that were not bound.*?path=([^,\s]+)",
                        message)
    if unbound:
        return f"{unbound.group(1)} of its variables are not there, e.g. {unbound.group(2)}"
    return first_line(message)


class Checkpointer:
    """The trainer's state in `model_dir`, numbered by global step.

    Saves go to `model_dir`; restores come from `restore_dir` (default `model_dir`):
    multi-worker non-chief workers save into a temporary dir that is thrown away,
    but restore from the chief's, so every worker resumes at one step.

    Args:
      model_dir: where checkpoints are saved.
      trainer: has `model`, `optimizer` and the int64 `step` variable.
      keep: how many checkpoints to keep.
      restore_dir: where the latest checkpoint is looked up (default `model_dir`).
      read_only: restore only (eval, export): the model and the step, never a write or a
        delete, and no optimizer state is needed.
    """

    def __init__(self, model_dir: str, trainer, keep: int = 3, restore_dir: str | None = None,
                 read_only: bool = False):
        self.trainer = trainer
        self.model_dir = model_dir
        self.restore_dir = restore_dir or model_dir
        self.read_only = read_only
        extra = {"ema": trainer.ema} if getattr(trainer, "ema", None) else {}
        # Your own model's random layers (Dropout, ...): their seed generators' states,
        # which Keras keeps beside the weights, not in them.
        self.random = list(getattr(trainer.model, "random_states", ()))
        extra |= {"random": self.random} if self.random else {}
        if read_only:
            self.checkpoint = tf.train.Checkpoint(model=trainer.model, step=trainer.step, **extra)
            self.manager = None
            return
        self.checkpoint = tf.train.Checkpoint(
            model=trainer.model, optimizer=trainer.optimizer, step=trainer.step, **extra)
        self.remove_orphans()  # before the manager reads the state
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, model_dir, max_to_keep=keep, step_counter=trainer.step)
        self._saved: str | None = None
        self._best_manager = None

    @property
    def latest(self) -> str | None:
        """The newest complete checkpoint: the state file's, else the newest by file name."""
        if self.manager is not None and self._saved:
            return self._saved
        state = read_state(self.restore_dir)
        if state is not None:
            return state.model_checkpoint_path
        found = checkpoints_on_disk(self.restore_dir)
        return found[-1] if found else None

    def remove_orphans(self, folder: str | None = None) -> None:
        """Removes what a save that was cut off (killed, disk full) left behind in the model
        dir (or `folder`, the best checkpoint's).

        TensorFlow writes a checkpoint's shards into `ckpt-N_temp/`, merges them into
        `ckpt-N.index` and `ckpt-N.data-*`, and writes the `checkpoint` state file
        last (through a `checkpoint.tmp*` file). So only these are provably left by a
        cut-off save: the temporary folder and state files, and files of a number
        above the state file's newest that do not read back. Complete newer ones (a
        save cut off just before the state file was written) are kept. With no state
        file, nothing is known to be cut off, and nothing is removed.
        """
        if self.read_only:
            raise RuntimeError("a read-only Checkpointer never deletes files")
        folder = folder or self.model_dir
        state = read_state(folder)
        if state is None:
            return
        newest = checkpoint_step(state.model_checkpoint_path)
        names = tf.io.gfile.listdir(folder)
        for name in names:
            name = name.rstrip("/")
            path = os.path.join(folder, name)
            if name.startswith(STATE_FILE + ".tmp") or (name.startswith("ckpt-")
                                                        and name.endswith("_temp")):
                logging.warning("removing %s, left by a checkpoint save that did not finish", path)
                if tf.io.gfile.isdir(path):
                    tf.io.gfile.rmtree(path)
                else:
                    tf.io.gfile.remove(path)
        newer = sorted({int(m.group(1)) for name in names
                        if (m := _CKPT_RE.match(name.rstrip("/"))) and int(m.group(1)) > newest})
        for step in newer:
            prefix = os.path.join(folder, f"ckpt-{step}")
            if readable(prefix):
                logging.warning("keeping %s: it is complete, but a save cut off before the state "
                                "file was updated left it out of %s/checkpoint", prefix, folder)
                continue
            for name in names:
                m = _CKPT_RE.match(name.rstrip("/"))
                if m and int(m.group(1)) == step:
                    logging.warning("removing %s, left by a checkpoint save that did not finish",
                                    os.path.join(folder, name))
                    tf.io.gfile.remove(os.path.join(folder, name))

    def _discard(self, folder: str, step: int) -> None:
        """Removes what this process's save of `step` into `folder` left when it failed:
        its `ckpt-STEP_temp/`, and its files if they do not read back, with or without a
        state file (a run's first save has none yet); then `remove_orphans`."""
        prefix = os.path.join(folder, f"ckpt-{step}")
        with contextlib.suppress(OSError, tf.errors.OpError):
            if tf.io.gfile.exists(prefix + "_temp"):
                tf.io.gfile.rmtree(prefix + "_temp")
            if not readable(prefix):
                for path in tf.io.gfile.glob(glob.escape(prefix) + ".*"):
                    tf.io.gfile.remove(path)
            self.remove_orphans(folder)

    def restore(self, path: str | None = None) -> int:
        """Restores `path` (default: the latest); returns the restored step, 0 if none.

        Raises:
          CheckpointError: the checkpoint is missing or damaged (a read proved it), or it
            holds a different model.
        """
        if path is None:
            path = self.latest
            if path is not None and read_state(self.restore_dir) is None:
                logging.warning("%s has no 'checkpoint' state file: using %s, the newest "
                                "checkpoint found by its files", self.restore_dir, path)
        if not path:
            return 0
        if not tf.io.gfile.exists(path + ".index"):
            raise CheckpointError(
                f"{self.restore_dir}/checkpoint names {path}, whose files are missing: restore "
                "them, or move the 'checkpoint' file away and the newest checkpoint left is "
                "used, or use a fresh --model_dir")
        failure = None
        with _unrestored_values_unlogged():
            try:
                status = self._matching(path).restore(path)
                # Every object of ours must get a saved value: a partial restore would
                # silently go on from a mix of old and fresh weights.
                status.assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 - damage surfaces as OpError, ValueError...
                failure = first_line(e)
        if failure is not None:
            if not readable(path):
                raise CheckpointError(_denied(f"checkpoint {path}", failure) or
                    f"checkpoint {path} is damaged: its files do not read back ({failure}); "
                    "move its files and the 'checkpoint' state file away and the newest "
                    "remaining checkpoint is used, or use a fresh --model_dir")
            if self.read_only:
                fix = ("the code that builds the model differs from the code that saved it "
                       "(your --model module, edited?), or the checkpoint is another run's: use "
                       "that code, or a --checkpoint of the run whose --model_dir this is")
            else:  # the flags matched its config.json: the code that builds the model differs
                fix = ("its config.json matches these flags, so the code that builds the model "
                       "differs from the code that saved it (your --model module, edited?): "
                       "resume with that code, or use a fresh --model_dir for this one")
            raise ModelMismatch(
                f"checkpoint {path} holds a different model or optimizer ({failure}): {fix}")
        # What the file holds beyond our objects (the optimizer's slots for an evaluation,
        # a weight average this run dropped) is left unread, without TensorFlow's warning
        # for each of its values.
        status.expect_partial()
        if self.ema_missing:
            logging.info("%s holds no weight average: --ema_decay starts it from its weights",
                         path)
            self.trainer.reset_ema()
        step = int(self.trainer.step.numpy())
        logging.info("restored %s (step %d)", path, step)
        return step

    def _matching(self, path: str) -> tf.train.Checkpoint:
        """The checkpoint object to restore `path` with: ours, or one that matches the
        file's layout where the run changed what it keeps.

        Under mixed_float16 the optimizer is Keras' LossScaleOptimizer, which holds Adam as
        `inner_optimizer`: a float16 checkpoint's Adam state lives under
        `optimizer/inner_optimizer/`. Precision is not a property of the model (auto is
        float16 on a V100, bfloat16 on an H100, float32 on a CPU), so Adam's state carries
        over both ways; a run that starts loss scaling starts at the initial scale.
        A run that turns on --ema_decay over a checkpoint without an average starts the
        average from the restored weights (`self.ema_missing`).
        """
        # The reader itself, not tf.train.list_variables: on ram:// (and object stores) a
        # checkpoint prefix also counts as a folder, which list_variables would search.
        reader = tf.compat.v1.train.NewCheckpointReader(path)
        names = list(reader.get_variable_to_shape_map())
        trainer = self.trainer
        parts = {"model": _model_as_saved(trainer.model, reader), "step": trainer.step}
        ema = getattr(trainer, "ema", None)
        self.ema_missing = bool(ema) and not any(n.startswith("ema/") for n in names)
        if ema and not self.ema_missing:
            parts["ema"] = ema
        if self.random and any(n.startswith("random/") for n in names):
            parts["random"] = self.random
        elif self.random and not self.read_only:
            logging.info("%s holds no state of the model's random layers (written before "
                         "tapeloop saved it): they go on from their initial seeds", path)
        if self.read_only:
            return tf.train.Checkpoint(**parts)
        saved_scaled = any(n.startswith("optimizer/inner_optimizer/") for n in names)
        optimizer = trainer.optimizer
        scaled = isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)
        if saved_scaled == scaled:
            parts["optimizer"] = optimizer
        elif saved_scaled:
            logging.info("%s was trained in mixed_float16: resuming without loss scaling, "
                         "with its Adam state", path)
            parts["optimizer"] = tf.train.Checkpoint(inner_optimizer=optimizer)
        else:
            logging.info("%s was trained without loss scaling: resuming in mixed_float16 with "
                         "its Adam state, from the initial loss scale", path)
            parts["optimizer"] = optimizer.inner_optimizer
        return tf.train.Checkpoint(**parts)

    # ------------------------------------------------------------------ best
    def read_best(self) -> dict | None:
        """The --keep_best record of the run ({metric, value, step, evals_since, evaluated_at,
        and with a best checkpoint its path}), or None."""
        path = os.path.join(self.restore_dir, BEST_DIR, BEST_FILE)
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return json.loads(f.read())

    def write_best(self, record: dict, save: bool) -> None:
        """Writes the record; with `save`, first the current state as the best checkpoint
        (one kept, in BEST_DIR), so the record never names a checkpoint not yet there."""
        folder = os.path.join(self.model_dir, BEST_DIR)
        if save:
            if self._best_manager is None:
                self._best_manager = tf.train.CheckpointManager(
                    self.checkpoint, folder, max_to_keep=1, step_counter=self.trainer.step)
            try:
                record["path"] = self._best_manager.save(checkpoint_number=record["step"])
            except WRITE_ERRORS as e:  # a full disk: the best before stays the best
                self._discard(folder, record["step"])
                raise WriteError(f"the best checkpoint at step {record['step']} in {folder}",
                                 write_reason(e)) from None
            logging.info("new best %s %.6g at step %d: saved %s", record["metric"],
                         record["value"], record["step"], record["path"])
        tf.io.gfile.makedirs(folder)
        write_file(os.path.join(folder, BEST_FILE), json.dumps(record, indent=2))

    def save(self) -> str:
        """Saves at the current step (once per step); returns the checkpoint path.

        Raises:
          CheckpointError: the write failed (disk full, permissions); the previous
            checkpoint stays the latest and readable.
        """
        if self.read_only:
            raise RuntimeError("a read-only Checkpointer never saves")
        step = int(self.trainer.step.numpy())
        if self.manager.latest_checkpoint and checkpoint_step(self.manager.latest_checkpoint) == step:
            return self.manager.latest_checkpoint  # already saved at this step
        try:
            path = self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            self._discard(self.model_dir, step)
            then = (f"rerun to resume from {self.latest}, which is intact" if self.latest else
                    "run the same command again (the run had saved no checkpoint yet)")
            raise CheckpointError(
                f"could not write the checkpoint at step {step} in {self.model_dir} "
                f"({write_reason(e)}): free space or fix permissions, then {then}") from None
        self._saved = path
        logging.info("saved checkpoint %s", path)
        return path


class ModelDirLock:
    """One live run per model dir, held in `<model_dir>/.lock`.

    On a local filesystem: an exclusive flock. The kernel releases a flock when its
    process dies, however it dies, so a lock file left by a crashed run is free to
    take; we say so in the log.

    Elsewhere (gs://, s3://, ram://: no flock): a lease. The file names its owner and
    a heartbeat time that a thread renews every HEARTBEAT_SECS; a lease not renewed
    for LEASE_SECS belongs to a dead run and is taken over. Object stores have no
    atomic create-if-absent through tf.io.gfile, so two runs started within the same
    moment can both win; the lease is read back after writing it, which catches a
    writer that raced us by more than that read.
    """

    HEARTBEAT_SECS = 30.0
    LEASE_SECS = 120.0
    _held: set[ModelDirLock] = set()  # this process's, for an exit that skips `finally`

    def __init__(self, model_dir: str, meanwhile: str = ""):
        """`meanwhile`: what else to do while the run that holds it goes on (the end of
        the line of a dir in use)."""
        self.path = os.path.join(model_dir, ".lock")
        self.meanwhile = f"; {meanwhile}" if meanwhile else ""
        self.fd = None
        self.owner = f"pid {os.getpid()} on {socket.gethostname()} ({uuid.uuid4().hex[:8]})"
        self._stop = None
        self._releasing = threading.Lock()  # the main thread and an exiting signal's thread

    def acquire(self) -> None:
        if "://" in self.path:
            self._acquire_lease()
            return
        import fcntl  # POSIX only, and local by nature

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
                f"wait for it to finish, stop it, or choose another --model_dir{self.meanwhile}"
            ) from None
        previous = os.read(fd, 200).decode(errors="replace").strip()
        if previous:
            logging.warning("taking over the stale lock of a run that ended without releasing "
                            "it (%s)", previous)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        os.fsync(fd)
        self.fd = fd
        ModelDirLock._held.add(self)

    def _read_lease(self) -> dict | None:
        try:
            with tf.io.gfile.GFile(self.path) as f:
                return json.loads(f.read())
        except (tf.errors.NotFoundError, ValueError):
            return None

    def _write_lease(self) -> None:
        if self.path.startswith("ram://") and tf.io.gfile.exists(self.path):
            tf.io.gfile.remove(self.path)  # ram:// appends on "w" (TensorFlow 2.21)
        with tf.io.gfile.GFile(self.path, "w") as f:
            f.write(json.dumps({"owner": self.owner, "heartbeat": time.time()}))

    def _acquire_lease(self) -> None:
        lease = self._read_lease()
        if lease and lease.get("owner") != self.owner:
            age = time.time() - float(lease.get("heartbeat", 0))
            if age < self.LEASE_SECS:
                raise CheckpointError(
                    f"--model_dir={os.path.dirname(self.path)} is in use by a live run "
                    f"({lease.get('owner')}, heartbeat {age:.0f} s ago): wait for it to finish, "
                    f"stop it, or choose another --model_dir{self.meanwhile}")
            logging.warning("taking over the lease of a run whose heartbeat stopped %.0f s ago "
                            "(%s)", age, lease.get("owner"))
        self._write_lease()
        lease = self._read_lease()
        if not lease or lease.get("owner") != self.owner:
            raise CheckpointError(
                f"--model_dir={os.path.dirname(self.path)} was taken by another run starting "
                f"at the same moment ({(lease or {}).get('owner')}): choose another --model_dir")
        self._stop = threading.Event()
        ModelDirLock._held.add(self)
        threading.Thread(target=self._heartbeat, args=(self._stop,), daemon=True,
                         name="lease-heartbeat").start()

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.HEARTBEAT_SECS):
            try:
                self._write_lease()
            except tf.errors.OpError as e:  # transient: the next beat tries again
                logging.warning("could not renew the lease %s: %s", self.path, e.message)

    def release(self) -> None:
        with self._releasing:
            ModelDirLock._held.discard(self)
            if self._stop is not None:
                self._stop.set()
                self._stop = None
                lease = self._read_lease()
                if lease and lease.get("owner") == self.owner:
                    tf.io.gfile.remove(self.path)
            if self.fd is not None:
                import fcntl

                os.ftruncate(self.fd, 0)  # an empty lock file: this run ended cleanly
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None

    @classmethod
    def release_held(cls) -> None:
        """Releases every lock this process holds, as far as it can: for a process about
        to exit at once (`process.ExitOnSignals`), whatever its main thread is doing."""
        for lock in list(cls._held):
            try:
                lock.release()
            except (OSError, tf.errors.OpError):
                pass  # released meanwhile, or unreachable: the lease expires, the flock dies


def _object_graph(reader):
    """A checkpoint's object graph (TrackableObjectGraph), read once."""
    from tensorflow.core.protobuf.trackable_object_graph_pb2 import TrackableObjectGraph

    return TrackableObjectGraph.FromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))


def _saved_children(graph, *path: str) -> set[str]:
    """The names of the children of the object at `path` in a checkpoint's object graph
    (empty if there is none)."""
    node = 0
    for name in path:
        ids = [c.node_id for c in graph.nodes[node].children if c.local_name == name]
        if not ids:
            return set()
        node = ids[0]
    return {c.local_name for c in graph.nodes[node].children}


def _model_as_saved(model, reader):
    """`model`, or a view of it in the checkpoint's older layout.

    Checkpoints written before layers/blocks.py's UpsampleConv held a Conv2D keep its
    kernel and bias on the block itself (model/decoder/block1/kernel, not
    .../block1/conv/_kernel). The view holds the same variables, in the same order, so
    the optimizer's state matches them as before.
    """
    from layers.blocks import UpsampleConv

    decoder = getattr(model, "decoder", None)
    if not hasattr(decoder, "blocks"):
        return model
    graph = _object_graph(reader)
    layers = {f"block{i}": block for i, block in enumerate(decoder.blocks)}
    layers["to_logits"] = decoder.to_logits
    old = {name for name, layer in layers.items() if isinstance(layer, UpsampleConv)
           and "kernel" in _saved_children(graph, "model", "decoder", name)}
    if not old or not _saved_children(graph, "model") <= {"encoder", "decoder"}:
        return model
    logging.info("the checkpoint was written before UpsampleConv held a Conv2D: reading its "
                 "kernel and bias from the block")
    view = {name: tf.train.Checkpoint(kernel=layer.conv.kernel, bias=layer.conv.bias)
            if name in old else layer for name, layer in layers.items()}
    return tf.train.Checkpoint(encoder=model.encoder, decoder=tf.train.Checkpoint(**view))


def saved_config(model_dir: str) -> dict | None:
    """The `config.json` of `model_dir` as a dict, or None if there is none.

    Raises:
      CheckpointError: the file is unreadable or not a JSON object.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    try:
        value = json.loads(tf.io.gfile.GFile(path, "r").read())
    except (tf.errors.OpError, ValueError) as e:
        reason = first_line(e, 120)
        raise CheckpointError(_denied(path, reason) or f"{path} is unreadable ({reason}): "
                              "restore it or use a fresh --model_dir") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not the run's config "
                              "object: restore it or use a fresh --model_dir")
    return value


def write_config(model_dir: str, config: dict) -> None:
    """Writes `config.json`."""
    write_file(os.path.join(model_dir, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def saved_value(saved: dict, key: str):
    """The saved config's `key` (for an older config without it, what it then was)."""
    return saved.get(key, _IMPLIED.get(key))


def _differs(saved: dict, current: dict, key: str) -> bool:
    """Whether the saved config has `key` with another value than `current`."""
    return ((key in saved or key in _IMPLIED)
            and _norm(saved_value(saved, key)) != _norm(current.get(key)))


def _differences(saved: dict, current: dict, keys) -> list[str]:
    """'field: saved -> current' for every field of `keys` that differs."""
    return [f"{k}: {_norm(saved_value(saved, k))!r} -> {_norm(current.get(k))!r}" for k in keys
            if _differs(saved, current, k)]


def model_differences(saved: dict, current: dict, keys=MODEL_FIELDS) -> list[str]:
    """'field: saved -> current' for every field of `keys` (MODEL_FIELDS) that differs."""
    return _differences(saved, current, keys)


def _flag(name: str, value) -> str:
    """`value` as the command line gives it to --name."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"--{name}={value}"


def resume_flags(saved: dict, current: dict) -> str:
    """The flags that give the saved run's model again where `current` differs: its model
    and optimizer flags, and for another image shape its size, channels and data."""
    def differs(k):
        return _differs(saved, current, k)

    names = [k for k in MODEL_FIELDS + OPTIMIZER_FIELDS if k != "image_shape" and differs(k)]
    if differs("image_shape"):
        names += [k for k in ("dataset", "data_dir", "synthetic_shape") if differs(k)]
    flags = [_flag(k, saved_value(saved, k)) for k in names if saved_value(saved, k) is not None]
    if differs("image_shape"):
        height, width, channels = saved["image_shape"]
        flags += [f"--image_size={height},{width}", f"--channels={channels}"]
    left_out = [f"--{k}" for k in names if saved_value(saved, k) is None]
    without = "without " + ", ".join(left_out) if left_out else ""
    return ", ".join(part for part in (" ".join(flags), without) if part)


def check_compatible(model_dir: str, current: dict, log_changes: bool = True,
                     saved: dict | None = None) -> None:
    """Compares the run's config with the one saved in `model_dir`, if any.

    Raises:
      ConfigError: a field that shapes the model's variables differs (listing them all).
    """
    saved = saved_config(model_dir) if saved is None else saved
    if saved is None or (read_state(model_dir) is None and not checkpoints_on_disk(model_dir)):
        return  # nothing to restore: any model may start here
    incompatible = _differences(saved, current, MODEL_FIELDS + OPTIMIZER_FIELDS)
    if incompatible:
        raise ConfigError(
            f"--model_dir={model_dir} holds a different model ({'; '.join(incompatible)}): to "
            f"resume it, give its settings ({resume_flags(saved, current)}; its {CONFIG_FILE} "
            "has them all), or a fresh --model_dir for the new model")
    if not log_changes:
        return
    # `resolved_*` record what the saved run ended up running; this run has not chosen yet.
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in MODEL_FIELDS + OPTIMIZER_FIELDS and not k.startswith("resolved_")
                     and _norm(saved.get(k)) != _norm(current.get(k)))
    for key in changed:
        logging.info("resuming with %s changed: %r -> %r", key, saved.get(key), current.get(key))
    if saved.get("ema_decay") and not current.get("ema_decay"):
        logging.warning("--model_dir=%s keeps a weight average (--ema_decay=%s) that this run "
                        "leaves out: its checkpoints will not hold it and its evaluations use "
                        "the raw weights; give --ema_decay=%s to keep it", model_dir,
                        saved["ema_decay"], saved["ema_decay"])
    elif (saved.get("ema_decay") and current.get("ema_decay")
          and bool(saved.get("ema", True)) != bool(current.get("ema", True))):
        weights = "the weight average" if current.get("ema", True) else "the raw weights"
        logging.warning("--model_dir=%s evaluated %s until now: this run's evaluations use %s, "
                        "in the same eval/ curve; give --%s to go on as before", model_dir,
                        "the raw weights" if current.get("ema", True) else "its weight average",
                        weights, "noema" if current.get("ema", True) else "ema")
    data = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in DATA_FIELDS if k in changed]
    if data:
        logging.warning("--model_dir=%s was trained on other data (%s): this run continues from "
                        "its weights and step; for a new run, give a fresh --model_dir",
                        model_dir, "; ".join(data))
