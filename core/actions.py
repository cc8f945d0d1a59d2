"""Your own code in the outer loop: Orbit's train and eval actions.

An action is a function `action(step, metrics)`, called on the host between compiled
loops (on the chief only, where several workers train):

- a train action at every `--summary_every` steps (by default with every log line) with
  what TensorBoard's `train/` gets: `loss`, `examples_per_sec`, `learning_rate`,
  `step_time_ms`, `grad_norm`;
- an eval action after every evaluation (`train_and_eval`, `--mode=eval`,
  `--mode=continuous_eval`) with the evaluated step's `eval/` metrics.

From the command line, `--train_actions=MODULE:FUNCTION` (a list), imported as
`--model=MODULE:FACTORY` is; from Python, callables given to `core.run`. An action that
returns True asks the run to stop, as XGBoost's callbacks do: training stops at that step,
saved, on every worker (`distribute.AgreedStop`), and exits 0; a continuous evaluation
stops waiting. An action that raises stops the run with one line naming it, after the
steps trained are saved.
"""

from __future__ import annotations

import inspect
import reprlib
from collections.abc import Callable, Sequence

from absl import logging
import numpy as np

from core.errors import ConfigError, TapeloopError
from layers.registry import import_module_attr

Action = Callable[[int, dict], bool | None]
KINDS = ("train", "eval")


class ActionError(TapeloopError):
    """An action of yours raised."""

    exit_code = 7


class Actions:
    """The actions of one kind, each with the name its messages use."""

    def __init__(self, kind: str, names: Sequence[str] = (), functions: Sequence[Action] = ()):
        """Imports `names` (MODULE:FUNCTION) and checks that each action, named or given,
        takes (step, metrics).

        Raises:
          ConfigError: an import failed, or an action does not take (step, metrics).
        """
        flag = f"--{kind}_actions"
        self.kind = kind
        self.items: list[tuple[str, Action]] = []
        self._warned: set[str] = set()
        for name in names:
            try:
                function = import_module_attr(flag, name, "(step, metrics)")
            except ImportError as e:
                raise ConfigError(str(e)) from e
            self.items.append((f"{flag}={name}", function))
        for function in functions:
            label = getattr(function, "__qualname__", None) or repr(function)
            self.items.append((f"the {kind} action {label}", function))
        for label, function in self.items:
            try:
                inspect.signature(function).bind(0, {})
            except TypeError:
                raise ConfigError(f"{label}: an action is called as action(step, metrics); its "
                                  f"signature is {inspect.signature(function)}: take two "
                                  "arguments") from None
            except ValueError:  # no signature to read (a builtin): it will be called as is
                pass

    def __bool__(self) -> bool:
        return bool(self.items)

    def __call__(self, step: int, metrics: dict[str, float]) -> str | None:
        """Calls each action with the step and a copy of the metrics.

        Returns:
          The label of the first action that returned True (asking the run to stop), or None.

        Raises:
          ActionError: an action raised (the first that did).
        """
        asked = None
        for label, function in self.items:
            try:
                answer = function(int(step), dict(metrics))
            except Exception as e:  # noqa: BLE001 - any failure of your code is named
                raise ActionError(f"{label} raised at step {step} ({type(e).__name__}: {e})") \
                    from e
            if isinstance(answer, (bool, np.bool_)):
                asked = asked or (label if answer else None)
            elif answer is not None and label not in self._warned:
                self._warned.add(label)
                logging.warning("%s returned %s, not True, False or None: ignored (an action "
                                "returns True to stop the run)", label,
                                reprlib.repr(answer))
        return asked
