"""The outer loop: when to log, summarise, evaluate, checkpoint, profile and stop.

It never touches the model. It repeats `trainer.train_loop(iterator, n)`,
choosing n so that every loop ends exactly on the next step at which something
happens, then does the host-side work between loops: the NaN/Inf check, log
lines and summaries, evaluation, checkpoints, the profiler window, and a
requested stop (SIGTERM/SIGINT, or an action that returned True).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable

from absl import logging
import tensorflow as tf

from core import signals
from core.actions import ActionError
from core.errors import (NonFiniteLossError, OutOfMemoryError, Preempted, WriteError,
                         op_error_reason)

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


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the outer loop does what, in global steps (0 = off where noted).

    Attributes:
      log_every: a log line (and a point of the history); also at every evaluation.
      summary_every: train summaries; 0 = with every log line; also at every evaluation.
      histogram_every: histograms of the trainable weights; 0 = off.
      eval_every: evaluate (when there is an evaluation) and checkpoint.
      checkpoint_every_steps: extra checkpoints; 0 = off.
      checkpoint_every_secs: a checkpoint when this long passed since the last; 0 = off.
      profile_steps: (start, stop) of a profiler trace, or None.
      nan_policy: on a NaN/Inf loss, "stop" or "rollback" to the last checkpoint.
      nan_max_retries: rollbacks before giving up.
      nan_lr_factor: learning-rate factor per rollback.
      keep_best, best_higher: the metric whose best checkpoint is kept (in best/), and
        whether higher is better; None: none kept.
      early_stopping_patience: stop after this many evaluations without a new best of
        `keep_best` (eval/loss if None); 0 = off.
      reduce_lr_patience, reduce_lr_factor, reduce_lr_min: multiply the base learning rate
        by the factor after every `reduce_lr_patience` evaluations without a new best (the
        same metric), not below the minimum; 0 = off.
      min_delta: an evaluation is a new best only if it beats the best by more than this.
    """

    log_every: int = 100
    summary_every: int = 0
    histogram_every: int = 0
    eval_every: int = 0
    checkpoint_every_steps: int = 0
    checkpoint_every_secs: float = 0.0
    profile_steps: tuple[int, int] | None = None
    keep_best: str | None = None  # a metric ("eval/psnr"): keep its best checkpoint
    best_higher: bool = False  # whether higher values of it are better
    early_stopping_patience: int = 0  # stop after this many evaluations without a new best
    reduce_lr_patience: int = 0  # lower the rate after every N evaluations without one
    reduce_lr_factor: float = 0.1
    reduce_lr_min: float = 0.0
    min_delta: float = 0.0  # a new best beats the best by more than this
    loss: str = ""  # the training loss (its title): what eval/loss measures
    eval_data: str = ""  # the evaluated data (dataset, folder, split): what every metric is of
    eval_data_moved_from: str | None = None  # eval_data at the run's --data_dir, moved since
    eval_examples: int = 0  # how many images it holds (a folder's split gains files)
    eval_inputs: str = ""  # how the evaluated images are made (resize, noise): the same
    nan_policy: str = "stop"
    nan_max_retries: int = 3
    nan_lr_factor: float = 0.5


# What a failing input pipeline raises through the compiled loop (a file that does not
# decode, a shard cut short, a file deleted or made unreadable mid-run).
_INPUT_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError,
                 tf.errors.NotFoundError, tf.errors.PermissionDeniedError)


class Controller:
    """The outer loop over `trainer.train_loop`; see the module docstring.

    Args:
      trainer: has `train_loop(iterator, n)`, `step`, `global_batch_size`,
        `learning_rate`, `set_learning_rate`, `jit_compile` and (for histograms) `model`.
      make_iterator: start step -> the training iterator (None for on-device data).
      total_steps: the step to train to.
      steps_per_epoch: for the log's epoch column.
      steps_per_loop: the most steps per compiled call.
      cadence: when to log, summarise, evaluate, checkpoint and profile; the NaN policy.
      evaluate: step -> metrics, or None (no evaluation; checkpoints keep the cadence).
      checkpointer: has `save()`, `restore(path)` and `latest`.
      summaries: has `scalars(writer, step, values)`, `histograms(writer, step,
        variables)`, `restart(step, writers)` and `flush()`.
      profile_dir: where the profiler trace goes.
      stop_requested: asked -> ("signal", name) if a stop signal was received, ("asked",
        who) if an action asked to stop (`asked`, this process's, or another worker's), or
        None (`distribute.AgreedStop`).
      progress: the terminal status line.
      data_error: (step, error, checkpoint path) -> the exception to raise when the
        input pipeline fails mid-run (a file that does not decode); None: re-raise.
        A checkpoint of the steps before it is saved first.
      train_actions: called as f(step, values) with every train summary's values
        (core/actions.Actions), returning the label of an action that asked to stop, or
        None; one that raises stops the run after a checkpoint.
      eval_actions: the same, after every evaluation with its results.
    """

    def __init__(
        self,
        trainer,
        make_iterator: Callable[[int], object],
        total_steps: int,
        steps_per_epoch: int,
        steps_per_loop: int,
        cadence: Cadence,
        evaluate: Callable[[int], dict[str, float]] | None,
        checkpointer,
        summaries,
        profile_dir: str | None = None,
        stop_requested: Callable[[str | None], tuple[str, str] | None] = (
            lambda asked: ("asked", asked) if asked else None),
        progress: Progress | None = None,
        data_error: Callable[[int, Exception, str], Exception] | None = None,
        train_actions: Callable[[int, dict], str | None] | None = None,
        eval_actions: Callable[[int, dict], str | None] | None = None,
    ):
        self.trainer = trainer
        self.make_iterator = make_iterator
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.steps_per_loop = steps_per_loop
        self.cadence = dataclasses.replace(
            cadence, summary_every=cadence.summary_every or cadence.log_every,
            eval_every=cadence.eval_every or steps_per_epoch)
        self.evaluate = evaluate
        self.checkpointer = checkpointer
        self.summaries = summaries
        self.profile_dir = profile_dir
        self.stop_requested = stop_requested
        self.progress = progress or Progress()
        self.data_error = data_error
        self.train_actions = train_actions
        self.eval_actions = eval_actions
        self.asked: str | None = None  # the action of this process that asked to stop
        self.history: list[dict] = []  # one entry per log line, for tests and figures
        self.evaluations: list[dict] = []  # {'step': ..., **metrics} per evaluation
        self.nan_retries = 0
        # Since the last log line: loss * steps, steps, seconds, the sum of the steps'
        # gradient norms and how many steps it sums (those with a finite gradient).
        self._window = [0.0, 0, 0.0, 0.0, 0]
        self._last_save = time.monotonic()
        self._profiling = False
        self.best = checkpointer.read_best() if self._judges(cadence) else None
        self.stopped_early = False

    def _next_boundary(self, step: int) -> int:
        """The first step after `step` at which something happens between loops."""
        c = self.cadence

        def next_multiple(every):
            return (step // every + 1) * every

        marks = [self.total_steps, next_multiple(c.log_every), next_multiple(c.summary_every),
                 next_multiple(c.eval_every)]
        if c.checkpoint_every_steps:
            marks.append(next_multiple(c.checkpoint_every_steps))
        if c.histogram_every:
            marks.append(next_multiple(c.histogram_every))
        if c.profile_steps:
            marks += [s for s in c.profile_steps if s > step]
        return min(marks)

    def _handle_non_finite(self, loss: float, start: int, end: int) -> int:
        """Stops, or rolls back to the last good checkpoint; returns the step to go on from."""
        c = self.cadence
        last = self.checkpointer.latest
        where = f"between step {start} and {end}"
        if c.nan_policy == "stop" or last is None or self.nan_retries >= c.nan_max_retries:
            if last is None:
                why = "" if c.nan_policy == "stop" else " (no checkpoint to roll back to)"
                raise NonFiniteLossError(
                    f"the training loss became {loss} {where}, before any checkpoint{why}: "
                    "lower --learning_rate or check the data")
            why = "" if c.nan_policy == "stop" else f" again after {self.nan_retries} rollbacks"
            hint = ("lower --learning_rate, check the data, or use --nan_policy=rollback"
                    if c.nan_policy == "stop" else "lower --learning_rate or check the data")
            raise NonFiniteLossError(
                f"the training loss became {loss} {where}{why}; the last good checkpoint "
                f"({last}) is untouched: {hint}")
        self.nan_retries += 1
        blew_up = self.trainer.base_learning_rate
        restored = self.checkpointer.restore(last)
        self.summaries.restart(restored, ("train", "eval") if self.evaluate else ("train",))
        # The lower of the checkpoint's rate and the one that blew up, times the factor: a
        # second rollback to the same checkpoint lowers it again, where the checkpoint's
        # rate alone would repeat the first retry (and, with --deterministic, its NaN).
        lr = min(self.trainer.base_learning_rate, blew_up) * c.nan_lr_factor
        self.trainer.set_learning_rate(lr)
        logging.warning("rollback %d/%d: loss was %s %s; restored %s (step %d), learning rate now "
                        "%.3g", self.nan_retries, c.nan_max_retries, loss, where, last, restored,
                        lr)
        return restored

    def _profile(self, step: int, n: int) -> None:
        """Starts the profiler at its first step, or stops it once `step + n` reaches the last."""
        window = self.cadence.profile_steps
        if not window:
            return
        if step == window[0] and not self._profiling and n == 0:
            tf.profiler.experimental.start(self.profile_dir)
            self._profiling = True
            logging.info("profiling steps %d to %d into %s", *window, self.profile_dir)
        elif self._profiling and n and step + n >= window[1]:
            tf.profiler.experimental.stop()
            self._profiling = False

    def _after_loop(self, step: int, n: int, loss: float, elapsed: float | None) -> None:
        """Logs, summaries, evaluation and checkpoints due at `step`, after a loop of `n` steps
        that took `elapsed` seconds (None: the first, compiling step, not timed)."""
        c, w = self.cadence, self._window
        norms = self.trainer.last_grad_norms
        if elapsed is not None:
            w[0] += loss * n
            w[1] += n
            w[2] += elapsed
            w[3] += norms[0]
            w[4] += norms[1]
        rate = self.trainer.global_batch_size * w[1] / w[2] if w[2] else 0.0
        mean_loss = w[0] / w[1] if w[1] else loss
        left = (self.total_steps - step) * w[2] / w[1] if w[1] else None
        self.progress.update(progress_line(step, self.total_steps, mean_loss, rate, left))
        last = step == self.total_steps
        # A training point at every evaluation too (Keras' line per epoch), so that the
        # curves pair up: an epoch of a small folder is often shorter than --log_every.
        evaluating = step % c.eval_every == 0 and self.evaluate is not None
        if step % c.summary_every == 0 or last or evaluating:
            values = {"loss": mean_loss, "examples_per_sec": rate,
                      "learning_rate": self.trainer.learning_rate,
                      "step_time_ms": 1000 * w[2] / max(w[1], 1)}
            norm_sum, norm_steps = (w[3], w[4]) if w[1] else norms
            if norm_steps:  # none if every step's gradient overflowed (float16 skips them)
                values["grad_norm"] = norm_sum / norm_steps
            self.summaries.scalars("train", step, values)
            if self.train_actions:
                asked = self.train_actions(step, values)  # each called, whoever asked before
                self.asked = self.asked or asked
        if c.histogram_every and (step % c.histogram_every == 0 or last):
            self.summaries.histograms("train", step, self.trainer.model.trainable_variables)
        if step % c.log_every == 0 or last or evaluating:
            self.history.append({"step": step, "loss": mean_loss, "examples_per_sec": rate,
                                 "learning_rate": self.trainer.learning_rate})
            self.progress.clear()
            logging.info(format_line(
                "train", step=f"{step}/{self.total_steps}",
                epoch=f"{step / self.steps_per_epoch:.2f}", loss=mean_loss, examples_per_sec=rate))
            self._window = [0.0, 0, 0.0, 0.0, 0]
        # Every eval step is a checkpoint step, with or without an evaluation (--mode=train).
        due = step % c.eval_every == 0 or last
        if due and self.evaluate is not None:
            self.progress.clear()
            results = self.evaluate(step)
            self.evaluations.append({"step": step, **results})
            if self.eval_actions:
                asked = self.eval_actions(step, results)
                self.asked = self.asked or asked
            if self._judges(c):
                self._judge(step, results)
        due = due or (c.checkpoint_every_steps and step % c.checkpoint_every_steps == 0) or (
            c.checkpoint_every_secs and time.monotonic() - self._last_save >= c.checkpoint_every_secs)
        if due:
            self.checkpointer.save()
            self._last_save = time.monotonic()

    @staticmethod
    def _judges(c: Cadence) -> bool:
        """Whether evaluations are judged against the best so far."""
        return bool(c.keep_best or c.early_stopping_patience or c.reduce_lr_patience)

    def _measure(self) -> dict:
        """What evaluations are judged by: the metric, the data it is of (and how many
        images: files added to a folder's split change every metric), how its inputs are
        made (a denoiser's noise: a resume at a higher --noise_factor, as a curriculum does,
        lowers every metric) and, for eval/loss, the training loss it is (a run resumed with
        another of these judges anew)."""
        c = self.cadence
        metric = c.keep_best or "eval/loss"
        return {"metric": metric, **({"loss": c.loss} if metric == "eval/loss" else {}),
                "eval_data": c.eval_data, "eval_inputs": c.eval_inputs,
                **({"eval_examples": c.eval_examples} if c.eval_examples else {})}

    def _unlike(self, record: dict) -> list[str]:
        """How a best record's measure differs from this run's ('loss BCE (now MSE)'); a
        record from before a field was recorded is taken as this run's."""
        measure = self._measure()
        if record.get("eval_data") == self.cadence.eval_data_moved_from:  # the same data
            record = {**record, "eval_data": measure["eval_data"]}
        return [f"{k} {record[k]} (now {v})" for k, v in measure.items()
                if record.get(k, v) != v]

    def _measured_alike(self, record: dict) -> bool:
        return not self._unlike(record)

    def _judge(self, step: int, results: dict) -> None:
        """Keeps the best checkpoint of `keep_best`, lowers the learning rate and stops early
        when it stopped improving."""
        c = self.cadence
        measure = self._measure()
        metric = measure["metric"]
        value = results[metric.split("/", 1)[1]]
        best = self.best
        d = c.min_delta
        if best and not self._measured_alike(best):
            logging.info("%s is judged anew from step %d: the best so far (%.6g at step %d) "
                         "was judged by %s", metric, step, best["value"], best["step"],
                         ", ".join(self._unlike(best)))
            best = self.best = None
        if best and best.get("evaluated_at") == step:
            # Judged already, by a run that died after writing the record and before its
            # checkpoint at this step (every evaluation is followed by one): that judgement
            # stands (with its best checkpoint, if it found one), or the evaluation would
            # count twice. What it did to the run's state (a reduced rate) died with it and
            # is done again below.
            logging.info("step %d was judged before the last run stopped: keeping its record "
                         "(%s %.6g at step %d, %d evaluations since)", step, metric,
                         best["value"], best["step"], best["evals_since"])
        else:
            higher = c.best_higher if c.keep_best else False
            improved = best is None or (
                value > best["value"] + d if higher else value < best["value"] - d)
            if improved:
                self.best = {**measure, "value": value, "step": step, "evals_since": 0}
            else:
                # The measure written anew: the same data at its new place, once it moved.
                self.best = {**best, **measure, "evals_since": best["evals_since"] + 1}
            self.best["evaluated_at"] = step
            self.checkpointer.write_best(self.best, save=improved and bool(c.keep_best))
        since = self.best["evals_since"]
        if c.reduce_lr_patience and since and since % c.reduce_lr_patience == 0:
            # The base rate, a checkpointed variable: the save that follows every evaluation
            # keeps it, and `evals_since` (best.json) says when the next reduction is due, so
            # a resumed run goes on as an uninterrupted one.
            old = self.trainer.base_learning_rate
            new = max(old * c.reduce_lr_factor, c.reduce_lr_min)
            by = f" by more than {d:g}" if d else ""
            evaluations = f"{since} evaluation{'s' if since > 1 else ''}"
            if new < old:
                self.trainer.set_learning_rate(new)
                logging.info("learning rate %.3g -> %.3g at step %d: %s has not improved%s on "
                             "%.6g (step %d) for %s (--reduce_lr_patience)", old, new, step,
                             metric, by, self.best["value"], self.best["step"], evaluations)
            else:
                logging.info("learning rate stays at %.3g at step %d: %s has not improved%s for "
                             "%s, and the rate is at --reduce_lr_min", old, step, metric, by,
                             evaluations)
        patience = c.early_stopping_patience
        if patience and since >= patience and step < self.total_steps:
            logging.info("early stopping at step %d: %s has not improved on %.6g (step %d) for "
                         "%d evaluation%s (--early_stopping_patience)", step, metric,
                         self.best["value"], self.best["step"], patience,
                         "s" if patience > 1 else "")
            self.stopped_early = True

    def _out_of_memory(self, error: OutOfMemoryError, start_step: int) -> OutOfMemoryError:
        """`error`, after saving the steps trained since `start_step` (a loop that ran out of
        memory midway has completed, and counted, the steps before the failing one)."""
        self.progress.clear()
        if int(self.trainer.step.numpy()) > start_step:
            path = self.checkpointer.save()
            return OutOfMemoryError(f"{error}; the steps before it are saved in {path}")
        return error

    def _write_failed(self, error: WriteError) -> WriteError:
        """`error` (TensorBoard's events, best.json: the disk is full), after saving the
        steps trained. A checkpoint that does not fit either raises its own CheckpointError,
        which names the last one saved."""
        self.progress.clear()
        path = self.checkpointer.save()
        return WriteError(error.what, error.reason, f"saved {path}; free space or fix "
                          "permissions, then run the same command to resume")

    def _first_step(self, iterator, step: int) -> float:
        """Runs the first step alone: it traces (and compiles), which the throughput excludes."""
        jit = self.trainer.jit_compile
        eager = getattr(self.trainer, "eager", False)
        logging.info("running the first step eagerly..." if eager else
                     f"compiling the train step (jit_compile={jit})...")
        start = time.perf_counter()
        loss = self.trainer.train_loop(iterator, 1)
        elapsed = time.perf_counter() - start
        if math.isfinite(loss):
            logging.info("first step ran in %.1f s" if eager else
                         "compiled in %.1f s (first step included)", elapsed)
            self.summaries.scalars("train", step + 1, {"compile_seconds": elapsed})
            if not eager:
                self.summaries.graph("train", step + 1, self.trainer.train_graph)
        return loss

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
        patience = self.cadence.early_stopping_patience
        if (patience and self.best and self._measured_alike(self.best)
                and self.best["evals_since"] >= patience):
            logging.info("this run stopped early at step %d (no new best %s for %d evaluations): "
                         "nothing to train; raise --early_stopping_patience to go on", step,
                         self.best["metric"], self.best["evals_since"])
            return step
        iterator = self.make_iterator(step)
        first, start_step = True, step
        while step < self.total_steps:
            signals.interruption_point()  # a second Ctrl-C from Python: no save
            stop = self.stop_requested(self.asked)
            if stop and stop[0] == "signal":
                self.progress.clear()
                path = self.checkpointer.save()
                raise Preempted(
                    f"stopped by {stop[1]} at step {step} after saving {path}: run the same "
                    "command again to resume from there")
            if stop:
                self.progress.clear()
                logging.info("stopping at step %d of %d: %s returned True", step,
                             self.total_steps, stop[1])
                break
            self._profile(step, 0)
            try:
                if first:
                    n, elapsed = 1, None
                    loss = self._first_step(iterator, step)
                else:
                    n = min(self.steps_per_loop, self._next_boundary(step) - step)
                    start = time.perf_counter()
                    loss = self.trainer.train_loop(iterator, n)  # waits for the device
                    elapsed = time.perf_counter() - start
            except _INPUT_ERRORS as e:
                if self.data_error is None or iterator is None:
                    raise
                # The loop stops at the failing batch's get_next: every step before it
                # is complete, and `trainer.step` counts them.
                self.progress.clear()
                reached = int(self.trainer.step.numpy())
                raise self.data_error(reached, e, self.checkpointer.save()) from None
            except tf.errors.ResourceExhaustedError as e:
                halve = ("" if getattr(self.trainer, "precision", "") != "float32" else
                         ", or on a GPU train in --precision=mixed_bfloat16 or mixed_float16, "
                         "which halves the activations")
                raise self._out_of_memory(OutOfMemoryError(
                    f"out of memory in a training step ({op_error_reason(e)}): lower "
                    f"--batch_size (now {self.trainer.global_batch_size}; --grad_accum_steps=N "
                    f"with a batch N times smaller keeps the update's size){halve}"),
                    start_step) from None
            self._profile(step, n)
            if not math.isfinite(loss):
                self.progress.clear()
                step = self._handle_non_finite(loss, step, step + n)
                iterator = self.make_iterator(step)
                self._window = [0.0, 0, 0.0, 0.0, 0]
                continue
            step += n
            first = False
            try:
                self._after_loop(step, n, loss, elapsed)
            except OutOfMemoryError as e:  # an evaluation
                raise self._out_of_memory(e, start_step) from None
            except ActionError as e:  # yours: the steps it saw are kept
                self.progress.clear()
                raise ActionError(f"{e}; saved {self.checkpointer.save()}: fix it and run the "
                                  "same command to resume") from e.__cause__
            except WriteError as e:  # a full disk: the steps are saved if a checkpoint fits
                raise self._write_failed(e) from None
            if self.stopped_early:
                break
        if self._profiling:
            tf.profiler.experimental.stop()
        self.progress.clear()
        self.checkpointer.save()
        try:
            self.summaries.flush()
        except WriteError as e:
            raise self._write_failed(e) from None
        return step
