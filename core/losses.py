"""Training losses, chosen by `--loss` and `--loss_weights`.

One contract: a loss maps targets in [0, 1] and the model's logits, both
(B, H, W, C), to its value per example, (B,) float32. The images a loss compares
are sigmoid(logits), except BCE, which is computed from the logits (stable for
large |x|).

A loss may also write its gradient by hand: `sum_and_gradient(targets, logits)`
returns the sum of the per-example values over the batch and its gradient with
respect to the logits, computed off the tape; the trainer hands that gradient to
`tape.gradient` as the logits' output gradient. Only BCE does, where it measurably
pays (benchmarks/loss_forms.py, NOTES.md); the others are plain TensorFlow,
differentiated by the tape.

Your own: `--loss=MODULE:FUNCTION` (alone or in a sum, `l1+my_losses:edges`) imports
MODULE as `--model=MODULE:FACTORY` does and calls `FUNCTION(targets, images)`, both
(N, H, W, C) float32 in [0, 1] (images = sigmoid(logits)), for one value per example,
(N,), differentiated by the tape (`UserLoss`; `check` probes it before a run writes
anything).

`build("l1+ssim", (0.16, 0.84))` returns a `Weighted` sum: what the trainer
and the evaluation use. The VAE's KL is not a loss here: it stays the model's
extra term (`model.forward`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from core import config as config_lib
from core import metrics
from core.errors import first_line
from layers.registry import import_module_attr


class Loss:
    """A loss per example. Subclasses set `name` and implement `per_example`."""

    name = ""
    title = ""  # how figures name it
    min_size = 1  # the smallest image side it is defined for

    def per_example(self, targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    # A loss with a hand-written gradient overrides this:
    # (targets, logits) -> (sum over the batch of per_example, d sum / d logits).
    sum_and_gradient = None


class BCE(Loss):
    """Binary cross-entropy per pixel, averaged per example: the tutorial's loss."""

    name, title = "bce", "BCE"

    def per_example(self, targets, logits):
        return metrics.bce_from_logits(targets, logits)

    def sum_and_gradient(self, targets, logits):
        total, dlogits = metrics.bce_sum_and_gradient(targets, logits)
        pixels = float(np.prod(logits.shape[1:]))
        return total / pixels, dlogits / pixels


class MSE(Loss):
    name, title = "mse", "MSE"

    def per_example(self, targets, logits):
        return metrics.mse(targets, tf.sigmoid(logits))


class L1(Loss):
    name, title = "l1", "L1"

    def per_example(self, targets, logits):
        return tf.reduce_mean(tf.abs(targets - tf.sigmoid(logits)), axis=[1, 2, 3])


class Charbonnier(Loss):
    """sqrt(d^2 + eps^2) per pixel, averaged: L1 with a smooth minimum (eps = 1e-3, as in
    LapSRN and most image-restoration papers)."""

    name, title = "charbonnier", "Charbonnier"
    epsilon = 1e-3

    def per_example(self, targets, logits):
        d = targets - tf.sigmoid(logits)
        return tf.reduce_mean(tf.sqrt(tf.square(d) + self.epsilon**2), axis=[1, 2, 3])


class SSIM(Loss):
    """1 - SSIM (11x11 Gaussian window, sigma 1.5), per example; defined for images of at
    least 11x11."""

    name, title = "ssim", "(1 - SSIM)"
    min_size = 11

    def per_example(self, targets, logits):
        return 1.0 - metrics.ssim(targets, tf.sigmoid(logits))


LOSSES = {cls.name: cls for cls in (BCE, MSE, L1, Charbonnier, SSIM)}
assert tuple(LOSSES) == config_lib.LOSSES, "core.config.LOSSES lists the same names"


def is_user_loss(name: str) -> bool:
    """MODULE:FUNCTION, your own (a built-in name has no ':')."""
    return ":" in name


class LossError(ValueError):
    """A user's loss function could not be imported, failed, or returned the wrong thing."""


class UserLoss(Loss):
    """`--loss=MODULE:FUNCTION`: FUNCTION(targets, images) -> (N,), images = sigmoid(logits)."""

    def __init__(self, spec: str):
        self.name = spec
        self.title = spec.partition(":")[2]
        try:
            self.function = import_module_attr(
                "--loss", spec, "(targets, images) -> one loss per example, shape (N,),")
        except ImportError as e:
            raise LossError(str(e)) from e

    def per_example(self, targets, logits):
        return tf.cast(self.function(targets, tf.sigmoid(logits)), tf.float32)

    def check(self, image_shape: Sequence[int]) -> None:
        """Calls the function on two random (targets, images) pairs, eagerly: it must return
        (2,) finite values with a gradient with respect to the images.

        Raises:
          LossError: it raised, returned another shape, non-finite values, or no gradient.
        """
        call = f"--loss={self.name}: {self.name}(targets, images)"
        targets, logits = (tf.random.stateless_uniform((2, *image_shape), seed=(0, i))
                           for i in (1, 2))
        logits = logits * 6.0 - 3.0
        try:
            with tf.GradientTape() as tape:
                tape.watch(logits)
                value = self.per_example(targets, logits)
                total = tf.reduce_sum(value)
        except Exception as e:  # noqa: BLE001
            raise LossError(f"{call} raised {type(e).__name__} on a batch of 2 images of shape "
                            f"{tuple(image_shape)}: {first_line(e)}") from e
        if tuple(value.shape) != (2,):
            raise LossError(f"{call} returned shape {tuple(value.shape)} for a batch of 2: return "
                            "one value per example, shape (N,): reduce over the pixels, e.g. "
                            "tf.reduce_mean(..., axis=[1, 2, 3])")
        if not bool(tf.reduce_all(tf.math.is_finite(value))):
            raise LossError(f"{call} returned {value.numpy().tolist()} on random images: it must "
                            "be finite")
        if tape.gradient(total, logits) is None:
            raise LossError(f"{call}: its value has no gradient with respect to the images: "
                            "compute it from them with differentiable TensorFlow ops (not NumPy)")
        # The step traces it into a graph without AutoGraph: Python `if` on a tensor, or
        # .numpy(), work eagerly above and fail there.
        try:
            tf.function(self.per_example, autograph=False).get_concrete_function(
                tf.TensorSpec((2, *image_shape)), tf.TensorSpec((2, *image_shape)))
        except Exception as e:  # noqa: BLE001
            from layers.autoencoders import describe_trace_error

            raise LossError(f"{call} fails when traced into the training step's graph "
                            f"({describe_trace_error(e)}): use TensorFlow ops on tensors "
                            "(tf.where, not a Python if; no .numpy())") from e


class Weighted(Loss):
    """sum_i weight_i * loss_i. What `build` returns, also for a single loss."""

    def __init__(self, terms: Sequence[tuple[float, Loss]]):
        self.terms = [(float(w), loss) for w, loss in terms]
        self.name = "+".join(loss.name for _, loss in self.terms)
        self.title = " + ".join(loss.title if w == 1 else f"{w:g} {loss.title}"
                                for w, loss in self.terms)
        self.min_size = max(loss.min_size for _, loss in self.terms)
        self.hand = [(w, loss) for w, loss in self.terms if loss.sum_and_gradient is not None]
        self.taped = [(w, loss) for w, loss in self.terms if loss.sum_and_gradient is None]

    def per_example(self, targets, logits):
        logits = tf.cast(logits, tf.float32)
        targets = tf.cast(targets, tf.float32)
        return tf.add_n([w * loss.per_example(targets, logits) for w, loss in self.terms])

    def taped_sum(self, targets, logits) -> tf.Tensor | None:
        """The batch sum of the terms without a hand-written gradient (compute it on the
        tape), or None if there are none."""
        if not self.taped:
            return None
        return tf.add_n([w * tf.reduce_sum(loss.per_example(targets, logits))
                         for w, loss in self.taped])

    def hand_sum_and_gradient(self, targets, logits) -> tuple[tf.Tensor, tf.Tensor] | None:
        """The batch sum of the terms with a hand-written gradient, and that gradient with
        respect to the logits (compute it off the tape), or None if there are none."""
        if not self.hand:
            return None
        sums, grads = zip(*[(w * s, w * g) for w, loss in self.hand
                            for s, g in [loss.sum_and_gradient(targets, logits)]])
        return tf.add_n(sums), tf.add_n(grads)


def build(spec: str = "bce", weights: Sequence[float] | None = None) -> Weighted:
    """The loss `spec` names: one of `LOSSES` or MODULE:FUNCTION, or several joined by '+',
    with one weight each (default 1). Config validates both before this runs.

    Raises:
      LossError: a MODULE:FUNCTION that does not import.
    """
    names = spec.split("+")
    weights = tuple(weights) if weights else (1.0,) * len(names)
    return Weighted([(w, LOSSES[name]() if name in LOSSES else UserLoss(name))
                     for w, name in zip(weights, names)])


def check(loss: Weighted, image_shape: Sequence[int]) -> None:
    """Probes every user term of `loss` on images of `image_shape` (see UserLoss.check)."""
    for _, term in loss.terms:
        if isinstance(term, UserLoss):
            term.check(image_shape)
