"""tapeloop core: config, data, distribution, the training loop and its outer loop.

Nothing here reads absl flags: `train.py` turns flags into a `Config` and calls
`core.run(config)`; tests and notebooks do the same with a `Config` they build.
"""

from core.config import Config
from core.errors import ConfigError, DataError, TapeloopError


def run(config: Config, given=None) -> dict:
    """Runs `config.mode` (train, train_and_eval, eval, export); returns the final metrics.

    `given`: the Config fields set explicitly; eval and export take every other model and
    data setting from the trained run's config.json (None: the fields that differ from
    the defaults). See `core.runner.run`.
    """
    from core import runner  # imports TensorFlow; keep `import core` cheap

    return runner.run(config, given)


__all__ = ["Config", "ConfigError", "DataError", "TapeloopError", "run"]
