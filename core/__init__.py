"""tapeloop core: config, data, distribution, the training loop and its outer loop.

Nothing here reads absl flags: `train.py` turns flags into a `Config` and calls
`core.run(config)`; tests and notebooks do the same with a `Config` they build.
"""

from core.config import Config
from core.errors import ConfigError, DataError, TapeloopError


def run(config: Config) -> dict:
    """Runs `config.mode` (train, eval, train_and_eval); returns the final metrics."""
    from core import runner  # imports TensorFlow; keep `import core` cheap

    return runner.run(config)


__all__ = ["Config", "ConfigError", "DataError", "TapeloopError", "run"]
