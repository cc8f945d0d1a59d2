"""The outer loop: when to log, evaluate, checkpoint and stop. It never touches the model.

It repeats `trainer.train_loop(iterator, n)`, choosing n so that every loop
ends exactly on the next log, eval or final step, then does the host-side work
between loops: logging, summaries, the NaN check, evaluation, checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from absl import logging

from core.errors import NonFiniteLossError


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


class Controller:
    def __init__(
        self,
        trainer,
        train_iterator,
        total_steps: int,
        steps_per_epoch: int,
        steps_per_loop: int,
        log_every: int,
        eval_every: int,
        evaluate: Callable[[int], dict[str, float]] | None,
        checkpointer,
        summaries,
    ):
        self.trainer = trainer
        self.iterator = train_iterator
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.steps_per_loop = steps_per_loop
        self.log_every = log_every
        self.eval_every = eval_every
        self.evaluate = evaluate
        self.checkpointer = checkpointer
        self.summaries = summaries
        self.history: list[dict] = []  # one entry per log line, for tests and figures

    def _next_boundary(self, step: int) -> int:
        """The first step after `step` at which something happens between loops."""
        marks = [self.total_steps, (step // self.log_every + 1) * self.log_every]
        if self.evaluate is not None:
            marks.append((step // self.eval_every + 1) * self.eval_every)
        return min(marks)

    def train(self) -> int:
        """Trains to `total_steps`; returns the final step."""
        step = int(self.trainer.step.numpy())
        if step >= self.total_steps:
            logging.info("already at step %d of %d: nothing to train", step, self.total_steps)
            return step
        batch = self.trainer.global_batch_size
        window_loss, window_steps, window_time = 0.0, 0, 0.0
        first = True
        while step < self.total_steps:
            if first:
                # The first call traces and compiles; time one step on its own so
                # the throughput figures below exclude compilation.
                n = 1
                logging.info("compiling the train step (jit_compile=%s)...", self.trainer.jit_compile)
            else:
                n = min(self.steps_per_loop, self._next_boundary(step) - step)
            start = time.perf_counter()
            loss = self.trainer.train_loop(self.iterator, n)  # waits for the device
            elapsed = time.perf_counter() - start
            if not math.isfinite(loss):
                last = self.checkpointer.latest or "none yet"
                raise NonFiniteLossError(
                    f"the training loss became {loss} between step {step} and {step + n}; "
                    f"the last good checkpoint ({last}) is untouched: lower --learning_rate "
                    "or check the data")
            step += n
            if first:
                first = False
                logging.info("compiled in %.1f s (first step included)", elapsed)
                self.summaries.scalars("train", step, {"compile_seconds": elapsed})
            else:
                window_loss += loss * n
                window_steps += n
                window_time += elapsed
            if step % self.log_every == 0 or step == self.total_steps:
                steps = max(window_steps, 1)
                record = {
                    "step": step,
                    "loss": window_loss / steps if window_steps else loss,
                    "examples_per_sec": batch * window_steps / window_time if window_time else 0.0,
                    "learning_rate": self.trainer.learning_rate,
                }
                self.history.append(record)
                logging.info(format_line(
                    "train", step=f"{step}/{self.total_steps}",
                    epoch=f"{step / self.steps_per_epoch:.2f}", loss=record["loss"],
                    examples_per_sec=record["examples_per_sec"]))
                self.summaries.scalars("train", step, {
                    "loss": record["loss"], "examples_per_sec": record["examples_per_sec"],
                    "learning_rate": record["learning_rate"],
                    "step_time_ms": 1000 * window_time / steps})
                window_loss, window_steps, window_time = 0.0, 0, 0.0
            if self.evaluate is not None and (step % self.eval_every == 0 or step == self.total_steps):
                self.evaluate(step)
                self.checkpointer.save()
        self.checkpointer.save()
        self.summaries.flush()
        return step
