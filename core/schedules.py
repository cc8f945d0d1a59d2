"""Learning-rate schedules: the rate as a function of the global step.

The optimizer keeps one learning-rate variable, checkpointed as before: `--learning_rate`,
times `--nan_lr_factor` after each NaN rollback. A schedule is a multiplier of it,
computed from the global step inside the compiled step (`Multiplier.__call__`), so the
rate at step s is the same in an uninterrupted run and in a resumed one, and a rollback
scales the whole schedule.

  constant     1
  cosine       from 1 to min/base along half a cosine, over the steps after warm-up
  linear       from 1 to min/base in a straight line, over the steps after warm-up
  exponential  decay_rate ** (step / steps_per_epoch): decay_rate per epoch
  piecewise    values[i] / base between boundaries[i-1] and boundaries[i] (steps)

`--warmup_steps=W` multiplies any of them by min(1, (step + 1) / W): a linear warm-up.
"""

from __future__ import annotations

import dataclasses
import math
import types

import tensorflow as tf

SCHEDULES = ("constant", "cosine", "linear", "exponential", "piecewise")


@dataclasses.dataclass(frozen=True)
class Multiplier:
    """The schedule's factor on the base learning rate at a step (a traceable function)."""

    kind: str = "constant"
    total_steps: int = 1
    warmup_steps: int = 0
    min_ratio: float = 0.0  # min_learning_rate / learning_rate (cosine, linear)
    decay_rate: float = 1.0  # per epoch (exponential)
    steps_per_epoch: int = 1
    boundaries: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()  # lr_values / learning_rate (piecewise)

    def __call__(self, step) -> tf.Tensor:
        s = tf.cast(step, tf.float32)
        if self.kind == "constant":
            m = tf.constant(1.0)
        elif self.kind in ("cosine", "linear"):
            span = max(self.total_steps - self.warmup_steps, 1)
            t = tf.clip_by_value((s - self.warmup_steps) / span, 0.0, 1.0)
            shape = 0.5 * (1.0 + tf.cos(math.pi * t)) if self.kind == "cosine" else 1.0 - t
            m = self.min_ratio + (1.0 - self.min_ratio) * shape
        elif self.kind == "exponential":
            m = tf.pow(tf.constant(self.decay_rate, tf.float32), s / self.steps_per_epoch)
        elif self.kind == "piecewise":
            index = tf.searchsorted(tf.constant(self.boundaries, tf.float32), [s],
                                    side="right")[0]
            m = tf.gather(tf.constant(self.ratios, tf.float32), index)
        else:
            raise ValueError(f"unknown schedule {self.kind!r}")
        if self.warmup_steps:
            m = m * tf.minimum(1.0, (s + 1.0) / self.warmup_steps)
        return m

    def describe(self, base: float) -> str:
        warm = f", {self.warmup_steps} warm-up steps" if self.warmup_steps else ""
        if self.kind in ("cosine", "linear"):
            return (f"{self.kind} from {base:g} to {base * self.min_ratio:g} over "
                    f"{self.total_steps} steps{warm}")
        if self.kind == "exponential":
            return f"exponential, x{self.decay_rate:g} per epoch from {base:g}{warm}"
        if self.kind == "piecewise":
            values = ", ".join(f"{base * r:g}" for r in self.ratios)
            return f"piecewise {values} at steps {', '.join(map(str, self.boundaries))}{warm}"
        return f"constant {base:g}{warm}"


def from_config(config, total_steps: int, steps_per_epoch: int) -> Multiplier:
    """The run's schedule (Config validated the values)."""
    base = config.learning_rate
    return Multiplier(
        kind=config.lr_schedule, total_steps=total_steps, warmup_steps=config.warmup_steps,
        min_ratio=config.min_learning_rate / base,
        decay_rate=config.decay_rate if config.decay_rate is not None else 1.0,
        steps_per_epoch=max(steps_per_epoch, 1),
        boundaries=tuple(config.lr_boundaries or ()),
        ratios=tuple(v / base for v in config.lr_values or ()))


def from_saved(saved: dict) -> Multiplier | None:
    """The schedule a run's config.json (`checkpoints.saved_config`) trained with; None when
    it does not say (a config.json from before the schedules, or without its length)."""
    total = saved.get("resolved_total_steps") or saved.get("train_steps")
    if "lr_schedule" not in saved or not total or not saved.get("learning_rate"):
        return None
    step_batch = saved.get("batch_size", 1) * saved.get("grad_accum_steps", 1)
    steps_per_epoch = (saved.get("resolved_train_examples") or step_batch) // step_batch
    fields = dict(lr_schedule="constant", warmup_steps=0, min_learning_rate=0.0,
                  decay_rate=None, lr_boundaries=None, lr_values=None)
    config = types.SimpleNamespace(**{k: saved.get(k, v) for k, v in fields.items()},
                                   learning_rate=saved["learning_rate"])
    return from_config(config, int(total), steps_per_epoch)
