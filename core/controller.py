"""The outer loop: when to log, summarise, evaluate, checkpoint, profile and stop.

It never touches the model. It repeats `trainer.train_loop(iterator, n)`,
choosing n so that every loop ends exactly on the next step at which something
happens, then does the host-side work between loops: the NaN/Inf check, log
lines and summaries, evaluation, checkpoints, the profiler window, and a
requested stop (SIGTERM/SIGINT).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

from absl import logging
import tensorflow as tf

from core.errors import NonFiniteLossError, Preempted

# Test-only hook: poison the weights just before this step runs (see tests/test_reliability.py).
NAN_HOOK_ENV = "TAPELOOP_TEST_NAN_AT_STEP"


def format_line(kind: str, **fields) -> str:
    """The one log-line format: 'train | step 1200/4680 | loss 0.0931 | 10,450 ex/s'."""
    parts = [kind]
    for name, value in fields.items():
        if name == "examples_per_sec":
            parts.append(f"{value:,.0f} ex/s")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.4f}")
        else:
            parts.append(f"{name} {value}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(step: int, total: int, loss: float, examples_per_sec: float,
                  seconds_left: float | None, width: int = 24) -> str:
    """'[=========>       ] 1200/4680 | loss 0.0931 | 10,450 ex/s | 1m23s left'."""
    done = int(width * step / max(total, 1))
    bar = "=" * max(done - 1, 0) + (">" if done else "") + " " * (width - done)
    left = format_duration(seconds_left) if seconds_left is not None else "?"
    return f"[{bar}] {step}/{total} | loss {loss:.4f} | {examples_per_sec:,.0f} ex/s | {left} left"


class Progress:
    """A self-rewriting status line on an interactive terminal; nothing otherwise
    (the absl log lines are the record either way)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()


class Controller:
    def __init__(
        self,
        trainer,
        make_iterator: Callable[[int], object],
        total_steps: int,
        steps_per_epoch: int,
        steps_per_loop: int,
        log_every: int,
        eval_every: int,
        evaluate: Callable[[int], dict[str, float]] | None,
        checkpointer,
        summaries,
        summary_every: int | None = None,
        checkpoint_every_steps: int = 0,
        checkpoint_every_secs: float = 0.0,
        profile_steps: tuple[int, int] | None = None,
        profile_dir: str | None = None,
        nan_policy: str = "stop",
        nan_max_retries: int = 3,
        nan_lr_factor: float = 0.5,
        stop_requested: Callable[[], str | None] = lambda: None,
        progress: Progress | None = None,
    ):
        self.trainer = trainer
        self.make_iterator = make_iterator  # start step -> iterator (None for on-device data)
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.steps_per_loop = steps_per_loop
        self.log_every = log_every
        self.summary_every = summary_every or log_every
        self.eval_every = eval_every
        self.evaluate = evaluate
        self.checkpointer = checkpointer
        self.summaries = summaries
        self.checkpoint_every_steps = checkpoint_every_steps
        self.checkpoint_every_secs = checkpoint_every_secs
        self.profile_steps = profile_steps
        self.profile_dir = profile_dir
        self.nan_policy = nan_policy
        self.nan_max_retries = nan_max_retries
        self.nan_lr_factor = nan_lr_factor
        self.stop_requested = stop_requested
        self.progress = progress or Progress()
        self.history: list[dict] = []  # one entry per log line, for tests and figures
        self.nan_retries = 0
        hook = os.environ.get(NAN_HOOK_ENV)
        self._nan_at = int(hook) if hook else None

    def _next_boundary(self, step: int) -> int:
        """The first step after `step` at which something happens between loops."""

        def next_multiple(every):
            return (step // every + 1) * every

        marks = [self.total_steps, next_multiple(self.log_every), next_multiple(self.summary_every)]
        if self.evaluate is not None:
            marks.append(next_multiple(self.eval_every))
        if self.checkpoint_every_steps:
            marks.append(next_multiple(self.checkpoint_every_steps))
        if self.profile_steps:
            marks += [s for s in self.profile_steps if s > step]
        if self._nan_at is not None and self._nan_at - 1 > step:
            marks.append(self._nan_at - 1)
        return min(marks)

    def _poison_if_asked(self, step: int) -> None:
        if self._nan_at is not None and step == self._nan_at - 1:
            logging.warning("test hook %s: setting a weight to NaN before step %d",
                            NAN_HOOK_ENV, self._nan_at)
            # The output layer's bias: it has no activation, so every logit is NaN. (A
            # hidden layer's would not do: oneDNN's fused conv+relu maps NaN to 0.)
            var = next(v for v in self.trainer.model.trainable_variables
                       if v.path.endswith("logits/bias"))
            var.assign(tf.fill(var.shape, float("nan")))
            self._nan_at = None  # once per process

    def _handle_non_finite(self, loss: float, start: int, end: int) -> int:
        """Stops, or rolls back to the last good checkpoint; returns the step to go on from."""
        last = self.checkpointer.latest
        where = f"between step {start} and {end}"
        if self.nan_policy == "stop" or last is None or self.nan_retries >= self.nan_max_retries:
            why = ("" if self.nan_policy == "stop" else
                   " and there is no checkpoint to roll back to" if last is None else
                   f" again after {self.nan_retries} rollbacks")
            raise NonFiniteLossError(
                f"the training loss became {loss} {where}{why}; the last good checkpoint "
                f"({last or 'none yet'}) is untouched: lower --learning_rate, check the data, "
                "or use --nan_policy=rollback")
        self.nan_retries += 1
        restored = self.checkpointer.restore(last)
        lr = self.trainer.learning_rate * self.nan_lr_factor
        self.trainer.set_learning_rate(lr)
        logging.warning("rollback %d/%d: loss was %s %s; restored %s (step %d), learning rate now "
                        "%.3g", self.nan_retries, self.nan_max_retries, loss, where, last, restored,
                        lr)
        return restored

    def train(self) -> int:
        """Trains to `total_steps`; returns the final step.

        Raises:
          NonFiniteLossError: the loss became NaN/Inf (after any allowed rollbacks).
          Preempted: a stop was requested; a checkpoint of the last finished loop was saved.
        """
        step = int(self.trainer.step.numpy())
        if step >= self.total_steps:
            logging.info("already at step %d of %d: nothing to train", step, self.total_steps)
            return step
        iterator = self.make_iterator(step)
        batch = self.trainer.global_batch_size
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        first = True
        last_save = time.monotonic()
        profiling = False
        while step < self.total_steps:
            signal_name = self.stop_requested()
            if signal_name:
                self.progress.clear()
                path = self.checkpointer.save()
                raise Preempted(
                    f"stopped by {signal_name} at step {step} after saving {path}: run the same "
                    "command again to resume from there")
            if first:
                # The first call traces and compiles: time one step on its own so the
                # throughput figures exclude compilation.
                n = 1
                logging.info("compiling the train step (jit_compile=%s)...", self.trainer.jit_compile)
            else:
                n = min(self.steps_per_loop, self._next_boundary(step) - step)
            if self.profile_steps and step == self.profile_steps[0] and not profiling:
                tf.profiler.experimental.start(self.profile_dir)
                profiling = True
                logging.info("profiling steps %d to %d into %s", *self.profile_steps, self.profile_dir)
            self._poison_if_asked(step)
            start = time.perf_counter()
            loss = self.trainer.train_loop(iterator, n)  # waits for the device
            elapsed = time.perf_counter() - start
            if profiling and step + n >= self.profile_steps[1]:
                tf.profiler.experimental.stop()
                profiling = False
            if not math.isfinite(loss):
                self.progress.clear()
                step = self._handle_non_finite(loss, step, step + n)
                iterator = self.make_iterator(step)
                window_loss, window_steps, window_time = 0.0, 0, 0.0
                continue
            step += n
            if first:
                first = False
                logging.info("compiled in %.1f s (first step included)", elapsed)
                self.summaries.scalars("train", step, {"compile_seconds": elapsed})
            else:
                window_loss += loss * n
                window_steps += n
                window_time += elapsed
            rate = batch * window_steps / window_time if window_time else 0.0
            mean_loss = window_loss / window_steps if window_steps else loss
            left = (self.total_steps - step) * window_time / window_steps if window_steps else None
            self.progress.update(progress_line(step, self.total_steps, mean_loss, rate, left))
            if step % self.summary_every == 0 or step == self.total_steps:
                self.summaries.scalars("train", step, {
                    "loss": mean_loss, "examples_per_sec": rate,
                    "learning_rate": self.trainer.learning_rate,
                    "step_time_ms": 1000 * window_time / max(window_steps, 1)})
            if step % self.log_every == 0 or step == self.total_steps:
                self.history.append({"step": step, "loss": mean_loss, "examples_per_sec": rate,
                                     "learning_rate": self.trainer.learning_rate})
                self.progress.clear()
                logging.info(format_line(
                    "train", step=f"{step}/{self.total_steps}",
                    epoch=f"{step / self.steps_per_epoch:.2f}", loss=mean_loss,
                    examples_per_sec=rate))
                window_loss, window_steps, window_time = 0.0, 0, 0.0
            saved = False
            if self.evaluate is not None and (step % self.eval_every == 0 or step == self.total_steps):
                self.progress.clear()
                self.evaluate(step)
                self.checkpointer.save()
                saved = True
            if not saved and (
                    (self.checkpoint_every_steps and step % self.checkpoint_every_steps == 0)
                    or (self.checkpoint_every_secs
                        and time.monotonic() - last_save >= self.checkpoint_every_secs)):
                self.checkpointer.save()
                saved = True
            if saved:
                last_save = time.monotonic()
        if profiling:
            tf.profiler.experimental.stop()
        self.progress.clear()
        self.checkpointer.save()
        self.summaries.flush()
        return step
